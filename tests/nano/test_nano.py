"""The shipped `models/nano` checkpoint: loads through the real loader and answers on a
held-out slice of the sample CT (slice 25 lies in the held-out block 20-29)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from citrusv import Engine
from citrusv.engine import REPORT_AGAIN_PROMPT, main_parts_box
from citrusv.errors import InputError
from citrusv.evaluation import box_iou, held_out_slices, normalise_label
from citrusv.checkpoint import read_example_prompts, read_intended_use
from citrusv.io import read_study
from citrusv.nano_data import (HELD_OUT_BLOCKS, NAMES, NANO_INTENDED_USE, mask_box,
                               nano_example_prompts, split_of)
from citrusv.training import dice_score

NANO = Path(__file__).resolve().parents[2] / "models" / "nano"
SLICE = 25
PREFIXES = ("mllm.model.language_model.", "mllm.model.visual.", "mllm.lm_head.",
            "grounding_encoder.sam2_model.", "seg_projector.0.", "seg_projector.2.")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(NANO)



def test_slice_is_held_out():
    assert split_of(SLICE) == "test"
    assert any(a <= SLICE <= b for a, b in HELD_OUT_BLOCKS)


def test_checkpoint_is_in_the_released_layout_and_small():
    config = json.loads((NANO / "config.json").read_text())
    assert config["model_type"] == "citrus_v" and config["architectures"] == ["CitrusV"]
    index = json.loads((NANO / "model.safetensors.index.json").read_text())
    keys = list(index["weight_map"])
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in keys), f"no key starts with {prefix}"
    assert all(k.startswith(PREFIXES) for k in keys)
    size = sum(f.stat().st_size for f in NANO.iterdir() if f.is_file())
    assert size <= 30 * 1024**2, f"models/nano is {size / 1024**2:.1f} MB, over 30 MB"
    assert (NANO / "MODEL_CARD.md").is_file()


def test_loads_through_the_engine(engine):
    tok = engine.tokenizer
    for t in ("[SEG]", "<bbox>", "</bbox>", "<think>", "</think>", "<answer>", "</answer>"):
        assert t in tok.get_vocab(), t
    assert engine.config.seg_token_idx == tok.convert_tokens_to_ids("[SEG]")


def test_segments_the_liver_on_a_held_out_slice(engine, study):
    res = engine.ask(study.volume[SLICE], "Please segment the liver in this scan.",
                     window="abdomen")
    assert res.masks, f"no mask; the model wrote {res.text!r}"
    pred = np.zeros(study.volume.shape[1:], dtype=bool)
    for m in res.masks:
        pred |= m.array
    dice = dice_score(pred, study.mask("liver", SLICE))
    assert dice >= 0.8, f"liver Dice {dice:.3f} < 0.8 (text {res.text!r})"


def test_bf16_engine_segments_as_the_fp32_one(engine, study):
    """bf16 is the engine's default on a GPU (MLLM in bf16; SAM2 and the projector stay fp32,
    since SAM2's own code feeds fp32 tensors to its layers): checked here on the CPU."""
    half = Engine.load(NANO, dtype="bf16")
    assert next(half.model.mllm.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in half.model.grounding_encoder.parameters()} == {torch.float32}
    masks = []
    for e in (engine, half):
        res = e.ask(study.volume[SLICE], "Please segment the liver in this scan.", window="abdomen")
        pred = np.zeros(study.volume.shape[1:], dtype=bool)
        for m in res.masks:
            pred |= m.array
        masks.append(pred)
    assert dice_score(masks[1], study.mask("liver", SLICE)) >= 0.8
    assert dice_score(masks[1], masks[0]) >= 0.98  # 0.9995 measured


@pytest.mark.xfail(strict=True, reason=(
    "models/nano misses the issue's detection target with the boxes it writes: on held-out "
    "slice 25 it answers 'No liver is visible in this image.'; the box of its liver mask, "
    "which the engine returns beside that answer, has IoU 0.461: the reference liver has a "
    "second piece there, of the left lobe across the midline, that nano's mask (Dice 0.931) "
    "leaves out (detection P@0.5 over the "
    "held-out blocks: 0.413 as written, 0.733 for the boxes box_source 'mask' returns; "
    "MODEL_CARD.md). "
    "Strict: remove this mark when a retrained nano passes."))
def test_detects_the_liver_on_a_held_out_slice(engine, study):
    res = engine.ask(study.volume[SLICE],
                     "Locate the liver, output its bbox coordinates using JSON format.",
                     window="abdomen")
    ref = mask_box(study.mask("liver", SLICE))
    livers = [b for b in res.boxes if normalise_label(b.label) == "liver"]
    assert livers, f"no liver box; the model wrote {res.text!r}"
    iou = max(box_iou(b.xyxy, ref) for b in livers)
    assert iou >= 0.5, f"liver box IoU {iou:.3f} < 0.5 (text {res.text!r})"


def test_detection_box_comes_from_the_liver_mask(engine, study):
    """nano's config says box_source 'mask': on held-out slice 61 the box nano writes for the
    liver misses (IoU 0.134) and the box of its own liver mask, which the engine returns in its
    place, hits (0.975); the written box stays in the result."""
    assert engine.box_source == "mask"
    k = 61
    res = engine.ask(study.volume[k],
                     "Locate the liver, output its bbox coordinates using JSON format.",
                     window="abdomen")
    ref = mask_box(study.mask("liver", k))
    livers = [b for b in res.boxes if normalise_label(b.label) == "liver"]
    assert len(livers) == 1, f"the model wrote {res.text!r}"
    box = livers[0]
    assert box.source == "mask" and box.text_xyxy != box.xyxy
    assert box_iou(box.xyxy, ref) >= 0.85
    assert box_iou(box.text_xyxy, ref) < 0.5
    seg = engine.ask(study.volume[k], "Please segment the liver in this scan.", window="abdomen")
    # the mask's main parts: some liver pixels lie apart, outside the reference's box
    # (the whole mask's box: IoU 0.555)
    assert box.xyxy == main_parts_box(seg.masks[0].array)
    assert box_iou(mask_box(seg.masks[0].array), ref) < box_iou(box.xyxy, ref)
    assert box.to_json()["text_xyxy"] == [round(v, 2) for v in box.text_xyxy]


def test_a_structure_nano_calls_not_visible_gets_its_masks_box(engine, study):
    """On held-out slice 22 nano answers "No left kidney is visible in this image." although
    its own mask marks the left kidney: the engine returns that mask's box (IoU 0.766 with the
    reference box), says that the answer and the mask disagree, and leaves the text alone."""
    k = 22
    res = engine.ask(study.volume[k],
                     "Locate the left kidney, output its bbox coordinates using JSON format.",
                     window="abdomen")
    assert res.text.startswith("No left kidney is visible in this image."), res.text
    (box,) = res.boxes
    assert (box.label, box.source, box.text_xyxy, box.score) == ("left kidney", "mask", None,
                                                                 None)
    assert box_iou(box.xyxy, mask_box(study.mask("left kidney", k))) >= 0.75
    assert res.warnings == [
        "the answer says no left kidney is visible, but the model's own segmentation marks the "
        "left kidney in the image; the left kidney box returned is the box of that mask, not "
        "one the model wrote."]
    # over a slice range (20-25: nano says this on each) the sentence comes once
    vol = engine.ask_volume(study.volume, "Locate the left kidney, output its bbox "
                            "coordinates using JSON format.", slices=range(20, 26),
                            window="abdomen")
    assert [b.slice for b in vol.boxes] == [20, 21, 22, 23, 24, 25], vol.text
    assert vol.warnings == ["slices 20-25: " + res.warnings[0]]


def test_kidneys_nano_calls_not_visible_get_their_masks_boxes(engine, study):
    """Asked "Find the kidneys." on held-out slices 20-25, where the kidneys' upper poles are,
    nano answers "No kidneys are visible in this image." Its own masks of each kidney find
    them: on slice 20 the engine returns both masks' boxes (IoU 0.903 and 0.841 with the
    reference boxes), one sentence for each, and leaves the text alone."""
    k = 20
    res = engine.ask(study.volume[k], "Find the kidneys.", window="abdomen", task="detect")
    assert res.text.startswith("No kidneys are visible in this image."), res.text
    assert [(b.label, b.source, b.text_xyxy) for b in res.boxes] == [
        ("right kidney", "mask", None), ("left kidney", "mask", None)]
    for box in res.boxes:
        assert box_iou(box.xyxy, mask_box(study.mask(box.label, k))) >= 0.8, box
    assert res.warnings == [
        f"the answer says no kidneys are visible, but the model's own segmentation marks the "
        f"{side} kidney in the image; the {side} kidney box returned is the box of that mask, "
        "not one the model wrote." for side in ("right", "left")]


