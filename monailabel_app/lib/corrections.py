"""Final labels (radiologists' corrections) -> 2D training samples for the segmentation stage.

Each structure of each final label gives its axial slices that contain it (positives) plus a
few slices well outside its extent (negatives, empty target). Validation holds out every
`val_every`-th positive slice of each structure, so Dice is measured on slices never trained on.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from citrusv.imaging import resolve_window
from citrusv.parsing import segment_structure
from citrusv.training import dice_score

from .errors import RequestError
from .images import read_study
from .params import parse

logger = logging.getLogger(__name__)

NEGATIVE_GAP = 3  # slices between a structure's extent and the nearest negative


@dataclass
class Sample:
    """One slice, the structure asked for, and its target mask (empty for a negative)."""

    image: np.ndarray  # 2D plane in scanner units
    mask: np.ndarray  # bool, same shape
    prompt: str
    label: str
    window: str | list[float] | None
    image_id: str
    slice_index: int

    @property
    def positive(self) -> bool:
        return bool(self.mask.any())


def _names(info: dict, values: list[int]) -> dict[int, tuple[str, str, object]]:
    """label value -> (name, prompt, window) from the saved params: each structure's own
    (kept by the datastore's merge), else the label's, else "Segment the <name>." (a segment
    "Liver" or "Liver 2": "Segment the liver.", in the model's words)."""
    names: dict[int, tuple[str, str, object]] = {}
    entries = info.get("label_info") or []
    prompt = info.get("prompt") if isinstance(info.get("prompt"), str) else None
    for entry in entries:
        try:
            idx = int(entry["idx"])
        except (KeyError, TypeError, ValueError):
            continue
        name = str(entry.get("name") or f"label {idx}")
        own = entry.get("prompt") if isinstance(entry.get("prompt"), str) else None
        names[idx] = (name, own or (prompt if (prompt and len(entries) == 1)
                                    else f"Segment the {segment_structure(name) or name}."),
                      entry.get("window", info.get("window")))
    for v in values:
        names.setdefault(v, (f"label {v}", prompt or f"Segment the label {v}.", info.get("window")))
    return names


def collect(datastore: Datastore, negatives_per_positive: float = 0.5, max_per_structure: int = 64,
            seed: int = 0) -> list[Sample]:
    """Every structure in every final label, as 2D samples along the axial axis (on a PACS,
    after importing the DICOM SEGs that other tools stored there: `PacsDatastore`)."""
    import_segs = getattr(datastore, "import_pacs_segs", None)
    if import_segs is not None:
        import_segs()
    rng = random.Random(seed)
    samples: list[Sample] = []
    for image_id in sorted(datastore.get_labeled_images()):
        info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL)
        try:
            study = read_study(datastore.get_image_uri(image_id))
            label = read_study(datastore.get_label_uri(image_id, DefaultLabelTag.FINAL))
        except RequestError as e:
            logger.warning("Skipping final label of %s: %s", image_id, e.detail)
            continue
        if label.shape != study.shape:
            logger.warning("Skipping %s: label shape %s != image %s", image_id, label.shape,
                           study.shape)
            continue
        values = [int(v) for v in np.unique(label.array) if v]
        for value, (name, prompt, window) in _names(info, values).items():
            if value not in values:
                continue
            try:
                window = parse({"prompt": "x", "slice": 0 if study.is_2d else None,
                                "window": window}, study, "segment").window
                if window is not None:
                    resolve_window(window)  # what the engine will do with it
            except (RequestError, ValueError) as e:  # saved before the save-time checks
                logger.warning("Skipping %s of %s: %s", name, image_id, getattr(e, "detail", e))
                continue
            present = (label.array == value).reshape(study.shape[0], -1).any(axis=1)
            pos = [int(k) for k in np.flatnonzero(present)]
            # negatives only well outside the structure's extent: a correction may label just
            # some of its slices, and the unlabelled ones in between are not "absent"
            neg = [k for k in range(study.shape[0])
                   if k < pos[0] - NEGATIVE_GAP or k > pos[-1] + NEGATIVE_GAP]
            if len(pos) > max_per_structure:
                pos = [pos[int(i)] for i in np.linspace(0, len(pos) - 1, max_per_structure)]
            n_neg = min(len(neg), max(1, int(round(len(pos) * negatives_per_positive))))
            n_neg = n_neg if negatives_per_positive > 0 else 0
            for k in pos + rng.sample(neg, n_neg):
                samples.append(Sample(study.plane(k, 0), label.array[k] == value, prompt, name,
                                      window, image_id, k))
    return samples


def split(samples: list[Sample], val_every: int = 5) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): every `val_every`-th positive slice per structure is held out."""
    train, val = [], []
    seen: dict[tuple[str, str], int] = {}
    for s in samples:
        if s.positive:
            key = (s.image_id, s.label)
            seen[key] = seen.get(key, 0) + 1
            if val_every and seen[key] % val_every == 0:
                val.append(s)
                continue
        train.append(s)
    return train, val


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two masks of any dtype (non-zero = in); 1.0 when both are empty."""
    return dice_score(pred.astype(bool), target.astype(bool))
