"""The one result shape (docs/api.md) as plain dataclasses, so callers never index raw dicts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rle import decode_rle

TASKS = ("segment", "detect", "report", "closer_look")

BOX_TAG = re.compile(r"<bbox>.*?</bbox>|<\|box_start\|>.*?<\|box_end\|>", re.S)


def _numbers(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def step_text(text: str, box_ids: list[str]) -> str:
    """A reasoning step for reading: each inline box tag becomes the id of the box it cites."""
    ids = iter(box_ids)
    return BOX_TAG.sub(lambda _: f"({next(ids, 'box')})", text).strip()


@dataclass
class ReasoningStep:
    step: int
    text: str
    box_ids: list[str] = field(default_factory=list)


@dataclass
class Box:
    id: str
    label: str
    xyxy: tuple[float, float, float, float]
    slice: int | None = None
    score: float | None = None
    source: str = "text"  # "mask": the box of the model's own mask of `label`
    text_xyxy: tuple[float, float, float, float] | None = None  # the box the model wrote
    size_mm: tuple[float, float] | None = None  # [width, height] measured from the pixels

    @property
    def name(self) -> str:
        """Display name used for ROI nodes and overlays, e.g. ``b1 liver 0.90``: the score
        is how sure the model was of the box's coordinates (left out when there is none);
        ``(from mask)`` when the server put the box of the model's mask in its place."""
        name = f"{self.id} {self.label}".strip()
        if self.score is not None:
            name = f"{name} {self.score:.2f}"
        return f"{name} (from mask)" if self.source == "mask" else name


_BOX_NAME = re.compile(r"^(?:b\d+\s+)?(?P<label>.*?)(?:\s+\d\.\d\d)?(?:\s+\(from mask\))?"
                       r"(?:, slices \d+-\d+ \(\d+ box(?:es)?\))?$")


def box_label(name: str) -> str:
    """The structure of an ROI node named as ``Box.name`` or ``RangeBox.name`` gives it
    (``b1 liver 0.90 (from mask)`` -> ``liver``), for a node from a scene saved before
    nodes carried their label (``CitrusVMRML.BOX_LABEL_ATTR``)."""
    m = _BOX_NAME.match(" ".join(name.split()))
    return m.group("label") if m else name


@dataclass
class RangeBox:
    """A slice-range answer's boxes of one structure as one 3D box: the union of their pixel
    boxes, from the first slice with one to the last (one ROI node, not one per slice)."""

    label: str
    ids: list[str]
    xyxy: tuple[float, float, float, float]
    first: int
    last: int

    @property
    def name(self) -> str:
        """``liver, slices 40-60 (21 boxes)``."""
        n = len(self.ids)
        return f"{self.label}, slices {self.first}-{self.last} ({n} box{'es' if n > 1 else ''})"


def range_boxes(boxes: list[Box]) -> list[RangeBox]:
    """The boxes (each with its slice) grouped by label, in the order labels first come."""
    out: dict[str, RangeBox] = {}
    for b in boxes:
        if b.slice is None:
            raise ValueError(f"Box {b.id} has no slice index.")
        if b.label not in out:
            out[b.label] = RangeBox(b.label, [b.id], tuple(b.xyxy), b.slice, b.slice)
            continue
        r = out[b.label]
        r.ids.append(b.id)
        r.xyxy = (min(r.xyxy[0], b.xyxy[0]), min(r.xyxy[1], b.xyxy[1]),
                  max(r.xyxy[2], b.xyxy[2]), max(r.xyxy[3], b.xyxy[3]))
        r.first, r.last = min(r.first, b.slice), max(r.last, b.slice)
    return list(out.values())


@dataclass
class Mask:
    label: str
    label_index: int
    slice: int | None
    rle: dict[str, Any] | None = None
    area_px: int | None = None
    area_mm2: float | None = None
    score: float | None = None
    diameters_mm: tuple[float, float] | None = None  # long and short axis of its largest part

    def array(self) -> np.ndarray:
        """The boolean ``(H, W)`` mask of the slice."""
        if self.rle is None:
            raise ValueError(f"Mask '{self.label}' carries no RLE; read the label file instead.")
        return decode_rle(self.rle)


@dataclass
class ImageInfo:
    id: str | None = None
    shape: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    axis: str = "axial"
    slices: list[int] = field(default_factory=list)
    ijk_to_ras: list[list[float]] | None = None  # how the server read the image


