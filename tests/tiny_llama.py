"""A small randomly initialised Llama written as llama.cpp writes GGUF: the same code paths as
SmolLM2-135M (`wmtrace.smollm2`), in seconds. Its weights are smooth enough to be a language model of
a toy grammar: the data are token sequences from a fixed random Markov chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wmtrace import smollm2
from wmtrace.formats import gguf as gguf_format

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 256, 2, 4, 2, 512
TOKENS = 32
PATH: Path | None = None  # the GGUF file `write` made; `build` reads its metadata


def write(path: Path, qtype: str = "Q4_1", seed: int = 0) -> Path:
    """A tiny Llama as a GGUF file: llama.cpp's names, q/k rows permuted, matrices in `qtype`."""
    import gguf

    global PATH
    cfg = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    import transformers

    model = drawn(smollm2.CausalLM(transformers.LlamaConfig(**cfg, tie_word_embeddings=True, use_cache=False)), seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(256)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        gname = gguf_format.to_gguf(name)
        heads = HEADS if ".q_proj." in name else KV_HEADS if ".k_proj." in name else 0
        if heads:
            a = gguf_format.permute(a, heads)
        if a.ndim == 1:
            w.add_tensor(gname, a)
        else:
            q = "Q8_0" if "embed" in name else qtype
            w.add_tensor(gname, gguf.quants.quantize(a, gguf.GGMLQuantizationType[q]),
                         raw_dtype=gguf.GGMLQuantizationType[q])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    PATH = path
    return path


def drawn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights drawn as transformers initialises a Llama (normal, std 0.02; norms 1), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() == 2 else torch.ones_like(p))
    return model


def build() -> torch.nn.Module:
    return smollm2.CausalLM(smollm2.llama_config(PATH)).eval()


class Chain(Dataset):
    """Sequences of a fixed random Markov chain over the vocabulary (each token has 4 successors)."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(1234)
        succ = rng.integers(0, VOCAB, (VOCAB, 4))
        r = np.random.default_rng(seed)
        ids = np.empty((n, TOKENS), dtype=np.int64)
        ids[:, 0] = r.integers(0, VOCAB, n)
        for j in range(1, TOKENS):
            ids[:, j] = succ[ids[:, j - 1], r.integers(0, 4, n)]
        self.ids = torch.from_numpy(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(TOKENS, dtype=torch.long)}


def dataset(split: str) -> Dataset:
    return Chain(256 if split == "train" else 64, 0 if split == "train" else 1)
