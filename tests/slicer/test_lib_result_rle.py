"""RLE decoding (docs/api.md) and result parsing into plain objects."""

from __future__ import annotations

import numpy as np
import pytest
from CitrusVLib import Result, decode_rle, encode_rle
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


def test_decode_known_mask():
    # 3 × 4, row-major, starts with a run of zeros
    rle = {"size": [3, 4], "counts": [1, 2, 3, 4, 2]}
    expected = np.array([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=bool)
    assert np.array_equal(decode_rle(rle), expected)
    assert encode_rle(expected) == rle


def test_mask_starting_with_ones_has_a_zero_length_first_run():
    mask = np.array([[1, 1], [0, 1]], dtype=bool)
    assert encode_rle(mask) == {"size": [2, 2], "counts": [0, 2, 1, 1]}
    assert np.array_equal(decode_rle({"size": [2, 2], "counts": [0, 2, 1, 1]}), mask)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_rle_round_trip(mask):
    rle = encode_rle(mask)
    assert sum(rle["counts"]) == mask.size
    assert np.array_equal(decode_rle(rle), mask)


def test_bad_rle_is_refused():
    with pytest.raises(ValueError, match="sum to 5"):
        decode_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="non-negative"):
        decode_rle({"size": [1, 2], "counts": [3, -1]})


def test_result_parses_every_field(sample_result):
    r = Result.from_json(sample_result)
    assert r.task == "report" and r.answer.startswith("The liver")
    assert [b.name for b in r.boxes] == ["b1 liver 0.90", "b2 spleen 0.70"]
    assert r.boxes[0].xyxy == (15.0, 10.0, 35.0, 20.0) and r.boxes[0].slice == 3
    assert [b.id for b in r.boxes_for_step(2)] == ["b1", "b2"]
    assert r.boxes_for_step(9) == []
    mask = r.masks[0].array()
    assert mask.shape == (40, 60) and mask.sum() == 200 and mask[10, 15] and not mask[9, 15]
    assert r.image.slices == [3] and r.image.axis == "axial"
    assert r.labels() == {"liver": 1}
    assert r.timing_ms["total"] == 6.0
    assert r.closer_look is None


def test_result_minimal_and_closer_look():
    r = Result.from_json(
        {
            "task": "closer_look",
            "masks": [{"label": "liver", "slice": None}],
            "closer_look": {"roi": [1, 2, 3, 4], "area_px_before": 5, "area_px_after": 6},
        }
    )
    assert r.closer_look.roi == (1.0, 2.0, 3.0, 4.0)
    assert r.masks[0].slice is None and r.masks[0].label_index == 1
    with pytest.raises(ValueError, match="no RLE"):
        r.masks[0].array()
    with pytest.raises(ValueError, match="not a JSON object"):
        Result.from_json(["nope"])


def test_shown_answer_has_the_warnings_and_the_model_s_intended_use(sample_result):
    r = Result.from_json(sample_result)
    assert r.intended_use is None and r.shown_text() == "The liver is normal in size."
    r = Result.from_json({**sample_result, "warnings": ["Slice 3 is outside the CT."],
                          "model": {**sample_result["model"],
                                    "intended_use": "Demonstration only; not for clinical use."}})
    assert r.shown_text() == ("The liver is normal in size.\n\nWarnings:\n- Slice 3 is outside "
                              "the CT.\n\nIntended use: Demonstration only; not for clinical use.")
    # a slice range's volumes (the server's answer says them) are kept in the record
    r = Result.from_json({**sample_result, "volumes_ml": {"liver": 1022.64, "spleen": 129.99},
                          "image": {**sample_result["image"], "slices": [26, 27, 28]}})
    assert r.volumes_ml == {"liver": 1022.64, "spleen": 129.99}
    assert "Volumes over slices 26-28: liver 1022.6 mL; spleen 130.0 mL" in r.record()


def test_box_from_the_models_mask_says_so(sample_result):
    """A server with box_source "mask" sends the box of the model's mask and the written one:
    the ROI name and the answer's record say which is shown; a result without `source`
    (an older server) reads as written boxes."""
    boxes = [{**sample_result["boxes"][0], "source": "mask",
              "text_xyxy": [12.5, 8.0, 30.0, 22.0]}, sample_result["boxes"][1]]
    r = Result.from_json({**sample_result, "boxes": boxes})
    assert [b.name for b in r.boxes] == ["b1 liver 0.90 (from mask)", "b2 spleen 0.70"]
    assert r.boxes[0].text_xyxy == (12.5, 8.0, 30.0, 22.0) and r.boxes[1].source == "text"
    record = r.record()
    assert ("b1 liver: slice 3, [15, 10, 35, 20] (from the liver mask, written "
            "[12.5, 8, 30, 22]), score 0.90") in record
    assert "b2 spleen: slice 3, [40, 25, 55, 38], score 0.70" in record
    # a structure the answer called not visible, boxed from the model's mask: nothing written
    unwritten = [{**sample_result["boxes"][0], "source": "mask", "text_xyxy": None,
                  "score": None}]
    r = Result.from_json({**sample_result, "boxes": unwritten})
    assert [b.name for b in r.boxes] == ["b1 liver (from mask)"]
    assert "b1 liver: slice 3, [15, 10, 35, 20] (from the liver mask)" in r.record().splitlines()
    # a server that knows the image's spacing sends each box's size in mm, measured
    sized = [{**sample_result["boxes"][0], "source": "mask", "size_mm": [14.06, 7.03]}]
    r = Result.from_json({**sample_result, "boxes": sized})
    assert r.boxes[0].size_mm == (14.06, 7.03)
    assert ("b1 liver: slice 3, [15, 10, 35, 20], 14 x 7 mm (from the liver mask), score "
            "0.90") in r.record().splitlines()


def test_an_roi_name_gives_back_its_structure():
    """A closer look from a selected box sends the box's structure: from the ROI node's
    BoxLabel attribute, else (a scene saved before) from its name as Box.name wrote it."""
    from CitrusVLib.result import Box, RangeBox, box_label

    for box in (Box("b1", "liver", (1, 2, 3, 4), 3, 0.9, "mask"),
                Box("b12", "right kidney", (1, 2, 3, 4), 3, None, "text"),
                Box("b2", "left lung", (1, 2, 3, 4), 3, 0.25, "text"),
                Box("b3", "spinal cord", (1, 2, 3, 4), None, None, "mask")):
        assert box_label(box.name) == box.label, box.name
    assert box_label("b1 liver 0.90 (from mask)") == "liver"
    assert box_label(RangeBox("left kidney", ["b1", "b2"], (1, 2, 3, 4), 4, 9).name) == (
        "left kidney")