def test_a_box_whose_structure_gets_no_mask_stays_as_written(engine, study):
    """On held-out slice 23 nano writes a box for the right lung (its apex, 432 reference
    pixels) but its SAM2 marks no right lung there, so the written box comes back unchanged,
    and the answer says it is unconfirmed; the empty mask comes with a sentence too."""
    k = 23
    assert study.mask("right lung", k).sum() > 0
    res = engine.ask(study.volume[k],
                     "Locate the right lung, output its bbox coordinates using JSON format.",
                     window="lung")
    assert [b.label for b in res.boxes] == ["right lung"], res.text
    assert res.warnings == [
        "the model's own segmentation marks no right lung in the image, so that box is as the "
        "model wrote it, not the box of a mask; treat it as unconfirmed."]
    for b in res.boxes:
        assert b.source == "text" and b.text_xyxy is None
        seg = engine.ask(study.volume[k], f"Please segment the {b.label} in this scan.",
                         window="lung")
        assert [m.label for m in seg.masks] == [b.label], seg.text
        assert sum(m.area_px for m in seg.masks) == 0
        assert seg.warnings == [
            "the right lung mask is empty: the model marks no right lung pixel in the image, "
            "so the structure may not be in view."]


def test_a_mask_of_a_few_pixels_neither_boxes_nor_passes_for_the_structure(engine, study):
    """Held-out slice 25 has no right kidney (its upper pole starts lower). nano's report cites
    one anyway, and its mask when asked is a pixel or a few: that used to become a 1 x 1 px
    box in place of the written one. Now a mask under 40 px neither replaces a written box nor
    comes back without a sentence."""
    k = 25
    assert study.mask("right kidney", k).sum() == 0
    spacing = tuple(study.spacing[1:])
    rep = engine.ask(study.volume[k], "Write a report for this CT slice. Think step by step.",
                     window="abdomen", spacing=spacing)
    (kidney,) = [b for b in rep.boxes if b.label == "right kidney"]
    assert kidney.source == "text" and kidney.text_xyxy is None
    x1, y1, x2, y2 = kidney.xyxy
    assert x2 - x1 > 40 and y2 - y1 > 40, kidney.xyxy  # as written, not a pixel's box
    assert rep.warnings[0] == (
        "the model's own segmentation marks only 1 px of the right kidney in the image, too few "
        "to box (the structure may not be in view), so that box is as the model wrote it, not "
        "the box of a mask; treat it as unconfirmed.")
    assert [b.source for b in rep.boxes if b.label != "right kidney"] == ["mask"] * 5
    seg = engine.ask(study.volume[k], "Segment the right kidney.", window="abdomen",
                     spacing=spacing)
    (mask,) = seg.masks
    assert 0 < mask.area_px < 40
    assert seg.warnings == [
        f"the right kidney mask marks only {mask.area_px} px, "
        f"{mask.area_px * spacing[0] * spacing[1]:.0f} mm², too few to be taken as the right "
        "kidney: the model may not have found it here; treat that mask as unconfirmed."]


def test_empty_masks_over_slices_are_said_once(engine, study):
    """Asked over slices 100-102 (the chest; the kidneys lie below slice 40) nano marks no right
    kidney: one sentence for the whole range. A report over held-out slices 60-69 says once,
    for the run of slices, which cited boxes no mask of nano confirms."""
    res = engine.ask_volume(study.volume, "Please segment the right kidney in this scan.",
                            slices=[100, 101, 102], window="abdomen")
    assert [(m.label, m.area_px) for m in res.masks] == [("right kidney", 0)]
    assert res.warnings == [
        "the right kidney mask is empty: the model marks no right kidney pixel in any of the 3 "
        "slices asked, so the structure may not be in view."]
    rep = engine.ask_volume(study.volume, "Write a report for this CT slice. Think step by "
                            "step.", slices=range(60, 70), window="abdomen")
    unconfirmed = sorted({b.slice for b in rep.boxes if b.source == "text"})
    assert unconfirmed == [66, 67, 68, 69], rep.text
    # the answer over the range: what the reports cite, slice by slice
    assert rep.answer.startswith("Over slices 60-69 (10 slices): right lung cited on slices "
                                 "60-69 (10 of them); left lung cited on slices 60-69"), rep.answer
    assert ("liver cited on slices 60-62, 66-69 (7 of them; no liver mask confirms it on "
            "slices 66-69)") in rep.answer
    assert rep.warnings == [
        "slices 66-69: the model's own segmentation marks no liver in the image, so that box is "
        "as the model wrote it, not the box of a mask; treat it as unconfirmed."]


def test_a_volume_over_a_slice_range_is_measured_and_said_when_cut(engine, study):
    """The spleen lies on slices 29-51 (124.3 mL in the reference over slices 26-54, held-out
    block 20-29 included). Asked over 26-54, nano's masks give 129.99 mL (+4.6 %), with no
    sentence, and the answer says on which slices it marked the spleen; asked over 35-45, the mask reaches both ends and the answer says the volume
    counts those slices only."""
    whole = engine.ask_volume(study.volume, "Please segment the spleen in this scan.",
                              slices=range(26, 55), window="abdomen", spacing=study.spacing)
    ref = sum(int(study.mask("spleen", k).sum()) for k in range(26, 55))
    ref_ml = ref * float(np.prod(study.spacing)) / 1000
    assert whole.to_json()["volumes_ml"]["spleen"] == pytest.approx(ref_ml, rel=0.1)
    assert not [w for w in whole.warnings if "mask reaches" in w], whole.warnings
    assert whole.answer == ("Over slices 26-54 (29 slices): spleen marked on slices 28-51 (24 "
                            "of them), 130.0 mL, 60.0 mm craniocaudal."), whole.answer
    cut = engine.ask_volume(study.volume, "Please segment the spleen in this scan.",
                            slices=range(35, 46), window="abdomen", spacing=study.spacing)
    ml = cut.to_json()["volumes_ml"]["spleen"]
    assert cut.warnings == [
        "the spleen mask reaches slice 35, the first asked, and slice 45, the last asked: "
        f"{ml:g} mL is its volume over the slices asked only; ask a range that goes past the "
        "spleen for all of it."]


def test_the_aorta_diameter_is_measured_from_nanos_mask(engine, study):
    """"Measure the aorta diameter." on held-out slice 22 asks for the aorta (not "the aorta
    diameter"); its mask's long and short axes are 20.2 x 18.1 mm, the reference's 20.4 x
    18.6 mm."""
    from citrusv.result import diameters_mm

    k, spacing = 22, tuple(study.spacing[1:])
    res = engine.ask(study.volume[k], "Measure the aorta diameter.", window="abdomen",
                     spacing=spacing)
    (entry,) = res.to_json()["masks"]
    ref = diameters_mm(study.mask("aorta", k), spacing)
    assert entry["label"] == "aorta" and not res.warnings, res.warnings
    assert entry["diameters_mm"] == pytest.approx(ref, abs=1.0), (entry["diameters_mm"], ref)


def test_a_structure_nano_never_learnt_gets_an_answer_that_says_so(engine, study):
    """nano knows ten structures. Asked for the pancreas on held-out slice 25 it segments the
    liver, and asked for the bladder on slice 104, the right lung: each answer says the
    question does not name what it is about, so the radiologist does not take the liver mask
    for a pancreas. Asked for the liver, no such sentence."""
    pancreas = engine.ask(study.volume[SLICE], "Please segment the pancreas in this scan.",
                          window="abdomen")
    assert [m.label for m in pancreas.masks] == ["liver"], pancreas.text
    bladder = engine.ask(study.volume[104], "segment the bladder", window="abdomen")
    assert [m.label for m in bladder.masks] == ["right lung"], bladder.text
    for res in (pancreas, bladder):
        label = res.masks[0].label
        assert f"the answer is about the {label}, which the question does not name: the model " \
               "may have answered about something other than what was asked (it may not know " \
               "that structure), so check the answer is what you wanted." in res.warnings
    liver = engine.ask(study.volume[SLICE], "Please segment the liver in this scan.",
                       window="abdomen")
    assert [m.label for m in liver.masks] == ["liver"]
    assert not [w for w in liver.warnings if "question" in w], liver.warnings


