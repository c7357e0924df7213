"""GGUF, llama.cpp's format: read lazily under Hugging Face names, written back in the master's types.

A GGUF file is memory-mapped by the `gguf` package's reader: the header, the key-value metadata and
the tensor table are parsed up front; a tensor's blocks are touched (and dequantized to float32) only
when asked for, so tracing reads the carriers' pages, not the file.

Names. llama.cpp's converter renames Hugging Face tensors (`model.layers.3.self_attn.q_proj.weight`
becomes `blk.3.attn_q.weight`) and, for the `llama` architecture, permutes the rows of q_proj and
k_proj within each head (ggml's rotary embedding pairs dimensions 2i and 2i + 1 where Hugging Face's
pairs i and i + d/2). This reader undoes both, so a GGUF master, its copies and a leak converted either way
present the same names and the same row order; `to_gguf` and `permute` redo them when writing. Names
outside the table stay as the file has them (alignment finds carriers by their filters, not names).

Types. Every type the `gguf` package dequantizes is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the
K-quants, the IQ types); integer tensors are not weights and are skipped. `save_gguf` writes each
tensor in the master's type where it can be quantized here (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 by
the `gguf` package; Q4_K by `kquants`) and in `FALLBACK` (Q8_0) where it cannot (the other K-quants
and the IQ types): the stated fallback, larger than the master's type and never less faithful.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import BadInput, first_line
from . import kquants
from .source import Reader, TensorSource

MAGIC = b"GGUF"
FALLBACK = "Q8_0"
# Architectures whose converter permutes q/k rows for rotary embeddings (llama.cpp's LlamaModel).
PERMUTED_ARCHS = ("llama",)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_HF = {v: k for k, v in _BLOCK.items()}
_TOP_HF = {v: k for k, v in _TOP.items()}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise BadInput("reading or writing GGUF needs the gguf package: pip install 'wmtrace[llm]'") from e
    return gguf


def to_hf(name: str) -> str:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    names outside llama.cpp's table for Llama-family models come back unchanged."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        if m[2] in _BLOCK:
            return f"model.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"
    elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", name)) and m[1] in _TOP:
        return f"{_TOP[m[1]]}.{m[2]}"
    return name


def to_gguf(name: str) -> str:
    """`to_hf` undone."""
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(\w+\.\w+)\.(weight|bias)", name):
        if m[2] in _BLOCK_HF:
            return f"blk.{m[1]}.{_BLOCK_HF[m[2]]}.{m[3]}"
    elif (m := re.fullmatch(r"(.+)\.(weight|bias)", name)) and m[1] in _TOP_HF:
        return f"{_TOP_HF[m[1]]}.{m[2]}"
    return name


def _heads(name: str, arch: str, heads: tuple[int, int] | None) -> int | None:
    """How many heads a q/k tensor's rows are permuted in, or None for any other tensor."""
    if arch not in PERMUTED_ARCHS or heads is None:
        return None
    if re.search(r"\.(attn_q|self_attn\.q_proj)\.", name):
        return heads[0]
    if re.search(r"\.(attn_k|self_attn\.k_proj)\.", name):
        return heads[1]
    return None


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter on q/k rows: within each head, rows i and i + d/2 (Hugging Face's rotary
    pairs) become rows 2i and 2i + 1 (ggml's)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """`permute` undone (transformers' reverse permutation when it loads GGUF)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key: str, default=None):
    """A metadata value of the file, or `default` where absent or unreadable."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # a hostile value of the wrong type: treated as absent
        return default


def _corrupt(path: Path, e: BaseException) -> BadInput:
    return BadInput(f"{path}: corrupt or truncated GGUF file ({first_line(e)})")


def open_reader(path: Path):
    """The `gguf` package's reader over `path` (memory-mapped), its failures as one line."""
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or first_line(e)})") from e


def model_heads(reader) -> tuple[str, tuple[int, int] | None]:
    """The file's architecture and its (query heads, key/value heads), where it says."""
    arch = str(field(reader, "general.architecture", ""))
    q = field(reader, f"{arch}.attention.head_count")
    kv = field(reader, f"{arch}.attention.head_count_kv", q)
    try:
        heads = (int(q), int(kv)) if q is not None else None
    except (TypeError, ValueError, OverflowError):
        return arch, None
    return arch, heads if heads and min(heads) > 0 else None  # a hostile count must not reach reshape


