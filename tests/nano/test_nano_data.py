"""The nano training data: block split with guard bands, answers the engine's parser reads back
exactly (labels, boxes, steps), DRR boxes inside the radiograph."""

from __future__ import annotations

import numpy as np

from citrusv.nano_data import (GUARD, HELD_OUT_BLOCKS, NAMES, augment_slice, build_samples,
                               ct_items, detect_answer, drr, drr_boxes, frame_map, mask_box,
                               moved_answer, report_answer, segment_answer, split_of)
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


def test_no_held_out_or_guard_slice_is_trained_on(study):
    samples = build_samples(study, [], [])
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


class _Fixed:
    """A stand-in rng that returns preset uniforms (zoom, then dy, then dx)."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, lo, hi):
        return self.values.pop(0)


def test_augmented_slice_moves_image_and_labels_together(study):
    k = 50
    # zoom 1.0, shift down 0.05 * 512 = 25.6 px, left -0.1 * 512 = -51.2 px
    img, lab = augment_slice(study.volume[k], study.labels[k], _Fixed(0.0, 0.05, -0.1))
    assert img.shape == lab.shape == study.volume[k].shape and img.dtype == np.int16
    liver = NAMES.index("liver") + 1
    before, after = mask_box(study.labels[k] == liver), mask_box(lab == liver)
    assert abs((after[1] - before[1]) - 25.6) <= 1 and abs((after[0] - before[0]) + 51.2) <= 1
    # the image moved with it: the CT inside the moved liver is the CT inside the old one
    assert abs(np.median(img[lab == liver]) - np.median(study.volume[k][study.labels[k] == liver])) < 5
    assert img[0, -1] == -1000  # what came into view is air
    # zoom 1.1 about the centre: box sides grow by 10 %
    _, lab = augment_slice(study.volume[k], study.labels[k], _Fixed(0.1, 0.0, 0.0))
    b = mask_box(lab == liver)
    assert abs((b[2] - b[0]) - 1.1 * (before[2] - before[0])) <= 2


def test_moved_answers_cite_moved_boxes_with_anatomical_sides_and_sizes(study):
    k = 50
    _, lab = augment_slice(study.volume[k], study.labels[k], _Fixed(0.1, 0.0, 0.08))
    plain, moved = {i[0]: i for i in ct_items(study, k)}, {i[0]: i for i in ct_items(study, k, lab)}
    assert set(moved) == set(plain)
    for name in plain:
        assert moved[name][2:] == plain[name][2:]  # laterality, mm sizes: the anatomy's
    liver = NAMES.index("liver") + 1
    x1, y1, x2, y2 = frame_map(512, 512).to_frame(mask_box(lab == liver))
    box = [int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))]
    assert moved["liver"][1] == box
    det = parse_output(moved_answer(dict(task="detect", slice=k, structure="liver"), study, lab),
                       "Detect the liver.")
    assert det.boxes[0].xyxy == [float(v) for v in box]
    rep = parse_output(moved_answer(dict(task="report", slice=k, structure=None), study, lab),
                       "Write a report. Think step by step.")
    assert [b.xyxy for b in rep.boxes] == [[float(v) for v in it[1]] for it in moved.values()]
    # a structure moved out of view is not there any more
    _, gone = augment_slice(study.volume[k], study.labels[k], _Fixed(0.0, 0.0, 0.1))
    gone[gone == liver] = 0
    assert moved_answer(dict(task="detect", slice=k, structure="liver"), study, gone) == (
        "No liver is visible in this image.")
