"""The four Citrus-V infer tasks: request -> engine -> result JSON + label file in the study's geometry.

One class serves all four (`segment`, `detect`, `report`, `closer_look`); the engine routes by
prompt, the task name only fixes which parameters apply and what the JSON says it was.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from citrusv.engine import untaught_modality
from citrusv.io import is_picture
from citrusv.parsing import modality_warning

from .. import batch
from ..errors import RequestError
from ..images import Study, StudyCache, empty_label, paint, write_label
from ..leaving import CLIENT_GONE
from ..model import SharedModel
from ..params import AXES, InferParams, options, parse

logger = logging.getLogger(__name__)

TASK_TYPES = {
    "segment": InferType.SEGMENTATION,
    "detect": InferType.DETECTION,
    "report": InferType.OTHERS,
    "closer_look": InferType.SEGMENTATION,
}


def _input_error():
    try:
        from citrusv.errors import InputError
    except ImportError:  # engine not installed: nothing can raise it
        return ()
    return InputError


def _progress(image_id: str):
    """The engine's `progress` callback for a slice range asked now: on a batch's thread the
    batch's (its progress line, its stop); for a question, one that stops the range once its
    client has gone (`lib.leaving`), with a line in the log; None for neither."""
    in_batch = batch.progress(image_id)
    gone = CLIENT_GONE.get()
    if in_batch is not None or gone is None:
        return in_batch

    def check(asked: int, total: int) -> None:
        if gone.is_set():
            said = (f"the question about {image_id} was stopped after {asked} of {total} "
                    "slices: its client closed the connection before the answer came.")
            logger.info("Citrus-V: %s", said[0].upper() + said[1:])
            raise RequestError(said, status_code=499)  # nginx's "client closed request"
    return check


class CitrusVInfer(InferTask):
    """One Citrus-V task over HTTP (`citrusv_<task>`)."""

    def __init__(self, task: str, model: SharedModel, studies: StudyCache, description: str,
                 closer_look_margin: float = 0.15) -> None:
        super().__init__(
            type=TASK_TYPES[task],
            labels=None,
            dimension=2,
            description=description,
            config=options(task),  # roi and label for the closer look only
        )
        self.task = task
        self.model = model
        self.studies = studies
        self.closer_look_margin = closer_look_margin
        self.volume_batch_size = 8  # slices per batched SAM2 encode in slice ranges

    def is_valid(self) -> bool:
        return True  # listed in /info even before the checkpoint exists (status says why)

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["task"] = self.task
        out["status"] = self.model.status()
        out["axes"] = list(AXES)
        # questions the served model is known to answer as this task (the Slicer module shows
        # them as its examples); [] when the model dir names none
        out["examples"] = self.model.example_prompts(self.task)
        return out

    # -- request ---------------------------------------------------------------------------
    def __call__(self, request: dict) -> tuple[str, dict]:
        start = time.perf_counter()
        study = self.studies.get(request.get("image") or "")
        params = parse(request, study, self.task)
        engine, version = self.model.engine()
        image_id = request.get("image_id") or _image_id(request.get("image", ""))
        try:
            result = self._ask(engine, study, params, image_id)
        except _input_error() as e:
            raise RequestError(str(e)) from e
        picture = is_picture(study.path)
        if uneven := study.meta.get("uneven_slices"):
            result.warnings.insert(0, uneven)  # of the image itself, first
        if not study.spacing_known and (result.masks or result.boxes
                                        or "mm" in (result.answer or "")):
            result.warnings.append(no_spacing_warning(
                picture, from_slicer=bool(study.meta.get("pixel_size_unknown"))))
        untaught_modality(result, study.modality, engine.config.mask_modalities, picture=picture)
        if picture and study.array.dtype != np.uint8 and params.window is None:
            result.warnings.append(unwindowed_picture_warning(study.array))
        label_file, out = self._respond(study, params, result, version, image_id)
        out.setdefault("timing_ms", {})["server_total"] = round((time.perf_counter() - start) * 1e3, 2)
        return label_file, out

    def _ask(self, engine, study: Study, p: InferParams, image_id: str):
        # no pixel size in the file: nothing is measured in mm (1 mm pixels would give a
        # radiograph's lung box as 1026 x 1222 mm)
        spacing = study.spacing if study.spacing_known else None
        if p.is_range:
            return engine.ask_volume(study.array, p.prompt, slices=p.slices, axis=p.axis,
                                     window=p.window, task=self.task, spacing=spacing,
                                     image_id=image_id, batch_size=self.volume_batch_size,
                                     progress=_progress(image_id))
        plane = study.plane(p.slices[0], p.axis)
        common = dict(window=p.window, slice_index=None if study.is_2d else p.slices[0],
                      spacing=study.plane_spacing(p.axis) if spacing else None,
                      image_id=image_id)
        if self.task == "closer_look":
            return engine.closer_look(plane, p.prompt, roi=p.roi, margin=self.closer_look_margin,
                                      label=p.label, **common)
        return engine.ask(plane, p.prompt, task=self.task, **common)

    # -- response --------------------------------------------------------------------------
    def _respond(self, study: Study, p: InferParams, result, version: str,
                 image_id: str) -> tuple[str, dict]:
        slice_index = None if study.is_2d else p.slices[0]
        label_names: dict[str, int] = {}
        label = empty_label(study)
        for mask in result.masks:
            name = p.label if (self.task == "closer_look" and p.label) else mask.label
            mask.label = name
            mask.label_index = label_names.setdefault(name, len(label_names) + 1)
            if mask.spacing is None and study.spacing_known:
                mask.spacing = study.plane_spacing(p.axis)
            if np.ndim(mask.array) == 2:
                mask.slice = slice_index
            elif study.is_2d:
                mask.slices = []
            paint(label, mask.array, mask.label_index, slice_index, p.axis)
        for box in result.boxes:
            if box.slice is None and not p.is_range:
                box.slice = slice_index

        out = result.to_json()
        out["task"] = self.task
        out["prompt"] = p.prompt
        out.setdefault("model", {})["version"] = version
        if (use := self.model.intended_use()) is not None:  # shown with the answer in Slicer
            out["model"]["intended_use"] = use
        out["image"] = {
            "id": image_id,
            "shape": list(study.shape),
            # null where the file gives no pixel size (ijk_to_ras then has 1 mm, for the label)
            "spacing": study.spacing if study.spacing_known else None,
            "ijk_to_ras": [[round(float(v), 6) for v in row] for row in study.affine],
            "axis": p.axis_name,
            "slices": [] if study.is_2d else list(p.slices),
            # the window the engine applied ("abdomen", "L40W400"; "auto": none sent)
            "window": (out.get("image") or {}).get("window"),
        }
        out["warnings"] = list(p.warnings) + list(out.get("warnings") or [])
        if kind := modality_warning(result.answer or result.text, study.modality):
            out["warnings"].append(kind)
        out["label_names"] = label_names
        return write_label(study, label), out


def no_spacing_warning(picture: bool, from_slicer: bool = False) -> str:
    """Said where the image file gives no pixel size (`Study.spacing_known`): its masks and
    boxes come with no mm, and the mm an answer writes are not checked against them.
    `from_slicer`: a volume the Slicer module uploaded with `pixel_size:=unknown`."""
    what = ("this picture file gives no pixel size" if picture else
            "this volume sent from Slicer does not have its DICOM image's pixel size (the "
            "DICOM gives none, or Slicer shows the image at another size than its "
            "PixelSpacing or ImagerPixelSpacing)" if from_slicer else
            "this DICOM image gives no pixel size (no PixelSpacing or ImagerPixelSpacing above "
            "zero)")
    return (f"{what}, so its masks and boxes are measured in pixels only: no size in mm is "
            "given or checked, and sizes in mm the answer writes are the model's own, unchecked "
            "against the image.")


def unwindowed_picture_warning(values: np.ndarray) -> str:
    """Said when a picture of more than 8 bits a pixel (a 16-bit PNG: its values kept, see
    `images._read_picture`) is asked about with no window: the engine scales it by its
    percentiles, which is no CT window (nano marked 55037 px of "liver" on held-out slice 25
    exported in HU + 1024 so; 12871 px, against the reference's 13180, with [1064, 400])."""
    return (f"this picture has values of more than 8 bits ({float(values.min()):g} to "
            f"{float(values.max()):g}) and no window was sent, so they were scaled by their "
            "percentiles, not by a CT window: if it is a CT slice, send window [level, width] "
            "in its values (a slice exported as HU + 1024 takes [1064, 400] for the abdomen).")


def _image_id(path: str) -> str:
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name or "upload"