@dataclass
class CloserLook:
    roi: tuple[float, float, float, float]  # the asked box (or the engine's pick)
    area_px_before: int | None = None
    area_px_after: int | None = None
    crop: tuple[float, float, float, float] | None = None  # the square the model saw (around all)
    crops: list[tuple[float, float, float, float]] = field(default_factory=list)  # each square


@dataclass
class Result:
    task: str
    prompt: str = ""
    text: str = ""
    answer: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    reasoning: list[ReasoningStep] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)
    image: ImageInfo = field(default_factory=ImageInfo)
    timing_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    label_names: dict[str, int] = field(default_factory=dict)
    closer_look: CloserLook | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)  # a slice range's, per structure
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def box(self, box_id: str) -> Box | None:
        return next((b for b in self.boxes if b.id == box_id), None)

    def boxes_for_step(self, step: int) -> list[Box]:
        """Boxes cited by reasoning step ``step`` (1-based), in citation order."""
        for s in self.reasoning:
            if s.step == step:
                return [b for b in (self.box(i) for i in s.box_ids) if b is not None]
        return []

    @property
    def intended_use(self) -> str | None:
        """What the answering model's folder says it may be used for, if anything."""
        use = (self.model or {}).get("intended_use")
        return str(use) if use else None

    def volumes_line(self) -> str:
        """ "Volumes over slices 26-54: spleen 130.0 mL" for a slice range's answer."""
        ks = self.image.slices
        where = f"slices {min(ks)}-{max(ks)}" if ks else "the slices asked"
        return f"Volumes over {where}: " + "; ".join(
            f"{name} {ml:.1f} mL" for name, ml in self.volumes_ml.items())

    def shown_text(self) -> str:
        """What the module shows as the answer: the answer (else the raw text), the warnings,
        and the model's intended use."""
        text = (self.answer or self.text or "").strip()
        if self.warnings:
            text += "\n\nWarnings:\n" + "\n".join(f"- {w}" for w in self.warnings)
        if self.intended_use:
            text += f"\n\nIntended use: {self.intended_use}"
        return text

    def record(self, when: str | None = None) -> str:
        """The answer as plain text for the record kept with the scene: the question, the
        model and version that answered, the slices, the answer, each reasoning step with the
        boxes it cites, the masks and the warnings. ``when``: the time it was asked."""
        model = self.model or {}
        slices = ", ".join(str(s) for s in self.image.slices) or "-"
        lines = [
            f"Question: {self.prompt}",
            f"Task: {self.task}",
            f"Model: {model.get('name', '?')}, version {model.get('version', '?')}",
        ]
        if self.intended_use:
            lines.append(f"Intended use: {self.intended_use}")
        lines += [f"Image: {self.image.id or '?'} ({self.image.axis} slice {slices})"]
        if when:
            lines.append(f"Asked: {when}")
        if self.closer_look is not None:
            several = len(self.closer_look.crops) > 1
            lines.append("Closer look at box " + _numbers(self.closer_look.roi)
                         + (f" ({len(self.closer_look.crops)} squares)" if several else ""))
        lines += ["", "Answer:", (self.answer or self.text or "(none)").strip()]
        if self.reasoning:
            lines += ["", "Reasoning:"]
            for step in self.reasoning:  # as the module lists them: cited ids inline or after
                text = step_text(step.text, step.box_ids)
                ids = f" [{', '.join(step.box_ids)}]" if step.box_ids and text == step.text else ""
                lines.append(f"{step.step}. {text}{ids}")
        if self.boxes:
            lines += ["", "Boxes (pixels of the slice: x1, y1, x2, y2):"]
            for b in self.boxes:
                where = f"slice {b.slice}, " if b.slice is not None else ""
                score = f", score {b.score:.2f}" if b.score is not None else ""
                origin = ""
                if b.source == "mask":
                    written = f", written {_numbers(b.text_xyxy)}" if b.text_xyxy else ""
                    origin = f" (from the {b.label} mask{written})"
                size = (f", {b.size_mm[0]:.0f} x {b.size_mm[1]:.0f} mm" if b.size_mm
                        else "")
                lines.append(f"{b.id} {b.label}: {where}{_numbers(b.xyxy)}{size}{origin}{score}")
        if self.masks:
            lines += ["", "Masks:"]
            for m in self.masks:
                where = f"slice {m.slice}" if m.slice is not None else "all slices"
                area = (f", {m.area_mm2:.1f} mm²" if m.area_mm2 is not None
                        else f", {m.area_px} px" if m.area_px is not None else "")
                if m.diameters_mm:
                    area += f", {m.diameters_mm[0]:.0f} x {m.diameters_mm[1]:.0f} mm"
                score = f", score {m.score:.2f}" if m.score is not None else ""
                lines.append(f"{m.label}: {where}{area}{score}")
            if self.volumes_ml:
                lines.append(self.volumes_line())
        if self.warnings:
            lines += ["", "Warnings:", *(f"- {w}" for w in self.warnings)]
        return "\n".join(lines) + "\n"

    def labels(self) -> dict[str, int]:
        """Structure name → label index, from ``label_names`` or else from the masks."""
        names = dict(self.label_names)
        for m in self.masks:
            names.setdefault(m.label, m.label_index)
        return names

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        """Parse a result dict; tolerant of missing optional keys, strict on types it uses."""
        if not isinstance(data, Mapping):
            raise ValueError("The server answer is not a JSON object.")
        image = data.get("image") or {}
        closer = data.get("closer_look")
        return cls(
            task=str(data.get("task", "")),
            prompt=str(data.get("prompt") or ""),
            text=str(data.get("text") or ""),
            answer=str(data.get("answer") or ""),
            model=dict(data.get("model") or {}),
            reasoning=[
                ReasoningStep(
                    step=int(s.get("step", n + 1)),
                    text=str(s.get("text", "")),
                    box_ids=[str(b) for b in s.get("box_ids") or []],
                )
                for n, s in enumerate(data.get("reasoning") or [])
            ],
            boxes=[
                Box(
                    id=str(b.get("id", f"b{n + 1}")),
                    label=str(b.get("label", "")),
                    xyxy=tuple(float(v) for v in b["xyxy"]),  # type: ignore[arg-type]
                    slice=None if b.get("slice") is None else int(b["slice"]),
                    score=None if b.get("score") is None else float(b["score"]),
                    source=str(b.get("source") or "text"),
                    text_xyxy=(None if b.get("text_xyxy") is None
                               else tuple(float(v) for v in b["text_xyxy"])),  # type: ignore[arg-type]
                    size_mm=(None if not b.get("size_mm")
                             else tuple(float(v) for v in b["size_mm"])),  # type: ignore[arg-type]
                )
                for n, b in enumerate(data.get("boxes") or [])
            ],
            masks=[
                Mask(
                    label=str(m.get("label", "")),
                    label_index=int(m.get("label_index", n + 1)),
                    slice=None if m.get("slice") is None else int(m["slice"]),
                    rle=m.get("rle"),
                    area_px=None if m.get("area_px") is None else int(m["area_px"]),
                    area_mm2=None if m.get("area_mm2") is None else float(m["area_mm2"]),
                    diameters_mm=(None if not m.get("diameters_mm")
                                  else tuple(float(v) for v in m["diameters_mm"])),  # type: ignore[arg-type]
                    score=None if m.get("score") is None else float(m["score"]),
                )
                for n, m in enumerate(data.get("masks") or [])
            ],
            image=ImageInfo(
                id=None if image.get("id") is None else str(image["id"]),
                shape=[int(v) for v in image.get("shape") or []],
                spacing=[float(v) for v in image.get("spacing") or []],
                axis=str(image.get("axis") or "axial"),
                slices=[int(v) for v in image.get("slices") or [] if v is not None],
                ijk_to_ras=None
                if not image.get("ijk_to_ras")
                else [[float(v) for v in row] for row in image["ijk_to_ras"]],
            ),
            timing_ms={
                str(k): float(v)
                for k, v in (data.get("timing_ms") or {}).items()
                if isinstance(v, (int, float))
            },
            warnings=[str(w) for w in data.get("warnings") or []],
            label_names={str(k): int(v) for k, v in (data.get("label_names") or {}).items()},
            volumes_ml={str(k): float(v) for k, v in (data.get("volumes_ml") or {}).items()},
            closer_look=None
            if not closer
            else CloserLook(
                roi=tuple(float(v) for v in closer["roi"]),  # type: ignore[arg-type]
                area_px_before=closer.get("area_px_before"),
                area_px_after=closer.get("area_px_after"),
                crop=None if not closer.get("crop") else tuple(float(v) for v in closer["crop"]),  # type: ignore[arg-type]
                crops=[tuple(float(v) for v in c) for c in closer.get("crops") or []],  # type: ignore[misc]
            ),
            raw=dict(data),
        )