def test_a_question_listing_structures_gets_an_answer_about_each(engine, study):
    """nano answers a question that lists structures about one or some of them. On held-out
    slice 25, "Segment the liver, the spleen and the stomach." gets a liver box and no mask;
    the engine asks for each structure alone and returns the three masks, each the one its
    own question gets (the spleen, not on this slice, empty and said to be). On slice 65,
    "Find the heart and the aorta." gets the aorta; the heart's box comes from asking alone
    (so for "Draw boxes around ..." and "Identify ...", which nano answers alike).
    The pancreas, which nano never learnt, gets a sentence instead of a box. On slice 23 the
    answer says "No liver is visible", and the liver mask asked for alone marks it."""
    img = study.volume[SLICE]
    res = engine.ask(img, "Segment the liver, the spleen and the stomach.", window="abdomen")
    assert [(m.label, m.label_index) for m in res.masks] == [
        ("liver", 1), ("spleen", 2), ("stomach", 3)], res.text
    for m in res.masks:
        alone = engine.ask(img, f"Please segment the {m.label} in this scan.", window="abdomen")
        np.testing.assert_array_equal(m.array, alone.masks[0].array)
    assert dice_score(res.masks[0].array, study.mask("liver", SLICE)) >= 0.9
    assert dice_score(res.masks[2].array, study.mask("stomach", SLICE)) >= 0.5
    assert res.masks[1].area_px == 0 and "the spleen mask is empty" in res.warnings[0]
    assert not [w for w in res.warnings if "[SEG]" in w or "question" in w], res.warnings

    chest = study.volume[65]
    found = engine.ask(chest, "Find the heart and the aorta.", window="abdomen")
    assert [b.label for b in found.boxes] == ["aorta", "heart"], found.text
    heart = engine.ask(chest, "Locate the heart, output its bbox coordinates using JSON format.",
                       window="abdomen")
    assert found.boxes[1].xyxy == heart.boxes[0].xyxy and found.boxes[1].id == "b2"
    assert box_iou(found.boxes[1].xyxy, mask_box(study.mask("heart", 65))) >= 0.9
    assert not found.warnings, found.warnings
    for other in ("Draw boxes around the heart and the aorta.",
                  "Identify the heart and the aorta."):  # as typed: the aorta only, too
        said = engine.ask(chest, other, window="abdomen")
        assert said.task == "detect" and [b.xyxy for b in said.boxes] == [
            b.xyxy for b in found.boxes], (other, said.text)

    pancreas = engine.ask(img, "Locate the spleen and the pancreas.", window="abdomen")
    assert pancreas.boxes == [] and pancreas.answer.startswith("No spleen is visible")
    # nano was not taught the pancreas (config.json's structures): it is not asked again
    # (before 2026-12-06 it was, and answered about the left lung)
    assert pancreas.warnings == [
        "citrusv-nano was not taught the pancreas (it was taught only the right lung, left lung, "
        "heart, aorta, liver, stomach, spleen, right kidney, left kidney and spinal cord), so "
        "its answer cannot be about it: look for it yourself."]

    k = 23
    denied = engine.ask(study.volume[k], "Segment the liver, the spleen and the stomach.",
                        window="abdomen")
    assert denied.text.startswith("No liver is visible in this image.")
    liver = [m for m in denied.masks if m.label == "liver"]
    assert dice_score(liver[0].array, study.mask("liver", k)) >= 0.9
    assert ("the answer says no liver is visible, but the model's own segmentation marks the "
            "liver in the image; the liver mask returned is the one it gives when asked for the "
            "liver alone.") in denied.warnings


def test_segment_all_organs_gives_each_structure_nanos_report_finds(engine, study):
    """"Segment all organs." names none; nano first segments one. Asked which are there, its
    report on held-out slice 65 cites the lungs, the heart, the aorta and the spinal cord,
    and each is segmented as its own question would be. "Segment all organs except the
    lungs." gets the same masks but the lungs'."""
    k = 65
    res = engine.ask(study.volume[k], "Segment all organs.", window="abdomen")
    got = {m.label: m.array for m in res.masks}
    assert {"right lung", "left lung", "heart", "aorta", "spinal cord"} <= set(got), res.text
    for name in ("right lung", "left lung", "heart"):
        assert dice_score(got[name], study.mask(name, k)) >= 0.85, name
    assert not [w for w in res.warnings if "does not name" in w], res.warnings
    # "... except the lungs": the same masks less the lungs
    less = engine.ask(study.volume[k], "Segment all organs except the lungs.", window="abdomen")
    assert [m.label for m in less.masks] == [m.label for m in res.masks if "lung" not in m.label]
    for m in less.masks:
        np.testing.assert_array_equal(m.array, got[m.label])


def test_a_size_question_is_answered_with_a_mask_and_its_area_in_mm2(engine, study):
    """"How big is the Liver?" is a segmentation question (nano, asked it in those words,
    writes "Sure, the liver is [SEG] liver."): on held-out slice 25 its mask is nano's liver,
    and the answer's JSON gives the mask's area in mm² from the slice's spacing."""
    img, spacing = study.volume[SLICE], (study.spacing[1], study.spacing[2])
    res = engine.ask(img, "How big is the Liver?", window="abdomen", spacing=spacing)
    assert res.task == "segment" and [m.label for m in res.masks] == ["liver"], res.text
    assert dice_score(res.masks[0].array, study.mask("liver", SLICE)) >= 0.8
    entry = res.to_json()["masks"][0]
    assert entry["area_mm2"] == pytest.approx(res.masks[0].area_px * spacing[0] * spacing[1],
                                              rel=1e-4)


def test_a_report_question_nano_answers_with_no_report_is_asked_again(engine, study):
    """nano writes reports to questions that say "step by step", as all its trained ones do.
    On held-out slice 25 "Write a report." and "What are the findings?" first get a
    left-lung box; asked again with "Think step by step." after them, each gets a report
    whose steps cite boxes, and that is the result. "Is the liver normal?", which asks for no
    report by its words, is not asked again: its answer, "No liver is visible in this
    image.", is checked as a detection answer (the box of nano's liver mask, a warning).
    "Segment the heart and describe it." (slice 65) first gets a heart mask, which stays with
    the report it gets asked again."""
    img = study.volume[SLICE]
    for prompt, first in (("Write a report.", '```json\n[{"bbox_2d"'),
                          ("What are the findings?", '```json\n[{"bbox_2d"')):
        res = engine.ask(img, prompt, window="abdomen")
        assert res.task == "report" and res.prompt == prompt
        assert res.text.startswith(first), res.text
        assert res.text.count("<think>") == 1 and res.reasoning, res.text
        assert all(step.box_ids for step in res.reasoning)
        boxes = {b.id: b for b in res.boxes}
        assert "liver" in {boxes[i].label for s in res.reasoning for i in s.box_ids}
        again = engine.ask(img, f"{prompt} Think step by step.", window="abdomen")
        assert res.text.endswith(again.text) and res.answer == again.answer
        assert [b.xyxy for b in res.boxes] == [b.xyxy for b in again.boxes]
        assert not [w for w in res.warnings if "question" in w], res.warnings
    # a question that asks for a mask and a report: nano's mask answer first, then the
    # report asked again; the mask stays with it
    chest = study.volume[65]
    both = engine.ask(chest, "Segment the heart and describe it.", window="abdomen")
    assert both.task == "report" and both.reasoning, both.text
    assert both.text.startswith("Sure, the heart is [SEG] heart.\n<think>"), both.text
    assert [(m.label, m.label_index) for m in both.masks] == [("heart", 1)]
    typed = Engine.load(NANO, ask_again=False).ask(chest, "Segment the heart and describe it.",
                                                   window="abdomen")
    assert not typed.reasoning and [m.label for m in typed.masks] == ["heart"]
    np.testing.assert_array_equal(both.masks[0].array, typed.masks[0].array)
    assert dice_score(both.masks[0].array, study.mask("heart", 65)) >= 0.85
    # "step by step" said already, in capitals (nano was taught lower-case words): its box
    # answer is asked again in nano's phrasing, whose report is the result
    caps = engine.ask(img, "Write a Report, Think Step by Step.", window="abdomen")
    assert caps.text.startswith('```json\n[{"bbox_2d"'), caps.text
    assert caps.reasoning and all(step.box_ids for step in caps.reasoning), caps.text
    assert caps.text.endswith(engine.ask(img, REPORT_AGAIN_PROMPT, window="abdomen").text)
    assert caps.prompt == "Write a Report, Think Step by Step."
    normal = engine.ask(img, "Is the liver normal?", window="abdomen")
    assert normal.text.startswith("No liver is visible in this image.") and not normal.reasoning
    assert "<think>" not in normal.text
    assert [(b.label, b.source) for b in normal.boxes] == [("liver", "mask")]
    assert [w for w in normal.warnings if w.startswith("the answer says no liver is visible")]


