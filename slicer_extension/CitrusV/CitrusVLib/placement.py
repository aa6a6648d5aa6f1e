"""Turn a result's 2D masks (or its label file) into per-structure ``[k, j, i]`` volumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .geometry import AXES, check_axis, put_slice, slice_shape
from .label_io import LabelVolume
from .result import Result


@dataclass
class StructureMask:
    """One structure's voxels in the volume and the slices the server answered for."""

    label: str
    label_index: int
    mask: np.ndarray  # bool [k, j, i]
    slices: set[int] = field(default_factory=set)  # empty = the whole volume was answered
    axis: str = "axial"

    def merge_into(self, existing: np.ndarray | None) -> np.ndarray:
        """Replace only the answered slices of an existing mask (the user's other slices stay)."""
        if existing is None or not self.slices or existing.shape != self.mask.shape:
            return self.mask.astype(np.uint8)
        merged = (existing > 0).astype(np.uint8)
        axis_index = AXES.index(self.axis)
        for s in self.slices:
            index = [slice(None)] * 3
            index[axis_index] = s
            merged[tuple(index)] = self.mask[tuple(index)]
        return merged


def structure_masks(
    result: Result,
    volume_shape_kji: Sequence[int],
    axis: str | None = None,
) -> dict[str, StructureMask]:
    """Place every RLE mask of ``result`` on its slice; one entry per structure name."""
    axis = check_axis(axis or result.image.axis or "axial")
    shape = tuple(int(v) for v in volume_shape_kji)
    h, w = slice_shape(shape, axis)
    single = shape[AXES.index(axis)] == 1  # a 2D image (X-ray) loaded as a one-slice volume
    answered = {int(s) for s in result.image.slices} or ({0} if single else set())
    out: dict[str, StructureMask] = {}
    for m in result.masks:
        if m.rle is None:
            continue
        slice_index = 0 if (m.slice is None and single) else m.slice
        if slice_index is None:
            raise ValueError(
                f"Mask '{m.label}' has no slice index; a 3D answer needs its label file."
            )
        plane = m.array()
        if plane.shape != (h, w):
            raise ValueError(
                f"Mask '{m.label}' is {plane.shape[1]}x{plane.shape[0]} but {axis} slices of this "
                f"volume are {w}x{h}: the result is for another image."
            )
        entry = out.get(m.label)
        if entry is None:
            entry = out[m.label] = StructureMask(
                m.label, m.label_index, np.zeros(shape, dtype=bool), set(), axis
            )
        put_slice(entry.mask, axis, slice_index, plane)
        entry.slices.add(int(slice_index))
    for entry in out.values():  # every slice the server looked at is replaced, found or not
        entry.slices |= answered
    # structures named but with an empty answer still get a (blank) entry on the asked slices
    for name, index in result.labels().items():
        if name not in out:
            out[name] = StructureMask(name, index, np.zeros(shape, dtype=bool), set(answered), axis)
    return out


def structure_masks_from_label_volume(
    volume: LabelVolume,
    label_names: Mapping[str, int],
    ijk_to_ras: np.ndarray | None = None,
    slices: Sequence[int] | None = None,
    axis: str = "axial",
    tolerance_mm: float = 1e-3,
) -> dict[str, StructureMask]:
    """Split a server label file into structures; checks it has the volume's geometry."""
    if ijk_to_ras is not None and not np.allclose(volume.ijk_to_ras, ijk_to_ras, atol=tolerance_mm):
        raise ValueError(
            "The label file's geometry differs from the volume's: it belongs to "
            "another image or the server resampled it."
        )
    return {
        name: StructureMask(
            name, int(index), volume.array == int(index), set(int(s) for s in slices or []), axis
        )
        for name, index in label_names.items()
    }
