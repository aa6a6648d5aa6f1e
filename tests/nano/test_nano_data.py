"""The nano training data: block split with guard bands, answers the engine's parser reads back
exactly (labels, boxes, steps), DRR boxes inside the radiograph."""

from __future__ import annotations

import json

import numpy as np

import pytest
from citrusv.nano_data import (CASUAL_SHARE, DATA_VERSION, GUARD, HELD_OUT_BLOCKS, MIN_AREA_PX, NAMES,
                               build_samples, ct_items, data_is_current, detect_answer, drr,
                               drr_boxes, frame_map, report_answer, segment_answer, split_of)
from citrusv.parsing import parse_output



def test_split_blocks_and_guard_bands():
    for a, b in HELD_OUT_BLOCKS:
        assert b - a + 1 == 10
        assert all(split_of(k) == "test" for k in range(a, b + 1))
        for g in range(1, GUARD + 1):
            assert split_of(a - g) == "guard" and split_of(b + g) == "guard"
        assert split_of(a - GUARD - 1) == "train" and split_of(b + GUARD + 1) == "train"


def test_study_has_the_ten_structures(study):
    assert study.volume.shape == study.labels.shape
    for name in NAMES:
        assert study.mask(name).sum() > 0, name


def test_answers_parse_back_through_the_engine_parser(study):
    items = ct_items(study, 25)
    parsed = parse_output(report_answer(items, "CT"), "Write a report. Think step by step.")
    assert [b.label for b in parsed.boxes] == [it[0] for it in items]
    assert [b.xyxy for b in parsed.boxes] == [[float(v) for v in it[1]] for it in items]
    assert len(parsed.steps) == len(items) and all(s.box_ids for s in parsed.steps)
    assert "liver" in parsed.answer
    det = parse_output(detect_answer("left kidney", [1, 2, 30, 40]), "Detect the left kidney.")
    assert det.boxes[0].label == "left kidney" and det.boxes[0].xyxy == [1, 2, 30, 40]
    seg = parse_output(segment_answer("spinal cord"), "Segment the spinal cord.")
    assert seg.seg_labels == ["spinal cord"]


@pytest.fixture(scope="module")
def samples(study) -> list[dict]:
    return build_samples(study, [], [])


def test_no_held_out_or_guard_slice_is_trained_on(samples):
    train_slices = {s["slice"] for s in samples if s["split"] == "train"}
    assert not any(split_of(k) != "train" for k in train_slices)
    assert not any(s["split"] == "guard" for s in samples)


def test_drr_boxes_lie_inside_the_radiograph(study):
    img, pixel_mm = drr(study, (0, 133), (0, 512))
    h, w = img.shape
    assert img.dtype == np.uint8 and w == 512 and abs(h * pixel_mm - 133 * 2.5) < 3
    boxes = drr_boxes(study, (0, 133), (0, 512))
    assert {"liver", "right lung", "left lung", "heart"} <= set(boxes)
    for box in boxes.values():
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    fmap = frame_map(h, w)
    assert fmap.out_h % 28 == 0 and fmap.out_w % 28 == 0
    # the liver sits low and on the image left (patient's right) in an AP view
    x1, y1, x2, y2 = boxes["liver"]
    assert (x1 + x2) / 2 < w / 2 and (y1 + y2) / 2 > h / 2


def test_questions_come_as_typed_and_about_pairs_too(study, samples):
    """Besides the written phrasings: a share of every task's questions as typed in a hurry
    ("segment the liver"), and pair questions ("Find the kidneys.") answered with a box for
    each member on the slice, which the engine's parser reads back."""
    casual = [s for s in samples if s["prompt"][0].islower() or s["prompt"][-1] not in ".?"]
    assert abs(len(casual) / len(samples) - CASUAL_SHARE * (1 - 0.3 * 0.3)) < 0.02
    assert {s["task"] for s in casual} == {"segment", "detect", "report"}
    pairs = [s for s in samples if s["slice"] == 22 and s["structure"] == "kidneys"]
    assert len(pairs) == 3
    parsed = parse_output(pairs[0]["answer"], pairs[0]["prompt"])
    assert [b.label for b in parsed.boxes] == ["right kidney", "left kidney"]
    no_lungs = next(k for k in range(study.volume.shape[0]) if split_of(k) == "train" and all(
        study.mask(m, k).sum() < MIN_AREA_PX for m in ("right lung", "left lung")))
    assert {s["answer"] for s in samples if s["slice"] == no_lungs and s["structure"] == "lungs"
            } == {"No lungs are visible in this image."}


def test_training_rebuilds_data_of_an_older_builder(tmp_path):
    assert not data_is_current(tmp_path)
    (tmp_path / "samples.jsonl").write_text("")
    (tmp_path / "meta.json").write_text('{"seed": 0}')  # built before data_version existed
    assert not data_is_current(tmp_path)


def test_training_rebuilds_data_built_with_another_seed(tmp_path):
    (tmp_path / "samples.jsonl").write_text("")
    (tmp_path / "meta.json").write_text(json.dumps({"seed": 0, "data_version": DATA_VERSION}))
    assert data_is_current(tmp_path) and data_is_current(tmp_path, 0)
    assert not data_is_current(tmp_path, 1)