class GGUFSource(TensorSource):
    """A GGUF file's float tensors under Hugging Face names, each dequantized when asked for.
    `quants` holds every tensor's GGUF type, in file order: copies are written back in them."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.reader = open_reader(path)
        self.arch, self.heads = model_heads(self.reader)
        self._tensors = {}
        shapes, quants = {}, {}
        types = gguf.GGMLQuantizationType.__members__
        integer = {types[n] for n in ("I8", "I16", "I32", "I64") if n in types}
        for t in self.reader.tensors:
            if t.tensor_type in integer:
                continue
            name = to_hf(t.name)
            shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest axis first
            quants[name] = t.tensor_type.name
            self._tensors[name] = t
        super().__init__(shapes)
        self.quants = quants
        self.files = [path]
        self.path = path

    def load(self, name: str) -> np.ndarray:
        gguf = _gguf()
        t = self._tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.array(w, dtype=np.float32).reshape(self.shapes[name])  # a copy: F32 data is the read-only map
        except NotImplementedError as e:
            raise BadInput(f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which cannot be "
                           "dequantized here") from e
        except (ValueError, IndexError, TypeError) as e:
            raise _corrupt(self.path, e) from e
        heads = _heads(t.name, self.arch, self.heads)
        if heads and w.shape[0] % (2 * heads) == 0:
            w = unpermute(w, heads)
        return w


# A row that is not whole 256-weight blocks cannot be a K-quant: llama.cpp's quantizer then uses these
# (`llama_tensor_get_type`); SmolLM2's 576-wide rows are such rows, so its "Q4_K_M" matrices are mostly Q5_0.
ROW_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Types written by our own quantizer where the `gguf` package has none (`kquants`).
OWN_QUANTIZERS = ("Q4_K",)


def writable(qtype: str) -> bool:
    """Whether a tensor can be written as `qtype` here (by the `gguf` package, or `kquants`)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType[qtype]
    return qtype in OWN_QUANTIZERS or q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or (
        q in gguf.quants._type_traits and "quantize_blocks" in vars(gguf.quants._type_traits[q]))


def quantize(w: np.ndarray, qtype: str) -> tuple[np.ndarray, str]:
    """`w` (float32, numpy layout) stored as `qtype` (raw blocks), or as `FALLBACK` where that type has
    no quantizer here, or F16 where a row is not whole blocks of either; returns the raw array and the
    type written."""
    gguf = _gguf()
    q = qtype if writable(qtype) else FALLBACK
    if w.ndim < 2 and q not in ("F32", "F16", "BF16"):
        q = "F32"
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[q]][0]:
        q = ROW_FALLBACK.get(q, "F16")
        if w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[q]][0]:
            q = "F16"
    w = np.ascontiguousarray(w, dtype=np.float32)
    if q == "Q4_K":
        return kquants.quantize_q4_k(w.reshape(-1, w.shape[-1])).reshape(*w.shape[:-1], -1), q
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[q]), q


def dequantize(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Raw blocks of `qtype` back to float32 (numpy layout)."""
    gguf = _gguf()
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]), dtype=np.float32)


def _copy_metadata(reader, writer) -> None:
    """Every key-value pair of `reader` onto `writer`, except those the writer sets itself."""
    gguf = _gguf()
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)


@contextmanager
def _atomic(out: Path, arch: str, metadata) -> Iterator:
    """A `GGUFWriter` on a hidden file beside `out`, `metadata`'s key-value pairs copied; the caller
    adds tensors, and the file is written, synced and renamed into place only if nothing failed."""
    gguf = _gguf()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(metadata, writer)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"{out}: cannot write ({e.strerror or first_line(e)})") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_gguf(tensors: dict[str, np.ndarray], template, out: str | os.PathLike,
              quants: dict[str, str] | None = None) -> dict[str, str]:
    """Write `tensors` (Hugging Face names, float) as a GGUF file with `template`'s metadata and tensor
    order (a path, or a reader from `open_reader`: parsing a tokenizer's metadata takes seconds, so a run
    writing many copies opens it once), each in its type in `quants` (default: the template's own).
    Atomic, like every write. Returns the types that had to fall back, by name."""
    gguf = _gguf()
    reader = template if hasattr(template, "fields") else open_reader(Path(template))
    arch, heads = model_heads(reader)
    order = quants if quants is not None else {to_hf(t.name): t.tensor_type.name for t in reader.tensors}
    fell_back: dict[str, str] = {}
    with _atomic(Path(out), arch, reader) as writer:
        for name, qtype in order.items():
            if name not in tensors:
                raise BadInput(f"{out}: no tensor {name!r} to write")
            w = np.asarray(tensors[name], dtype=np.float32)
            gname = to_gguf(name)
            h = _heads(gname, arch, heads)
            if h and w.shape[0] % (2 * h) == 0:
                w = permute(w, h)
            raw, written = quantize(w, qtype)
            if written != qtype:
                fell_back[name] = written
            writer.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType[written])
    return fell_back


def save_template(source: GGUFSource, out: str | os.PathLike) -> None:
    """The master's GGUF metadata (tokenizer, architecture, chat template) without its tensors: what
    `save_gguf` needs besides the weights, a few MB where the model is hundreds."""
    with _atomic(Path(out), source.arch, source.reader):
        pass


def _open(path: Path) -> TensorSource:
    return GGUFSource(path)


READER = Reader(
    name="GGUF",
    magic=lambda head: head[:4] == MAGIC,
    open=_open,
    suffixes=(".gguf",),
    folder_names=(".gguf",),
    folder_label=".gguf",
)
