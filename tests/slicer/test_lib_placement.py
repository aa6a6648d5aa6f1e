"""Placing a result's 2D masks into per-structure volumes (CitrusVLib.placement)."""

from __future__ import annotations

import numpy as np
import pytest
from CitrusVLib import Result, encode_rle
from CitrusVLib.label_io import LabelVolume
from CitrusVLib.placement import structure_masks, structure_masks_from_label_volume


def plane(h, w, rows, cols):
    m = np.zeros((h, w), bool)
    m[rows, cols] = True
    return m


def test_range_answer_replaces_every_answered_slice_even_empty_ones():
    found = plane(5, 6, slice(1, 3), slice(2, 4))
    result = Result.from_json(
        {
            "task": "segment",
            "image": {"axis": "coronal", "slices": [1, 2, 3]},
            "masks": [{"label": "aorta", "label_index": 3, "slice": 2, "rle": encode_rle(found)}],
        }
    )
    out = structure_masks(result, (5, 4, 6), "coronal")  # coronal slices are (k=5, i=6)
    aorta = out["aorta"]
    assert aorta.label_index == 3 and aorta.slices == {1, 2, 3}
    assert np.array_equal(aorta.mask[:, 2, :], found) and aorta.mask.sum() == found.sum()
    existing = np.ones((5, 4, 6), np.uint8)
    merged = aorta.merge_into(existing)
    assert merged[:, 0, :].all()  # not answered: kept
    assert not merged[:, 1, :].any()  # answered, nothing found: cleared
    assert np.array_equal(merged[:, 2, :] > 0, found)  # answered: replaced


def test_two_d_image_masks_without_slice_go_to_the_only_slice():
    m = plane(8, 9, slice(0, 2), slice(0, 3))
    result = Result.from_json(
        {
            "task": "segment",
            "image": {"axis": "axial", "slices": []},
            "masks": [{"label": "heart", "label_index": 1, "slice": None, "rle": encode_rle(m)}],
        }
    )
    out = structure_masks(result, (1, 8, 9))
    assert np.array_equal(out["heart"].mask[0], m) and out["heart"].slices == {0}


def test_mask_of_another_image_is_refused():
    result = Result.from_json(
        {
            "task": "segment",
            "masks": [
                {
                    "label": "liver",
                    "label_index": 1,
                    "slice": 0,
                    "rle": encode_rle(np.zeros((3, 3), bool)),
                }
            ],
        }
    )
    with pytest.raises(ValueError, match="result is for another image"):
        structure_masks(result, (2, 4, 4))


def test_label_file_split_by_label_names():
    label = np.zeros((2, 3, 4), np.uint8)
    label[0, 0, 0] = 1
    label[1, 2, 3] = 2
    out = structure_masks_from_label_volume(LabelVolume(label, np.eye(4)), {"a": 1, "b": 2})
    assert out["a"].mask.sum() == 1 and out["b"].mask[1, 2, 3] and out["b"].slices == set()
