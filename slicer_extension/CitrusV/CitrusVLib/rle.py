"""Run-length encoding of 2D masks as pinned in docs/api.md (row-major, starts with a 0-run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Turn ``{"size": [H, W], "counts": [...]}`` into a boolean ``(H, W)`` mask."""
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("RLE counts must be a flat list of non-negative run lengths.")
    if int(counts.sum()) != height * width:
        raise ValueError(
            f"RLE counts sum to {int(counts.sum())} but size {height}x{width} needs "
            f"{height * width} pixels."
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(height, width)


def encode_rle(mask: np.ndarray | Sequence[Sequence[bool]]) -> dict[str, Any]:
    """Encode a 2D mask the way the server does; used for corrections and tests."""
    array = np.asarray(mask).astype(bool)
    if array.ndim != 2:
        raise ValueError(f"RLE needs a 2D mask, got shape {array.shape}.")
    flat = array.ravel(order="C")
    if flat.size == 0:
        return {"size": list(array.shape), "counts": [0]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": [int(r) for r in runs]}
