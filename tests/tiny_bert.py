"""A small randomly initialised BERT of all-MiniLM-L6-v2's family and a few hundred fortunes: the
transformer code paths in seconds (tests only). Factory `tests.tiny_bert:build`, data
`tests.tiny_bert:small_dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wmtrace import minilm
from wmtrace.formats import save_safetensors


def build() -> torch.nn.Module:
    """A small BERT (2 layers, hidden 128) with MiniLM's vocabulary and sentence-embedding head."""
    transformers = minilm._need("transformers")
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512
    )
    return minilm._encoder_class()(config, add_pooling_layer=False).eval()


def tiny_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised `build` model as safetensors."""
    torch.manual_seed(seed)
    save_safetensors(build().state_dict(), path)
    return Path(path)


def small_dataset(split: str) -> minilm.TokenDataset:
    """The first 384 training or 256 test fortunes, 32 tokens each."""
    texts = minilm._split(minilm.fortunes(), split)
    return minilm.TokenDataset(texts[: 384 if split == "train" else 256], max_tokens=32)