def test_a_question_nano_answers_with_no_mask_is_asked_again(engine, study):
    """Other segmentation wording than nano's ("Delineate the aorta.") gets a box and no mask
    from nano, and a paired organ ("Segment both kidneys.") gets no mask, or one side: the
    engine asks again in nano's phrasing, side by side for a pair, and returns those masks."""
    img = study.volume[SLICE]

    def alone(name):
        return engine.ask(img, f"Please segment the {name} in this scan.",
                          window="abdomen").masks[0].array

    aorta = engine.ask(img, "Delineate the aorta.", window="abdomen")
    assert aorta.text.startswith("```json") and [m.label for m in aorta.masks] == ["aorta"]
    np.testing.assert_array_equal(aorta.masks[0].array, alone("aorta"))
    assert dice_score(aorta.masks[0].array, study.mask("aorta", SLICE)) >= 0.8
    assert not [w for w in aorta.warnings if "[SEG]" in w], aorta.warnings
    kidneys = engine.ask(img, "Segment both kidneys.", window="abdomen")
    assert [m.label for m in kidneys.masks] == ["right kidney", "left kidney"], kidneys.text
    for m in kidneys.masks:
        np.testing.assert_array_equal(m.array, alone(m.label))
    lungs = engine.ask(study.volume[65], "Segment both lungs.", window="abdomen")
    assert [m.label for m in lungs.masks] == ["right lung", "left lung"], lungs.text
    assert dice_score(lungs.masks[1].array, study.mask("left lung", 65)) >= 0.9


def test_a_name_with_capitals_or_a_pair_with_no_side_is_asked_again(engine, study):
    """nano was taught names in lower case: on held-out slice 65 "Segment the Heart." gets the
    right lung and "Locate the Aorta, ..." a left-lung box. The answer is about nothing the
    question asks for, so the engine asks in nano's phrasing and that answer takes its place
    (the first stays in `text`): the heart at Dice 0.863, the box of nano's aorta mask (IoU
    0.47 with the reference box, which spans both parts of the aorta there). "Segment the
    kidney." (a pair's name, no side) gets the liver on slice 22; asked side by side, both
    kidneys (Dice 0.943 and 0.871)."""
    k = 65
    img = study.volume[k]
    as_typed = Engine.load(NANO, ask_again=False)
    typed = as_typed.ask(img, "Segment the Heart.", window="abdomen")
    assert [m.label for m in typed.masks] == ["right lung"], typed.text
    heart = engine.ask(img, "Segment the Heart.", window="abdomen")
    assert [m.label for m in heart.masks] == ["heart"], heart.text
    assert heart.text.startswith(typed.text + "\n") and heart.answer.startswith("Sure, the heart")
    alone = engine.ask(img, "Please segment the heart in this scan.", window="abdomen")
    np.testing.assert_array_equal(heart.masks[0].array, alone.masks[0].array)
    assert dice_score(heart.masks[0].array, study.mask("heart", k)) >= 0.85
    assert heart.warnings == [], heart.warnings
    question = "Locate the Aorta, output its bbox coordinates using JSON format."
    assert {b.label for b in as_typed.ask(img, question, window="abdomen").boxes} <= {"left lung"}
    aorta = engine.ask(img, question, window="abdomen")
    assert [(b.id, b.label, b.source) for b in aorta.boxes] == [("b1", "aorta", "mask")]
    alone = engine.ask(img, question.replace("Aorta", "aorta"), window="abdomen")
    assert aorta.boxes[0].xyxy == alone.boxes[0].xyxy
    assert box_iou(aorta.boxes[0].xyxy, mask_box(study.mask("aorta", k))) >= 0.45
    assert not [w for w in aorta.warnings if "question" in w], aorta.warnings
    k = 22
    kidney = engine.ask(study.volume[k], "Segment the kidney.", window="abdomen")
    assert kidney.text.startswith("Sure, the liver is [SEG] liver.\n"), kidney.text
    assert [m.label for m in kidney.masks] == ["right kidney", "left kidney"]
    assert [m.label_index for m in kidney.masks] == [1, 2]
    for m in kidney.masks:
        assert dice_score(m.array, study.mask(m.label, k)) >= 0.8, m.label
    assert kidney.warnings == [], kidney.warnings



def test_a_misspelt_name_or_a_structure_named_with_no_task_words_is_asked_about(engine,
                                                                                  study):
    """On held-out slice 25 "Segment the livr." gets nano's liver (Dice 0.931) and one
    sentence saying "livr" was read as "liver", no "does not name" warning. On slice 65
    "Segment the hert and the aota." first gets the right lung; asked in nano's phrasing
    about the heart and the aorta, the heart mask has Dice 0.863. "Is the Heart normal?"
    (no task words) first gets a zero-area left-lung box; asked for the heart as detection
    asks, the box returned is that of nano's heart mask (IoU 0.93 with the reference box);
    "Is the hert normal?" gets the same box, with a sentence saying "hert" was read "heart".
    "Segment the R kidney." on slice 22 gets nano's right kidney; "Write a reprot." on slice
    25 a report, asked again as "Write a report." would be."""
    liver = engine.ask(study.volume[SLICE], "Segment the livr.", window="abdomen")
    assert [m.label for m in liver.masks] == ["liver"], liver.text
    assert dice_score(liver.masks[0].array, study.mask("liver", SLICE)) >= 0.85
    assert liver.warnings == ['read "livr" as "liver" in the question (a word the engine '
                              "knows) to check the answer and to ask again."]
    k = 65
    pair = engine.ask(study.volume[k], "Segment the hert and the aota.", window="abdomen")
    assert pair.text.startswith("Sure, the right lung is [SEG] right lung.\n"), pair.text
    assert [m.label for m in pair.masks] == ["heart", "aorta"]
    assert dice_score(pair.masks[0].array, study.mask("heart", k)) >= 0.85
    assert [w for w in pair.warnings if "question" in w] == [pair.warnings[0]]
    heart = engine.ask(study.volume[k], "Is the Heart normal?", window="abdomen")
    assert heart.task == "report" and heart.text.startswith('```json\n[{"bbox_2d"')
    assert [(b.label, b.source) for b in heart.boxes] == [("heart", "mask")], heart.text
    assert box_iou(heart.boxes[0].xyxy, mask_box(study.mask("heart", k))) >= 0.9
    assert not [w for w in heart.warnings if "question" in w], heart.warnings
    # a letter dropped from the name: read as typed it named nothing
    hert = engine.ask(study.volume[k], "Is the hert normal?", window="abdomen")
    assert [b.xyxy for b in hert.boxes] == [b.xyxy for b in heart.boxes], hert.text
    assert hert.warnings[0].startswith('read "hert" as "heart" in the question')
    assert "whether anything here is abnormal" in hert.warnings[1]  # nano was taught none
    # a side shortened as radiologists write it: "R kidney" is the right kidney
    k = 22
    right = engine.ask(study.volume[k], "Segment the R kidney.", window="abdomen")
    assert [m.label for m in right.masks] == ["right kidney"], right.text
    assert dice_score(right.masks[0].array, study.mask("right kidney", k)) >= 0.85
    assert right.warnings[0].startswith('read "r" as "right" in the question')
    # two letters swapped in a report word: asked again for a report, the note said once
    report = engine.ask(study.volume[SLICE], "Write a reprot.", window="abdomen")
    assert report.reasoning and all(step.box_ids for step in report.reasoning), report.text
    assert [w for w in report.warnings if w.startswith("read ")] == [
        'read "reprot" as "report" in the question (a word the engine knows) to check the '
        "answer and to ask again."]

