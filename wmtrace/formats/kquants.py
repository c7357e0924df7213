"""Q4_K, the type inside llama.cpp's popular Q4_K_M, written here: the `gguf` package reads the
K-quants but quantizes none of them.

A Q4_K block holds 256 weights as 8 sub-blocks of 32: weight = d * sc[j] * q - dmin * mn[j] with q
in 0..15, the sub-block scales sc and minimums mn quantized to 6 bits against the block's float16 d
and dmin. Each sub-block's scale and minimum here come from its range in one pass (llama.cpp's
`quantize_row_q4_K_ref` refines them by a small search), so its error is at least llama.cpp's: an
attack measured with it is no gentler than the real tool. The layout is the one the `gguf` package's
dequantizer reads (its round trip is tested), which is llama.cpp's.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
SUB = 32
BLOCK_BYTES = 144  # d, dmin (float16 each), 12 bytes of packed 6-bit scales and minimums, 128 of quants


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """`w` (rows x columns, columns a multiple of 256) as Q4_K blocks: rows x (columns / 256 * 144) uint8."""
    rows = w.shape[0]
    x = np.asarray(w, dtype=np.float32).reshape(-1, QK_K // SUB, SUB)  # (blocks, 8, 32)
    mn = np.maximum(-x.min(-1), 0.0)  # a sub-block's minimum is stored negated, and never above zero
    sc = (x.max(-1) + mn) / 15.0
    d = (sc.max(-1) / 63.0).astype(np.float16)
    dmin = (mn.max(-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc_q = np.clip(np.round(np.divide(sc, d32, out=np.zeros_like(sc), where=d32 > 0)), 0, 63).astype(np.uint8)
    mn_q = np.clip(np.round(np.divide(mn, dmin32, out=np.zeros_like(mn), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    scale = (d32 * sc_q)[..., None]
    offset = (dmin32 * mn_q)[..., None]
    q = np.clip(np.round(np.divide(x + offset, scale, out=np.zeros_like(x), where=scale > 0)), 0, 15).astype(np.uint8)
    packed = np.empty((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc_q[:, :4] | ((sc_q[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn_q[:, :4] | ((mn_q[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc_q[:, 4:] & 0xF) | ((mn_q[:, 4:] & 0xF) << 4)
    q = q.reshape(-1, 4, 2, SUB)  # sub-blocks 2c and 2c + 1 share 32 bytes: low and high nibbles
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], 1)
    return blocks.reshape(rows, -1)
