"""Infer request parameters (docs/api.md) checked against the study they apply to.

Every check fails with a `RequestError` whose sentence names the field and the fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from citrusv.parsing import segment_structure

from .errors import RequestError
from .images import Study

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
CT_DEFAULT_WINDOW = "abdomen"
# the params each task reads; /info/ lists them as the model's config (the stock MONAI Label
# module offers each as an option, with these defaults)
OPTIONS = {"prompt": "", "slice": "", "axis": "axial", "window": ""}
CLOSER_LOOK_OPTIONS = {**OPTIONS, "roi": "", "label": ""}


def options(task: str) -> dict[str, str]:
    return dict(CLOSER_LOOK_OPTIONS if task == "closer_look" else OPTIONS)


def _misspelt_options(request: dict) -> dict[str, str]:
    """Keys that read as an option misspelt ("slices" -> "slice", "windw" -> "window"): left
    out, they would leave the answer about the middle slice or in the default window without a
    word. Other keys (MONAI Label's own, a client's) are not options and pass silently."""
    out = {}
    for key in request:
        if not isinstance(key, str) or key in CLOSER_LOOK_OPTIONS:
            continue
        near = difflib.get_close_matches(key.lower(), list(CLOSER_LOOK_OPTIONS), n=1, cutoff=0.75)
        if near:
            out[key] = near[0]
    return out


@dataclass
class InferParams:
    """What one infer request asks, resolved against its study."""

    prompt: str
    slices: list[int]  # voxel indices along `axis`; [0] for a 2D image
    axis: int
    axis_name: str
    window: str | list[float] | None
    roi: list[float] | list[list[float]] | None = None  # a box, or one per region
    label: str | None = None
    is_range: bool = False  # "all" or [first, last]: the answer is 3D
    warnings: list[str] = field(default_factory=list)


def _prompt(raw: Any, required: bool) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if required:
            raise RequestError("prompt is missing or empty; send a question such as "
                               "\"Segment the liver.\" in params.prompt.")
        return ""
    if not isinstance(raw, str):
        raise RequestError("prompt must be a string; send the question as text.")
    if len(raw) > 4000:
        raise RequestError("prompt is longer than 4000 characters; shorten the question.")
    return raw.strip()


def _axis(raw: Any, study: Study) -> tuple[int, str]:
    if raw is None or raw == "":
        return 0, "axial"
    name = str(raw).strip().lower()
    if name not in AXES:
        raise RequestError(f"axis '{raw}' is invalid; use one of axial, coronal, sagittal.")
    if study.is_2d and name != "axial":
        raise RequestError(f"axis '{name}' does not apply to a 2D image; leave axis out.")
    return AXES[name], name


def _int(raw: Any, what: str) -> int:
    if isinstance(raw, bool):
        raise RequestError(f"{what} must be a whole number, not {raw}.")
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw.strip())
    raise RequestError(f"{what} must be a whole number, \"all\" or [first, last]; got {raw!r}.")


def _slices(raw: Any, study: Study, axis: int, axis_name: str) -> tuple[list[int], bool, list[str]]:
    if study.is_2d:  # its one plane: slice 0, or all its slices
        if raw in (None, "", 0, "0", [0, 0]) or (isinstance(raw, str)
                                                 and raw.strip().lower() == "all"):
            return [0], False, []
        raise RequestError(f"slice {raw!r} does not apply to a 2D image; leave slice out.")
    count = study.shape[axis]

    def check(k: int) -> int:
        if not 0 <= k < count:
            raise RequestError(f"slice {k} is out of range; this image has {count} {axis_name} "
                               f"slices, numbered 0 to {count - 1}.")
        return k

    if raw is None or raw == "":
        middle = count // 2
        return [middle], False, [f"slice was not given; used the middle {axis_name} slice {middle}."]
    if isinstance(raw, str) and raw.strip().lower() == "all":
        return list(range(count)), True, []
    if isinstance(raw, (list, tuple)):
        if len(raw) != 2:
            raise RequestError("slice as a list must be [first, last]; send two slice numbers.")
        first, last = check(_int(raw[0], "slice")), check(_int(raw[1], "slice"))
        if last < first:
            raise RequestError(f"slice [{first}, {last}] is reversed; send [first, last] with "
                               "first <= last.")
        return list(range(first, last + 1)), True, []
    return [check(_int(raw, "slice"))], False, []


def _window(raw: Any, study: Study) -> str | list[float] | None:
    if raw is None or raw == "":
        ct_like = study.modality == "CT" or (
            not study.is_2d and study.array.dtype.kind in "if" and float(study.array.min()) < -500)
        return CT_DEFAULT_WINDOW if ct_like else None
    if isinstance(raw, str):
        return raw.strip().lower()
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        try:
            level, width = float(raw[0]), float(raw[1])
        except (TypeError, ValueError):
            raise RequestError("window must be a preset name or [level, width] numbers.") from None
        if not width > 0:
            raise RequestError("window width must be a positive number of HU.")
        return [level, width]
    raise RequestError("window must be a preset name (abdomen, lung, bone, soft_tissue) "
                       "or [level, width].")


# a closer look takes one model pass per box (citrusv.engine.MAX_CLOSER_LOOK_ROIS)
MAX_ROIS = 8


def _roi(raw: Any, plane_hw: tuple[int, int]) -> list[float] | list[list[float]] | None:
    """One box [x1, y1, x2, y2], or a list of boxes (a closer look at each, e.g. one per
    part of a segment: the ascending and the descending aorta)."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, (list, tuple)) and raw and all(isinstance(r, (list, tuple)) for r in raw):
        if len(raw) > MAX_ROIS:
            raise RequestError(f"roi lists {len(raw)} boxes; send at most {MAX_ROIS}, one per "
                               "region to look at.")
        return [_one_roi(r, plane_hw) for r in raw]
    return _one_roi(raw, plane_hw)