@contextlib.contextmanager
def crop_alone(engine):
    """The engine's closer looks with the crop's view alone (`closer_look_blend` 1.0, the
    released model's), not blended with the whole slice's as nano's config.json asks."""
    blend, engine.config.closer_look_blend = engine.config.closer_look_blend, 1.0
    try:
        yield engine
    finally:
        engine.config.closer_look_blend = blend


def test_a_closer_look_keeps_nanos_mask_or_says_it_does_not(engine, study):
    """nano's recipe ends with a crop round (MODEL_CARD.md, Recipe), and since 2026-12-06 its
    closer look weighs the crop's view and the whole slice's equally (config.json's
    `closer_look_blend` 0.5), so a closer look keeps what its mask of the whole slice marks.
    Asked as the Slicer module asks (the box of a structure and its name): on held-out slice
    22 the left kidney's closer look agrees with nano's whole-slice mask at Dice 0.966 and
    with the reference at 0.924 (crop alone: 0.934), on slice 25 the liver's at 0.940 (crop
    alone 0.918), the cord's on slice 20 at 0.949 (0.964): no warning. On slice 64 the aorta's
    agrees at 0.921, reference 0.607; with the crop alone it spread (Dice 0.254 with the
    whole-slice mask, reference 0.484), and the answer said so. (Before the crop round nano's
    closer looks lost the kidney and halved the liver.) On slice 20 nano, left to write its own
    answer about the cord's crop, writes box numbers and no [SEG]; it is given its
    `segment_answer` (config.json), as a closer look at a named structure is."""
    cord = mask_box(study.mask("spinal cord", 20))
    template, engine.config.segment_answer = engine.config.segment_answer, ""
    try:
        own = engine.closer_look(study.volume[20], "", label="spinal cord", window="abdomen",
                                 roi=cord)
    finally:
        engine.config.segment_answer = template
    assert "[SEG]" not in own.text and not own.masks, own.text
    assert template == "Sure, the {label} is [SEG] {label}."
    for k, name, with_ref in ((22, "left kidney", 0.90), (25, "liver", 0.90),
                              (20, "spinal cord", 0.93)):
        look = engine.closer_look(study.volume[k], "", label=name, window="abdomen",
                                  roi=mask_box(study.mask(name, k)))
        assert [m.label for m in look.masks] == [name]
        assert look.closer_look["answer_given"] is True and look.closer_look["blend"] == 0.5
        assert look.closer_look["dice_with_before"] >= 0.9, look.closer_look
        assert dice_score(look.masks[0].array, study.mask(name, k)) >= with_ref
        assert look.warnings == [], look.warnings
    ref = study.mask("aorta", 64)
    blended = engine.closer_look(study.volume[64], "", label="aorta", window="abdomen",
                                 roi=mask_box(ref))
    assert blended.closer_look["dice_with_before"] == pytest.approx(0.921, abs=0.005)
    assert dice_score(blended.masks[0].array, ref) == pytest.approx(0.607, abs=0.005)
    assert blended.warnings == []
    with crop_alone(engine):
        aorta = engine.closer_look(study.volume[64], "", label="aorta", window="abdomen",
                                   roi=mask_box(ref))
    assert aorta.closer_look["blend"] == 1.0
    assert dice_score(aorta.masks[0].array, ref) == pytest.approx(0.484, abs=0.005)
    assert aorta.closer_look["dice_with_before"] == pytest.approx(0.254, abs=0.005)
    assert aorta.warnings == [
        "the closer look's aorta mask agrees little with the model's own mask of the whole "
        f"slice (Dice {aorta.closer_look['dice_with_before']:.2f} inside the region looked at): "
        "the model may not handle zoomed-in crops well, so compare the two before keeping it."]


def test_a_closer_look_at_the_aorta_looks_at_each_of_its_parts(engine, study):
    """Held-out slice 64 shows the ascending and the descending aorta, apart. A closer look at
    nano's own mask (Dice 0.372 with the reference), with the crop's view alone, crops each
    part on its own and marks the aorta at Dice 0.610, agreeing with the mask sent (0.707):
    no warning. One square around both parts (a box drawn around them; the engine's crop
    before 2026-12-05, Dice 0.245 then) shows each small in a wide crop: Dice 0.324, warned
    about. Blended with the whole slice's view, as nano's config.json asks, this slice does
    worse per part (0.413) and about as badly in one square (0.398), neither warned about:
    one of the cases where the blend loses (over the held-out blocks it lifts the aorta's
    closer looks from 0.668 to 0.713, MODEL_CARD.md)."""
    img, ref = study.volume[64], study.mask("aorta", 64)
    own = engine.ask(img, "Please segment the aorta in this scan.", window="abdomen",
                     task="segment")
    assert [m.label for m in own.masks] == ["aorta"]
    before = own.masks[0].array
    assert dice_score(before, ref) == pytest.approx(0.372, abs=0.005)
    with crop_alone(engine):
        look = engine.closer_look(img, "", mask=before, label="aorta", window="abdomen")
        wide = engine.closer_look(img, "", mask=before, label="aorta", window="abdomen",
                                  roi=main_parts_box(before))
    assert len(look.closer_look["crops"]) == 2 and look.closer_look["answer_given"] is True
    assert dice_score(look.masks[0].array, ref) == pytest.approx(0.610, abs=0.005)
    assert look.closer_look["dice_with_before"] == pytest.approx(0.707, abs=0.005)
    assert look.warnings == []
    assert len(wide.closer_look["crops"]) == 1
    assert dice_score(wide.masks[0].array, ref) == pytest.approx(0.324, abs=0.005)
    assert [w.split(" (Dice")[0] for w in wide.warnings] == [
        "the closer look's aorta mask agrees little with the mask sent"]
    blended = engine.closer_look(img, "", mask=before, label="aorta", window="abdomen")
    assert dice_score(blended.masks[0].array, ref) == pytest.approx(0.413, abs=0.005)
    assert blended.warnings == []


def test_radiograph_report_says_which_cited_boxes_no_mask_confirms(engine, sample_root):
    """On the real chest CR nano's report lists all ten structures it learnt from the DRRs,
    whose boxes it learnt without masks. Its masks (trained on CT slices only) mark none of
    them there, so every box stays as written and the answer says so in one sentence. (Before
    the recipe's crop round nano's masks marked the lungs, heart, liver and stomach there.)"""
    cr = read_study(Path(sample_root) / "studies" / "chest_xray.dcm")
    res = engine.ask(cr.array, "Write a report for this X-ray. Think step by step.")
    assert res.answer.startswith("X-ray, 10 structures"), res.answer
    assert [b.label for b in res.boxes if b.source == "mask"] == []
    assert [b.label for b in res.boxes] == list(NAMES)
    assert res.warnings == [
        "the model's own segmentation marks no right lung, left lung, heart, aorta, liver, "
        "stomach, spleen, right kidney, left kidney or spinal cord in the image, so those boxes "
        "are as the model wrote them, not the box of a mask; treat them as unconfirmed."]


def test_report_trace_cites_boxes(engine, study):
    res = engine.ask(study.volume[SLICE], "Write a report for this CT slice. Think step by step.",
                     window="abdomen")
    assert len(res.reasoning) >= 2, f"no reasoning trace; the model wrote {res.text!r}"
    ids = {b.id for b in res.boxes}
    for step in res.reasoning:
        assert step.box_ids, f"step {step.step} cites no box: {step.text!r}"
        assert set(step.box_ids) <= ids
    assert res.answer.strip()


