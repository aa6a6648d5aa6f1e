"""`citrusv eval`'s scorer: scripted answerers with known answers on two real slices of the
sample CT give the scores worked out by hand (perfect answers score 1, shifted boxes IoU 1/3,
boxes for absent structures count against precision)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from citrusv.evaluation import evaluate, format_table
from citrusv.nano_data import MIN_AREA_PX, NAMES, mask_box
from citrusv.result import Box, Mask, Result, Step

SLICES = [25, 64]


class ScriptedAnswerer:
    """Answers from the reference label map; `shift` moves detection boxes right by that
    fraction of their width; `boxes_for_absent` also boxes structures that are not there."""

    def __init__(self, study, shift: float = 0.0, boxes_for_absent: bool = False,
                 grounded: bool = False, lost_in_closer_look: str | None = None):
        self.study, self.shift, self.boxes_for_absent = study, shift, boxes_for_absent
        self.lost = lost_in_closer_look  # a structure whose closer look marks nothing
        self.grounded = grounded  # box_source "mask": right boxes, the written ones shifted
        self.box_source = "mask" if grounded else "text"

    def _slice(self, image: np.ndarray) -> int:
        return next(k for k in SLICES if np.array_equal(self.study.volume[k], image))

    def ask(self, image, prompt, window=None, task=None, max_new_tokens=None) -> Result:
        k = self._slice(image)
        res = Result(task=task, prompt=prompt)
        if task == "report":
            on = [s for s in NAMES if self.study.mask(s, k).sum() >= MIN_AREA_PX]
            res.boxes = [Box(id=f"b{i}", label=s, xyxy=mask_box(self.study.mask(s, k)))
                         for i, s in enumerate(on, 1)]
            res.reasoning = [Step(step=i, text=f"The {b.label}.", box_ids=[b.id])
                             for i, b in enumerate(res.boxes, 1)]
            return res
        name = re.search(r"the (.+?)(?: in this scan|, output)", prompt).group(1)
        ref = self.study.mask(name, k)
        if task == "segment" and ref.any():
            res.masks = [Mask(label=name, array=ref.copy())]
        if task == "detect":
            if ref.sum() >= MIN_AREA_PX:
                x1, y1, x2, y2 = mask_box(ref)
                dx = self.shift * (x2 - x1)
                res.boxes = [Box(id="b1", label=name, xyxy=[x1 + dx, y1, x2 + dx, y2],
                                 score=0.9)]
                if self.grounded:
                    res.boxes[0].text_xyxy = res.boxes[0].xyxy
                    res.boxes[0].xyxy, res.boxes[0].source = [x1, y1, x2, y2], "mask"
            elif self.boxes_for_absent:  # an unsure box: scored below SCORE_LINE
                res.boxes = [Box(id="b1", label=name, xyxy=[10.0, 10.0, 60.0, 60.0],
                                 score=0.2)]
        return res

    def closer_look(self, image, prompt, mask=None, label=None, window=None) -> Result:
        """The reference inside the sent mask's box, or nothing for `lost_in_closer_look`."""
        k = self._slice(image)
        x1, y1, x2, y2 = (int(v) for v in mask_box(mask))
        inside = np.zeros(image.shape, dtype=bool)
        inside[y1:y2, x1:x2] = True
        found = self.study.mask(label, k) & inside if label != self.lost else np.zeros_like(inside)
        res = Result(task="closer_look", prompt=prompt, masks=[Mask(label=label, array=found)])
        if label == self.lost:
            res.warnings = [f"the closer look marks no {label} in the crop, ..."]
        return res


def _present(study) -> dict[str, int]:
    return {s: sum(int(study.mask(s, k).sum() >= MIN_AREA_PX) for k in SLICES) for s in NAMES}


def test_perfect_answers_score_one(study):
    scores = evaluate(ScriptedAnswerer(study), study, slices=SLICES)
    present = _present(study)
    scored = {s: v for s, v in scores["dice"].items() if v is not None}
    assert scored and all(v == pytest.approx(1.0) for v in scored.values())
    assert set(scored) == {s for s in NAMES if any(study.mask(s, k).any() for k in SLICES)}
    assert scores["mean_dice"] == pytest.approx(1.0)
    assert scores["detection_precision"] == scores["detection_recall"] == 1.0
    assert scores["detection_boxes"] == sum(present.values())
    assert scores["detection_found"] == {s: [n, n] for s, n in present.items()}
    assert scores["citation_precision"] == scores["citation_recall"] == 1.0
    assert scores["cited_box_iou"] == scores["written_cited_box_iou"] == pytest.approx(1.0)
    assert scores["steps_citing_boxes"] == 1.0
    table = format_table(scores)
    assert "| mean Dice (10 structures) | 1.000 | ≥ 0.75 | met |" in table
    assert present["liver"] == 2  # liver is on both slices (733 px on slice 64)
    assert f"| liver | 1.000 | {scores['reference_pixels']['liver']} | 2 / 2 | 2 / 2 |" in table
    assert "Axial slices 25, 64 (2 slices)" in table
    # a closer look at each present structure's mask: nothing lost, nothing warned about
    assert scores["closer_look"]["liver"] == {"looks": 2, "warned": 0, "dice_before": 1.0,
                                              "dice_after": 1.0}
    assert sum(t["looks"] for t in scores["closer_look"].values()) == sum(present.values())
    assert "| liver | 2 | 1.000 -> 1.000 | 0 |" in table
    assert f"| **all** | **{sum(present.values())}** | | **0** |" in table


