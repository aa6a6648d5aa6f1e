"""The one result shape every task returns (docs/api.md), as dataclasses with `to_json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from . import rle


@dataclass
class Box:
    """A box in input-slice pixels: x = column, y = row, [x1, y1, x2, y2].

    `source` says where `xyxy` comes from: "text" (the numbers the model wrote) or "mask" (the
    box of the model's own mask of `label`); `text_xyxy` is the box the model wrote, either
    way, and `score` is the model's probability of those numbers. A "mask" box with no
    `text_xyxy` is one the model wrote no box for (its answer said the structure is not
    visible; its mask said otherwise): `text_xyxy` and `score` are null in JSON.
    `spacing` (row, column mm of one pixel, when the image's is known) gives `size_mm`, the
    box's [width, height] in mm (x2, y2 exclusive), measured, not what an answer says."""

    id: str
    label: str
    xyxy: list[float]
    slice: int | None = None
    score: float | None = None
    source: str = "text"
    text_xyxy: list[float] | None = None
    spacing: tuple[float, float] | None = None

    @property
    def size_mm(self) -> list[float] | None:
        if self.spacing is None:
            return None
        x1, y1, x2, y2 = (float(v) for v in self.xyxy)
        return [round((x2 - x1) * float(self.spacing[1]), 1),
                round((y2 - y1) * float(self.spacing[0]), 1)]

    def to_json(self) -> dict:
        written = self.text_xyxy
        if written is None and self.source != "mask":
            written = self.xyxy
        return {
            "id": self.id,
            "label": self.label,
            "xyxy": [round(float(v), 2) for v in self.xyxy],
            "slice": self.slice,
            "score": None if self.score is None else round(float(self.score), 4),
            "source": self.source,
            "text_xyxy": None if written is None else [round(float(v), 2) for v in written],
            "size_mm": self.size_mm,
        }


def diameters_mm(plane: np.ndarray, spacing) -> list[float] | None:
    """[longest, across] in mm of a 2D mask's largest 8-connected part: the longest line
    across its pixels (their corners, so one pixel is a pixel across) and its width at right
    angles to that line, as a radiologist measures a long and a short axis; None for an
    empty mask. `spacing`: (row, column) mm of one pixel."""
    rows_on, cols_on = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if not rows_on.size:
        return None
    plane = plane[rows_on[0]:rows_on[-1] + 1, cols_on[0]:cols_on[-1] + 1]  # lengths only
    parts, n = ndimage.label(plane, structure=np.ones((3, 3), dtype=bool))
    largest = 1 + int(np.argmax(ndimage.sum_labels(plane, parts, range(1, n + 1))))
    ys, xs = np.nonzero(parts == largest)
    rows = np.unique(ys)
    left = ndimage.minimum(xs, ys, rows)
    right = ndimage.maximum(xs, ys, rows) + 1
    pts = np.array([(x, y + dy) for y, a, b in zip(rows, left, right)
                    for x in (a, b) for dy in (0, 1)], dtype=np.float64)
    pts *= [float(spacing[1]), float(spacing[0])]
    pts = pts[ConvexHull(pts).vertices]  # the corners of a pixel span are never on one line
    gaps = pts[:, None, :] - pts[None, :, :]
    lengths = np.hypot(gaps[..., 0], gaps[..., 1])
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    along = gaps[i, j] / lengths[i, j]
    across = pts @ np.array([-along[1], along[0]])
    return [round(float(lengths[i, j]), 1), round(float(np.ptp(across)), 1)]


@dataclass
class Mask:
    """A boolean mask: (H, W) for a slice, or (Z, Y, X) in volume index space for `ask_volume`."""

    label: str
    array: np.ndarray
    label_index: int = 1
    slice: int | None = None
    score: float | None = None
    spacing: tuple[float, float] | None = None  # (row, column) mm of one slice pixel
    slices: list[int] = field(default_factory=list)  # for 3D masks: the slice indices asked
    axis: int = 0  # for 3D masks: the axis the slices run along
    thickness: float | None = None  # for 3D masks over contiguous slices: mm between slices
    # the model's probability per pixel, where the engine keeps it (a closer look's passes);
    # never sent
    probability: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def area_px(self) -> int:
        return int(np.count_nonzero(self.array))

    @property
    def volume_ml(self) -> float | None:
        """For a 3D mask over contiguous slices with a known spacing: its voxels' volume in mL
        (those of the slices asked only), else None."""
        if self.array.ndim != 3 or self.spacing is None or self.thickness is None:
            return None
        voxel = float(self.spacing[0]) * float(self.spacing[1]) * float(self.thickness)
        return round(self.area_px * voxel / 1000.0, 2)

    def plane_sizes(self, plane: np.ndarray | None = None) -> dict:
        """`area_px`, `area_mm2` and `diameters_mm` of one 2D plane of the mask (default: a
        2D mask's own array), as its JSON entry gives them; mm only with a known spacing."""
        plane = self.array if plane is None else plane
        area = int(np.count_nonzero(plane))
        area_mm2 = None
        if self.spacing is not None:
            area_mm2 = round(area * float(self.spacing[0]) * float(self.spacing[1]), 3)
        return {"area_px": area, "area_mm2": area_mm2,
                "diameters_mm": (None if self.spacing is None or not area
                                 else diameters_mm(plane, self.spacing))}

    def _entry(self, plane: np.ndarray, slice_index: int | None) -> dict:
        return {
            "label": self.label,
            "label_index": self.label_index,
            "slice": slice_index,
            **self.plane_sizes(plane),
            "score": None if self.score is None else round(float(self.score), 4),
            "rle": rle.encode(plane),
        }

    def to_json(self) -> list[dict]:
        """One JSON entry per 2D plane (a 3D mask gives one entry per asked slice)."""
        if self.array.ndim == 2:
            return [self._entry(self.array, self.slice)]
        return [self._entry(np.take(self.array, k, axis=self.axis), k) for k in self.slices]


@dataclass
class Step:
    """One reasoning step, in reading order, with the ids of the boxes it cites."""

    step: int
    text: str
    box_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"step": self.step, "text": self.text, "box_ids": list(self.box_ids)}


@dataclass
class Result:
    """What `Engine.ask` and friends return; `to_json()` is the wire format of docs/api.md."""

    task: str
    prompt: str
    text: str = ""
    answer: str = ""
    reasoning: list[Step] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)
    model: dict = field(default_factory=lambda: {"name": "citrusv", "version": ""})
    image: dict = field(default_factory=dict)
    timing_ms: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    closer_look: dict | None = None

    @property
    def label_names(self) -> dict[str, int]:
        return {m.label: m.label_index for m in self.masks}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "prompt": self.prompt,
            "model": dict(self.model),
            "text": self.text,
            "answer": self.answer,
            "reasoning": [s.to_json() for s in self.reasoning],
            "boxes": [b.to_json() for b in self.boxes],
            "masks": [entry for m in self.masks for entry in m.to_json()],
            "image": dict(self.image),
            "timing_ms": {k: round(float(v), 2) for k, v in self.timing_ms.items()},
            "warnings": list(self.warnings),
            "label_names": self.label_names,
        }
        volumes = {m.label: m.volume_ml for m in self.masks if m.volume_ml is not None}
        if volumes:  # a slice range: each structure's volume over the slices asked
            out["volumes_ml"] = volumes
        if self.closer_look is not None:
            out["closer_look"] = dict(self.closer_look)
        return out