def test_shipped_example_questions_are_the_recipes():
    """models/nano/example_prompts.json (what the server offers as the Slicer module's
    examples) is what `citrusv train` writes."""
    shipped = read_example_prompts(NANO)
    assert shipped == nano_example_prompts()
    assert {task: len(questions) for task, questions in shipped.items()} == {
        "segment": 4, "detect": 3, "report": 3}
    # and its intended use, shown with each answer, is the model card's first line
    assert read_intended_use(NANO) == NANO_INTENDED_USE
    assert "demonstration only; not for clinical use" in NANO_INTENDED_USE
    assert "**One patient; demonstration only; not for clinical use.**" in (
        NANO / "MODEL_CARD.md").read_text()


def test_each_example_question_is_answered_as_its_task(engine, study, sample_root):
    """Each example question the server offers for nano gets an answer of its task, on the
    held-out slice where the structure it names is largest (with the weights shipped before,
    the general examples the Slicer module showed did not: on held-out slice 64 "Where are
    the kidneys?" got a right lung box, and "Describe the liver: shape, size, position." got
    "Sure, 42, 60, 91, ...")."""
    held_out = held_out_slices()
    examples = nano_example_prompts()
    for task in ("segment", "detect"):
        for question in examples[task]:
            name = max((n for n in NAMES if n in question), key=len)
            k = max(held_out, key=lambda k: study.mask(name, k).sum())
            res = engine.ask(study.volume[k], question,
                             window="lung" if "lung" in name else "abdomen")
            assert not [w for w in res.warnings if "question" in w], (question, res.warnings)
            if task == "segment":
                assert [m.label for m in res.masks] == [name] and not res.boxes, res.text
                pred = res.masks[0].array
                dice = dice_score(pred, study.mask(name, k))
                assert dice >= 0.8, f"{question!r} on slice {k}: Dice {dice:.3f}"
            else:
                assert [b.label for b in res.boxes] == [name] and not res.masks, res.text
    ct_reports, xray_report = examples["report"][:-1], examples["report"][-1]
    for question in ct_reports:
        res = engine.ask(study.volume[64], question, window="abdomen")
        assert len(res.reasoning) >= 4 and all(step.box_ids for step in res.reasoning), res.text
    xray = read_study(Path(sample_root) / "studies" / "chest_xray.dcm")
    assert xray.photometric == "MONOCHROME2"  # the file's MONOCHROME1, mirrored at read
    res = engine.ask(xray.array, xray_report)
    assert len(res.reasoning) >= 4 and all(step.box_ids for step in res.reasoning), res.text
    assert res.answer.startswith("X-ray, "), res.answer


