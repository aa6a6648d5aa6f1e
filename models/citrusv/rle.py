"""Run-length encoding of 2D masks, exactly as docs/api.md pins it (row-major, starts with 0s)."""

from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
    """Encode a 2D boolean mask as {"size": [H, W], "counts": [n0, n1, ...]}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"RLE needs a 2D mask, got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="C")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode(rle: dict) -> np.ndarray:
    """Decode {"size": [H, W], "counts": [...]} back to a boolean (H, W) array."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(h, w)