def test_a_closer_look_that_loses_the_structure_scores_zero_and_is_counted(study):
    scores = evaluate(ScriptedAnswerer(study, lost_in_closer_look="liver"), study,
                      slices=SLICES, report=False)
    assert scores["closer_look"]["liver"] == {"looks": 2, "warned": 2, "dice_before": 1.0,
                                              "dice_after": 0.0}
    assert scores["closer_look"]["heart"]["warned"] == 0
    assert "| liver | 2 | 1.000 -> 0.000 | 2 |" in format_table(scores)


def test_boxes_shifted_by_half_their_width_miss(study):
    scores = evaluate(ScriptedAnswerer(study, shift=0.5), study, slices=SLICES, report=False)
    assert scores["detection_precision"] == 0.0 and scores["detection_recall"] == 0.0
    assert scores["detection_mean_iou"] == pytest.approx(1 / 3)
    assert all(found == 0 for found, _ in scores["detection_found"].values())
    assert scores["citation_precision"] is None  # no report asked
    table = format_table(scores)
    assert ("| detection precision@IoU0.5, boxes returned (box_source text) | 0.000 | ≥ 0.6 | "
            "MISSED |") in table
    assert ("| detection precision@IoU0.5, boxes as the model wrote them | 0.000 | ≥ 0.6 | "
            "MISSED |") in table


def test_grounded_boxes_are_scored_apart_from_the_written_ones(study):
    """box_source "mask": the returned (mask) boxes and the boxes as written get a row each."""
    scores = evaluate(ScriptedAnswerer(study, shift=0.5, grounded=True), study, slices=SLICES,
                      report=False)
    assert scores["box_source"] == "mask"
    assert scores["detection_precision"] == scores["detection_recall"] == 1.0
    assert scores["written_detection_precision"] == scores["written_detection_recall"] == 0.0
    assert scores["written_detection_mean_iou"] == pytest.approx(1 / 3)
    assert scores["written_detection_boxes"] == scores["detection_boxes"] > 0
    table = format_table(scores)
    assert ("| detection precision@IoU0.5, boxes returned (box_source mask) | 1.000 | ≥ 0.6 | "
            "met |") in table
    assert ("| detection precision@IoU0.5, boxes as the model wrote them | 0.000 | ≥ 0.6 | "
            "MISSED |") in table
    assert "| detection recall@IoU0.5, returned / as written | 1.000 / 0.000 | | |" in table
    assert f"| liver | 1.000 | {scores['reference_pixels']['liver']} | 2 / 2 | 0 / 2 |" in table


def test_boxes_for_absent_structures_lower_precision_only(study):
    scores = evaluate(ScriptedAnswerer(study, boxes_for_absent=True), study, slices=SLICES,
                      report=False)
    n_present = sum(_present(study).values())
    n_absent = len(NAMES) * len(SLICES) - n_present
    assert n_absent > 0
    assert scores["detection_boxes"] == n_present + n_absent
    assert scores["detection_precision"] == pytest.approx(n_present / (n_present + n_absent))
    assert scores["detection_recall"] == 1.0
    # the unsure boxes (0.2) fall below the score line (0.5), the sure right ones (0.9) don't
    assert scores["scored_detection_boxes"] == n_present
    assert scores["scored_detection_precision"] == scores["scored_detection_recall"] == 1.0
    assert (f"| detection precision / recall, boxes scored ≥ 0.5 ({n_present} boxes) | "
            "1.000 / 1.000 | | |") in format_table(scores)


def test_one_window_for_every_question_is_asked_and_said(study):
    """`citrusv eval --window lung`: every question in that window, and the table says so; by
    default the protocol's windows (lung for the lungs, abdomen for the rest and the report)."""

    class Recorder(ScriptedAnswerer):
        def __init__(self, study):
            super().__init__(study)
            self.windows: set[tuple[str, str | None]] = set()

        def ask(self, image, prompt, window=None, task=None, max_new_tokens=None):
            self.windows.add((task, window))
            return super().ask(image, prompt, window=window, task=task,
                               max_new_tokens=max_new_tokens)

        def closer_look(self, image, prompt, mask=None, label=None, window=None):
            self.windows.add(("closer_look", window))
            return super().closer_look(image, prompt, mask=mask, label=label, window=window)

    usual = Recorder(study)
    scores = evaluate(usual, study, slices=SLICES)
    assert scores["window"] is None and not format_table(scores).startswith("Every question")
    assert usual.windows == {(t, w) for t in ("segment", "detect", "closer_look")
                             for w in ("lung", "abdomen")} | {("report", "abdomen")}
    one = Recorder(study)
    lung = evaluate(one, study, slices=SLICES, window="lung")
    assert {w for _, w in one.windows} == {"lung"} and lung["window"] == "lung"
    assert format_table(lung).startswith("Every question in the lung window")
    assert lung["mean_dice"] == scores["mean_dice"]  # the scripted answers ignore the window