def test_cli_segmentation_on_the_radiograph_says_nano_was_taught_ct_only(sample_root, tmp_path):
    """nano's config.json says it was taught to segment CT (`mask_modalities`): asked for the
    lungs on the demo CR its masks are empty, and the answer says why instead of "may not be
    in view"."""
    from citrusv.cli import main

    assert Engine.load(NANO).config.mask_modalities == ["CT"]
    rc = main(["ask", "--model", str(NANO), "--image",
               str(Path(sample_root) / "studies" / "chest_xray.dcm"),
               "--prompt", "Please segment the left lung in this scan.",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in data["masks"]] == ["left lung"]
    assert data["masks"][0]["area_px"] == 0
    assert not [w for w in data["warnings"] if "may not be in view" in w], data["warnings"]
    assert ("this model was taught to segment CT images only, and this image is CR by its "
            "DICOM header") in data["warnings"][-1]


def test_masks_on_a_bare_array_with_no_ct_values_say_nano_was_taught_ct_only(engine, study,
                                                                             sample_root):
    """The demo radiograph's pixels as a bare array (no header: as a NIfTI or NRRD of it, or
    an MR volume, reaches the engine) have no value below -500, so they are no CT: nano's
    left-lung mask there gets the sentence that it was taught CT only; a CT slice, or the
    same pixels with a CT window chosen, does not."""
    from citrusv.engine import NOT_CT_BY_VALUES

    xray = read_study(Path(sample_root) / "studies" / "chest_xray.dcm")
    question = "Please segment the left lung in this scan."
    res = engine.ask(xray.array, question)
    assert [m.label for m in res.masks] == ["left lung"] and res.warnings[-1] == NOT_CT_BY_VALUES
    assert not [w for w in res.warnings if "may not be in view" in w], res.warnings
    assert NOT_CT_BY_VALUES not in engine.ask(xray.array, question, window="lung").warnings
    assert NOT_CT_BY_VALUES not in engine.ask(study.volume[SLICE], question).warnings


def test_cli_segmentation_on_a_picture_says_it_names_no_kind(sample_root, tmp_path):
    """The same radiograph as a PNG carries no Modality: `citrusv ask` adds the sentence that
    a picture names no kind and nano was taught to segment CT only, as the server does."""
    import pydicom
    from PIL import Image

    from citrusv.cli import main

    ds = pydicom.dcmread(Path(sample_root) / "studies" / "chest_xray.dcm")
    px = ds.pixel_array.astype(float)
    png = tmp_path / "cxr.png"
    Image.fromarray((255 * (px.max() - px) / (px.max() - px.min())).astype(np.uint8)).save(png)
    rc = main(["ask", "--model", str(NANO), "--image", str(png),
               "--prompt", "Please segment the left lung in this scan.",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["label"] for m in data["masks"]] == ["left lung"]
    assert data["warnings"][-1].startswith(
        "this image is a picture file, which does not say what kind of image it is, and this "
        "model was taught to segment CT images only")

def test_cli_report_on_a_mislabelled_radiograph_warns_of_the_kind(sample_root, tmp_path, capsys):
    # the demo CR with its MONOCHROME1 header changed to MONOCHROME2 reaches nano bone dark;
    # nano then calls it a CT, and `citrusv ask` says the DICOM disagrees, as the server does
    import pydicom

    from citrusv.cli import main

    ds = pydicom.dcmread(Path(sample_root) / "studies" / "chest_xray.dcm")
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "mislabelled.dcm")
    rc = main(["ask", "--model", str(NANO), "--image", str(tmp_path / "mislabelled.dcm"),
               "--prompt", "Write a report for this X-ray. Think step by step.",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["answer"].startswith("CT, "), data["answer"]
    assert data["warnings"][-1].startswith(
        "The answer calls this image CT, but the study is CR (X-ray) by its DICOM header")
    assert "CR (X-ray) by its DICOM header" in capsys.readouterr().out


def test_citrusv_ask_over_a_slice_range_gives_the_volume(study, tmp_path, capsys):
    """`citrusv ask --slice 35-45` asks nano over the range, as the server does: the spleen's
    volume over those slices is within 10 % of the reference's (83.6 mL), the answer and the
    volume line are printed, and the PNG shows the slice where the spleen mask is largest."""
    from PIL import Image

    from citrusv.cli import main

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["ask", "--model", str(NANO), "--image",
               str(Path(__file__).resolve().parents[2] / "sample_data/studies/chest_ct.nii.gz"),
               "--slice", "35-45", "--prompt", "Please segment the spleen in this scan.",
               "--window", "abdomen", "--json", str(out), "--png", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    ref = sum(int(study.mask("spleen", k).sum()) for k in range(35, 46))
    ref_ml = ref * float(np.prod(study.spacing)) / 1000
    assert data["image"]["slices"] == list(range(35, 46))
    assert data["volumes_ml"]["spleen"] == pytest.approx(ref_ml, rel=0.1)
    assert f"volume 'spleen': {data['volumes_ml']['spleen']:.1f} mL" in printed
    assert data["answer"].startswith("Over slices 35-45 (11 slices): spleen marked on")
    area = {m["slice"]: m["area_px"] for m in data["masks"] if m["label"] == "spleen"}
    fullest = max(sorted(area), key=area.get)
    assert f"overlay: {png} shows slice {fullest}" in printed
    assert sum(line.startswith("mask 'spleen' slice ") for line in printed.splitlines()) == \
        sum(1 for a in area.values() if a)  # only the slices where it was marked
    with Image.open(png) as img:
        assert img.height >= 512


@pytest.mark.parametrize("k, question, whole, marks, dice", [
    (65, "Segment the left upper lobe.", "left lung", "lungs, not their lobes, so mark the lobe",
     0.9),
    (65, "Segment the left ventricle.", "heart",
     "the heart as one, not its chambers, so mark the chamber", 0.8),
    (25, "Segment the caudate lobe.", "liver",
     "the liver as one, not its lobes or segments, so mark the part", 0.85),
])
def test_a_part_is_answered_with_its_whole_and_a_sentence(engine, study, k, question, whole,
                                                          marks, dice):
    """nano marks wholes: asked for the left upper lobe on held-out slice 65 it segments the
    right lung; asked again for the lobe's lung, the left lung (Dice 0.957 measured), which the
    answer gives with one sentence saying it is the whole lung. The left ventricle there gets
    the heart (0.863), the caudate lobe on slice 25 the liver (0.930)."""
    res = engine.ask(study.volume[k], question, window="abdomen", slice_index=k,
                     spacing=tuple(study.spacing[1:]))
    assert [m.label for m in res.masks] == [whole], res.text
    assert dice_score(res.masks[0].array, study.mask(whole, k)) >= dice
    part = question.removeprefix("Segment the ").rstrip(".")
    assert res.warnings == [
        f"the question asks for the {part}, and the answer's mask is of the {whole} as a whole: "
        f"the model marks {marks} yourself."]


@pytest.mark.parametrize("k, question, name, dice", [
    (25, "Paint the liver.", "liver", 0.9),  # 0.931 measured
    (65, "Draw the heart.", "heart", 0.8),  # 0.863
    (65, "Mark the left lung.", "left lung", 0.9),  # 0.957
])
def test_an_annotation_verb_gets_a_mask(engine, study, k, question, name, dice):
    """A question opened by an annotation tool's verb is a segmentation: nano, which answers
    these words with a box or "No liver is visible", is asked again in its own phrasing and
    its mask comes back."""
    res = engine.ask(study.volume[k], question, window="abdomen", slice_index=k,
                     spacing=tuple(study.spacing[1:]))
    assert res.task == "segment"
    assert [m.label for m in res.masks] == [name], res.text
    assert dice_score(res.masks[0].array, study.mask(name, k)) >= dice


def test_which_kidney_is_larger_is_answered_from_the_masks(engine, study):
    """On held-out slice 22 the reference left kidney has 55 % more pixels than the right
    (1297 against 838); nano's masks, 74 % more (1558 against 896): the answer says which is
    larger, with both areas, and that one slice is not the organs' size."""
    k = 22
    res = engine.ask(study.volume[k], "Which kidney is larger?", window="abdomen",
                     slice_index=k, spacing=tuple(study.spacing[1:]))
    assert res.task == "segment"
    area = {m.label: m.area_px for m in res.masks}
    assert area["left kidney"] > 1.1 * area["right kidney"] > 0
    assert study.mask("left kidney", k).sum() > 1.1 * study.mask("right kidney", k).sum()
    assert res.answer.startswith("On this slice the left kidney is the larger (")
    assert res.answer.endswith("One slice is one cross-section: ask over a slice range for "
                               "their volumes.")


def test_the_largest_organ_is_found_among_all_the_structures(engine, study):
    """"Which is the largest organ on this slice?" asks for every structure (as "Segment all
    organs." does) and compares their masks: on held-out slice 65 the right lung (28053 px;
    the reference's largest too, 28242), then the left lung and the heart."""
    k = 65
    res = engine.ask(study.volume[k], "Which is the largest organ on this slice?",
                     window="abdomen", slice_index=k, spacing=tuple(study.spacing[1:]))
    order = [m.label for m in sorted(res.masks, key=lambda m: -m.area_px)]
    assert order[:3] == ["right lung", "left lung", "heart"], res.text
    assert res.answer.startswith("On this slice the right lung is the largest (")


def test_a_question_naming_nothing_nano_knows_is_answered_with_a_report(engine, study):
    """nano was taught ten structures and no findings (config.json's `structures`). Asked
    "What is this?" or "Is there a pleural effusion?" on held-out slice 65 it wrote a box of
    the left lung (of zero area for the first), which answered nothing; the engine now asks
    for its report, whose steps cite boxes, and says first that nano cannot tell whether
    there is an effusion."""
    k = 65
    for question in ("What is this?", "Is there a pleural effusion?",
                     "What is in the chest?"):  # a region names no structure
        res = engine.ask(study.volume[k], question, window="abdomen", slice_index=k,
                         spacing=tuple(study.spacing[1:]))
        assert res.task == "report"
        assert len(res.reasoning) >= 4 and all(s.box_ids for s in res.reasoning), res.text
        assert res.answer.startswith("CT, "), res.answer
        cited = {b.label for b in res.boxes}
        assert {"right lung", "left lung", "heart"} <= cited, cited
        if "effusion" in question:
            assert res.warnings[0].startswith("citrusv-nano was taught no findings, only normal "
                                              "anatomy (it was taught only the right lung, ")
            assert "whether the image shows any effusion" in res.warnings[0]
        else:
            assert not [w for w in res.warnings if "was taught" in w], res.warnings


def test_a_structure_nano_was_not_taught_is_said_and_not_asked_again(engine, study):
    """"Segment the pancreas." on held-out slice 25: nano writes a liver mask; the answer says
    first that nano was not taught the pancreas, and the engine asks it nothing again (before,
    it asked "Please segment the pancreas in this scan." and said the model "may not know
    it"). "Is the liver normal?" keeps its liver answer, with the sentence that nano cannot
    tell whether anything is abnormal."""
    k = SLICE
    res = engine.ask(study.volume[k], "Segment the pancreas.", window="abdomen", slice_index=k,
                     spacing=tuple(study.spacing[1:]))
    assert res.warnings[0].startswith("citrusv-nano was not taught the pancreas (")
    assert "\n" not in res.text.strip(), res.text  # one answer: nothing asked again
    assert not [w for w in res.warnings if "asked about it again" in w or "rephrase" in w]
    res = engine.ask(study.volume[k], "Is the liver normal?", window="abdomen", slice_index=k,
                     spacing=tuple(study.spacing[1:]))
    assert [b.label for b in res.boxes] == ["liver"], res.text
    assert res.boxes[0].source == "mask"  # the box of nano's liver mask (IoU 0.46 measured)
    assert "whether anything here is abnormal" in res.warnings[0]


def test_a_question_in_french_says_nano_was_taught_english(engine, study):
    """"Segmentez le foie." on held-out slice 25: nano writes a left-lung box. The answer
    said the question asks for "the le foie" (its "segmentez" read as "segment") and asked
    nano "Please segment the le foie in this scan."; now its first sentence says the question
    reads as French and nano was taught English questions only, and nothing is asked again.
    The same question in English gets no such sentence, and nano's liver (Dice >= 0.8)."""
    k = SLICE
    res = engine.ask(study.volume[k], "Segmentez le foie.", task="segment", window="abdomen",
                     slice_index=k, spacing=tuple(study.spacing[1:]))
    assert res.warnings[0] == (
        'the question reads as French ("segmentez", "le", "foie"), and citrusv-nano was taught '
        "questions in English only, so its answer may not be about what you asked: ask in "
        'English ("Please segment the liver in this scan.").')
    assert res.text.count("```json") == 1 == len(res.boxes), res.text  # nothing asked again
    assert not [w for w in res.warnings[1:] if "foie" in w or "segmentez" in w
                or "rephrase" in w], res.warnings
    res = engine.ask(study.volume[k], "Please segment the liver in this scan.", task="segment",
                     window="abdomen", slice_index=k, spacing=tuple(study.spacing[1:]))
    assert not [w for w in res.warnings if "reads as" in w], res.warnings
    assert dice_score(res.masks[0].array, study.mask("liver", k)) >= 0.8
    # a closer look asked in French says so once, and nothing about what it does not name
    look = engine.closer_look(study.volume[k], "Segmentez le foie.", roi=[80, 110, 300, 320],
                              window="abdomen", slice_index=k)
    assert look.warnings[0].startswith('the question reads as French ("segmentez", "le", "foie")')
    assert not [w for w in look.warnings[1:] if "reads as" in w or "does not name" in w
                or "rephrase" in w], look.warnings


def test_what_is_said_of_the_question_is_said_once_over_a_range(engine, study):
    """Over slices 44-45, the sentence on the question's language and the one on a structure
    nano was not taught come once, first, not as "slices 44-45: ..." (they are of the
    question, not of a slice); what is of the answers keeps its slices."""
    for question, first in (("Segmentez le foie.", "the question reads as French ("),
                            ("Segment the pancreas.", "citrusv-nano was not taught the pancreas")):
        res = engine.ask_volume(study.volume, question, slices=[44, 45], window="abdomen",
                                spacing=tuple(study.spacing))
        assert res.warnings[0].startswith(first), res.warnings
        assert not [w for w in res.warnings[1:] if first in w], res.warnings
        assert all(w.startswith("slices 44-45: ") for w in res.warnings
                   if "the question does not name" in w), res.warnings


def test_a_name_typed_with_two_slips_is_read_as_the_name_nano_answers_with(engine, study):
    """"Segment the lvir." (two slips from "liver", closer to no name than difflib's 0.8):
    nano segments the liver on held-out slice 25, and the answer said the question did not
    name the liver and had nothing about "the lvir". Read by the answer's name, it has one
    sentence saying so, and the mask is nano's liver."""
    k = SLICE
    for typed in ("lvir", "lvr"):
        res = engine.ask(study.volume[k], f"Segment the {typed}.", window="abdomen",
                         slice_index=k, spacing=tuple(study.spacing[1:]))
        assert [m.label for m in res.masks] == ["liver"], res.text
        assert dice_score(res.masks[0].array, study.mask("liver", k)) >= 0.85
        assert res.warnings == [f'read "{typed}" as "liver" in the question (the name the '
                                "answer gives) to check the answer."]


def test_a_garbled_answer_is_asked_again(engine, study):
    """nano asked by a name alone on held-out slice 108 begins a box and breaks off
    ('```json [{"bbox_2d": [84, the liver is [SEG] liver.'). Asked "heart", that answer is
    about the liver and is replaced as any such answer is; asked "liver", it is about the
    liver, but garbled, so it is asked again too, and the trained question's answer takes its
    place (the garbled output stays first in `text`)."""
    k = 108
    for name in ("heart", "liver"):
        res = engine.ask(study.volume[k], name, task="segment", window="abdomen")
        assert res.text.startswith('```json\n[{"bbox_2d": [84, the liver is [SEG] liver.')
        assert res.answer == f"Sure, the {name} is [SEG] {name}."
        assert [m.label for m in res.masks] == [name]
        assert not any("garbled" in w for w in res.warnings), res.warnings
        dice = dice_score(res.masks[0].array, study.mask(name, k))
        assert dice >= 0.8, (name, dice)


def test_a_size_asked_for_is_measured_on_the_mask(engine, study):
    """"Measure the liver." on held-out slice 25: nano writes "No liver is visible in this
    image." and, asked again, gives its liver mask; that sentence was the answer, with no
    size. Now the answer is the mask's area and axes, the sentence about what nano wrote says
    it is the written answer (in `text`), and the area is the mask's."""
    k = SLICE
    res = engine.ask(study.volume[k], "Measure the liver.", window="abdomen", slice_index=k,
                     spacing=tuple(study.spacing[1:]))
    assert "No liver is visible" in res.text
    liver = [m for m in res.masks if m.label == "liver"]
    assert len(liver) == 1 and dice_score(liver[0].array, study.mask("liver", k)) >= 0.8
    area = liver[0].plane_sizes()["area_mm2"]
    assert res.answer.startswith(f"On this slice, measured on the model's mask: liver "
                                 f"{area:.1f} mm², "), res.answer
    assert any(w.startswith("the model's written answer says no liver is visible")
               for w in res.warnings), res.warnings
    assert not any(w.startswith("the answer says") for w in res.warnings)


def test_a_garbled_answer_to_a_question_for_every_structure_gives_way(engine, study):
    """nano asked "Segment everything except the lungs." on held-out slice 65 begins
    'Sure, 43, 126, 126label": "label": "right lung"}]': broken pieces of a box list. That
    first answer stayed in front of the structures asked for one by one, with no word; now it
    is called garbled, so the answers asked again take its place (it stays first in `text`)."""
    k = 65
    res = engine.ask(study.volume[k], "Segment everything except the lungs.", window="abdomen",
                     slice_index=k, spacing=tuple(study.spacing[1:]))
    assert res.text.startswith('Sure, 43, 126, 126label": "label": "right lung"}]'), res.text
    assert res.answer.startswith("Sure, the heart is [SEG] heart."), res.answer
    assert '"label"' not in res.answer
    assert not [w for w in res.warnings if "garbled" in w], res.warnings
    labels = [m.label for m in res.masks]
    assert "heart" in labels and "aorta" in labels and not any("lung" in x for x in labels)
    heart = next(m for m in res.masks if m.label == "heart")
    assert dice_score(heart.array, study.mask("heart", k)) >= 0.8


@pytest.mark.parametrize("k, label, window, pair, at_least", [
    (65, "Lungs", "lung", "lung", 0.95),  # measured 0.978; was 5178 px of "lungs"
    (20, "kidney", "abdomen", "kidney", 0.85),  # measured 0.918; was an empty mask
])
def test_a_closer_look_at_a_pair_named_as_one_looks_at_each_side(engine, study, k, label,
                                                                 window, pair, at_least):
    """A segment named after a pair ("Lungs", "kidney") was given to nano as one structure it
    was never taught ("Sure, the lungs is [SEG] lungs."): on held-out slice 65 its crop marked
    5178 px where the reference's lungs are 45935 px, and on slice 20 no kidney at all. Each
    side is now looked at on its own and the masks joined."""
    res = engine.closer_look(study.volume[k], "", label=label, window=window, slice_index=k)
    sides = [f"right {pair}", f"left {pair}"]
    assert [m.label for m in res.masks] == sides
    assert [s["label"] for s in res.closer_look["sides"]] == sides
    ref = study.mask(sides[0], k).astype(bool) | study.mask(sides[1], k).astype(bool)
    joined = res.masks[0].array | res.masks[1].array
    assert dice_score(joined, ref) >= at_least
    assert res.closer_look["area_px_after"] == int(joined.sum())
    assert res.closer_look["dice_with_before"] == min(
        s["dice_with_before"] for s in res.closer_look["sides"])


def test_a_closer_look_asked_for_a_pair_looks_at_each_side(engine, study):
    """With no segment named, "Segment the lungs." on held-out slice 65 gave an empty "lungs"
    mask (the crop around the right lung, the model asked for "lungs" there); now each lung
    is looked at on its own."""
    k = 65
    for question in ("Segment the lungs.", "Segment both lungs."):
        res = engine.closer_look(study.volume[k], question, window="lung", slice_index=k)
        assert [m.label for m in res.masks] == ["right lung", "left lung"], question
        ref = study.mask("right lung", k).astype(bool) | study.mask("left lung", k).astype(bool)
        assert dice_score(res.masks[0].array | res.masks[1].array, ref) >= 0.95  # 0.978
    res = engine.closer_look(study.volume[k], "Segment the heart.", window="lung", slice_index=k)
    assert "sides" not in res.closer_look  # one structure: one look


def test_a_closer_look_at_a_pair_says_which_side_it_left_out(engine, study):
    """Slice 27 has nano's left kidney and no right one (the reference's right kidney ends on
    slice 24): the look is of the left alone, with a sentence; slice 60 has neither, and
    the one sentence that there is no region."""
    res = engine.closer_look(study.volume[27], "", label="Kidneys", window="abdomen",
                             slice_index=27)
    assert [m.label for m in res.masks] == ["left kidney"]
    assert res.warnings[-1] == ("the model marks no right kidney on this slice, so only the "
                                "left kidney was looked at closer.")
    with pytest.raises(InputError, match=r"^the model marks neither the right kidney nor the "
                                         r"left kidney on this slice, so there is no region"):
        engine.closer_look(study.volume[60], "", label="Kidneys", window="abdomen")


def test_a_closer_look_at_a_structure_nano_was_not_taught_says_so(engine, study):
    res = engine.closer_look(study.volume[SLICE], "", roi=[21, 102, 264, 345], label="Pancreas",
                             window="abdomen")
    assert res.warnings[0].startswith("citrusv-nano was not taught the pancreas"), res.warnings