def _one_roi(raw: Any, plane_hw: tuple[int, int]) -> list[float]:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise RequestError("roi must be [x1, y1, x2, y2] in slice pixels, or a list of such "
                           "boxes.")
    try:
        x1, y1, x2, y2 = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise RequestError("roi must be four numbers [x1, y1, x2, y2] in slice pixels.") from None
    h, w = plane_hw
    x1, x2 = max(0.0, x1), min(float(w), x2)
    y1, y2 = max(0.0, y1), min(float(h), y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise RequestError(f"roi {list(raw)} is empty inside the {w}x{h} slice; send "
                           "[x1, y1, x2, y2] with x1 < x2 and y1 < y2 in slice pixels.")
    return [x1, y1, x2, y2]


def check_question(request: dict, task: str) -> tuple[str, str | None]:
    """The checks of an infer request for `task` that need no image: a closer look's options
    sent to another task, the prompt (missing, misspelt, not text) and, for a closer look
    without one, its label. Returns (prompt, label). `parse` runs them first; a batch
    inference runs them once before it starts (main.py)."""
    label = request.get("label")
    if label is not None and not isinstance(label, str):
        label = None  # MONAI Label puts an uploaded label *file* path here; not a name
    if label is not None and label.startswith("/") and label.endswith((".nii.gz", ".nrrd", ".bin")):
        label = None
    if task != "closer_look":  # asked elsewhere, a region or a segment name would be dropped
        for field, value in (("roi", request.get("roi")), ("label", label)):
            if value is not None and value != "" and value != []:
                raise RequestError(f"{field} is used only by a closer look; send the request to "
                                   f"/infer/citrusv_closer_look, or leave {field} out to ask "
                                   "about the whole slice.")
    misspelt = _misspelt_options(request)
    if request.get("prompt") is None and "prompt" in misspelt.values() and task != "closer_look":
        key = next(k for k, v in misspelt.items() if v == "prompt")
        raise RequestError(f"prompt is missing (params.{key} is not an option); send the "
                           "question in params.prompt.")
    prompt = _prompt(request.get("prompt"), required=task != "closer_look")
    if task == "closer_look" and not prompt:
        if not label:
            raise RequestError("closer look needs a prompt or a label; send params.prompt such as "
                               "\"Segment the liver.\" or params.label.")
        # a segment "Liver 2": the liver; one naming nothing ("Segment_1"): the engine says so
        structure = segment_structure(label)
        prompt = f"Segment the {structure}." if structure else ""
    return prompt, label


def parse(request: dict, study: Study, task: str) -> InferParams:
    """Check and resolve one infer request for `task` (segment, detect, report, closer_look)."""
    prompt, label = check_question(request, task)
    misspelt = _misspelt_options(request)
    axis, axis_name = _axis(request.get("axis"), study)
    slices, is_range, warnings = _slices(request.get("slice"), study, axis, axis_name)
    if is_range and task == "closer_look":  # a report over a range: each slice's, and a summary
        raise RequestError("closer look works on one slice; send slice as a single number.")
    plane_shape = study.plane(slices[0], axis).shape[:2]
    roi = _roi(request.get("roi"), plane_shape) if task == "closer_look" else None
    return InferParams(prompt=prompt, slices=slices, axis=axis, axis_name=axis_name,
                       window=_window(request.get("window"), study), roi=roi, label=label,
                       is_range=is_range,
                       warnings=[f"params.{key} is not an option, so it was left out; did you "
                                 f"mean {near}?" for key, near in misspelt.items()] + warnings)
