"""LRU cache of per-slice model inputs and features, bounded by a memory budget in bytes.

Key: (content hash, window, crop). A second question about the same slice reuses the SAM2
image features, the vision-tower embeddings and the KV cache of the prompt up to the image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .imaging import FrameMap


def content_hash(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass
class SliceState:
    """One slice as both models see it; features filled lazily and kept while cached."""

    key: tuple
    rgb: np.ndarray  # (H, W, 3) uint8: what the models see, in this state's pixels
    frame: Image.Image  # resized to the Qwen frame
    frame_map: FrameMap
    pixel_inputs: dict = field(default_factory=dict)
    vision_embeds: torch.Tensor | None = None
    sam_features: dict | None = None
    prefixes: dict = field(default_factory=dict)  # system prompt -> PromptPrefix (KV cache)

    @property
    def nbytes(self) -> int:
        return (self.rgb.nbytes + _nbytes(self.pixel_inputs) + _nbytes(self.vision_embeds)
                + _nbytes(self.sam_features) + sum(p.nbytes for p in self.prefixes.values()))


class SliceCache:
    """Least-recently-used SliceStates, evicted once their bytes exceed `budget_bytes`."""

    def __init__(self, budget_bytes: int = 1024**3) -> None:
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[tuple, SliceState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> SliceState | None:
        state = self._items.get(key)
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return state

    def put(self, state: SliceState) -> None:
        self._items[state.key] = state
        self._items.move_to_end(state.key)
        self.trim()

    def trim(self) -> None:
        """Evict oldest entries (never the newest) until within budget."""
        while len(self._items) > 1 and self.nbytes > self.budget_bytes:
            self._items.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
