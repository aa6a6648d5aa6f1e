import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citrusv import Engine, InputError, rle
from citrusv.engine import (FOLLOW_UP_PROMPTS, ONE_SLICE_VOLUME, REPORT_AGAIN_PROMPT, absent_box_warning, absent_members, asked_members, box_pixels, closer_look_warning, main_parts_box,
                            slice_list)
from citrusv.generation import generate_capturing, image_embeddings, teacher_force
from citrusv.imaging import smart_resize
from citrusv.prompting import pixel_inputs, text_inputs
from citrusv.testing import write_tiny_checkpoint
from citrusv.training import dice_score
from .conftest import ANSWERS

FORCED = (
    "<think>1. The liver <bbox>[28, 14, 84, 70]</bbox> is enlarged.\n"
    "2. The 'spleen' with bbox [0, 42, 28, 84] is normal.</think>"
    "<answer>The liver is [SEG] and the spleen: [SEG].\n"
    '```json\n[{"bbox_2d": [28, 14, 84, 70], "label": "liver"}]\n```\n'
    "<|object_ref_start|>kidney<|object_ref_end|><|box_start|>(56,28),(200,90)<|box_end|>"
    "</answer>"
)


def ct_slice(h=100, w=150, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(-100, 50, (h, w)).astype(np.float32)
    img[20:70, 30:90] = 60.0
    return img


def test_injected_generation_gives_masks_boxes_and_trace(engine):
    img = ct_slice()
    res = engine.ask(img, "Write a report, think step by step.", window="abdomen",
                     forced_text=FORCED, slice_index=7, spacing=(0.5, 0.8))
    assert res.task == "report" and res.text == FORCED
    # masks: one per [SEG], slice shape, labelled from the text around each [SEG]
    assert [(m.label, m.label_index, m.array.shape, m.array.dtype) for m in res.masks] == [
        ("liver", 1, (100, 150), np.dtype(bool)), ("spleen", 2, (100, 150), np.dtype(bool))]
    assert all(0.0 <= m.score <= 1.0 for m in res.masks)
    # boxes: Qwen frame (84 x 112 for a 100 x 150 slice with the tiny pixel limits) -> input
    assert smart_resize(100, 150, 28, engine.config.min_pixels, engine.config.max_pixels) == (
        84, 112)
    sx, sy = 150 / 112, 100 / 84
    boxes = {b.id: (b.label, b.xyxy) for b in res.boxes}
    assert set(boxes) == {"b1", "b2", "b3"}
    assert boxes["b1"][0] == "liver"
    np.testing.assert_allclose(boxes["b1"][1], [28 * sx, 14 * sy, 84 * sx, 70 * sy])
    assert boxes["b2"][0] == "spleen"
    np.testing.assert_allclose(boxes["b2"][1], [0, 42 * sy, 28 * sx, 84 * sy])
    assert boxes["b3"][0] == "kidney"  # (200, 90) lies outside the frame: clipped to the slice
    np.testing.assert_allclose(boxes["b3"][1], [56 * sx, 28 * sy, 150, 100])
    # trace: ordered steps citing boxes that exist
    assert [(s.step, s.box_ids) for s in res.reasoning] == [(1, ["b1"]), (2, ["b2"])]
    assert res.answer.startswith("The liver is [SEG]")
    # JSON per docs/api.md
    data = json.loads(json.dumps(res.to_json()))
    assert set(data) >= {"task", "prompt", "model", "text", "answer", "reasoning", "boxes",
                         "masks", "image", "timing_ms", "warnings", "label_names"}
    m0 = data["masks"][0]
    assert m0["slice"] == 7 and m0["area_px"] == res.masks[0].area_px
    assert m0["area_mm2"] == pytest.approx(res.masks[0].area_px * 0.4, rel=1e-6)
    np.testing.assert_array_equal(rle.decode(m0["rle"]), res.masks[0].array)
    assert data["boxes"][0]["slice"] == 7 and data["label_names"] == {"liver": 1, "spleen": 2}
    # a box's size in mm from the slice's spacing (rows 0.5 mm, columns 0.8 mm), measured
    assert data["boxes"][0]["size_mm"] == [round(56 * sx * 0.8, 1), round(56 * sy * 0.5, 1)]
    assert engine.ask(img, "Find the liver.", forced_text=FORCED).to_json()["boxes"][0][
        "size_mm"] is None  # no spacing given: no size
    assert not [w for w in res.warnings if w.startswith("the sizes")]  # the answer gives none
    # an answer whose size for a structure is off its box's by more than a fifth says so
    sized = FORCED.replace("The liver is [SEG]", "The liver (30 x 20 mm) is [SEG]")
    said = engine.ask(img, "Write a report, think step by step.", window="abdomen",
                      forced_text=sized, slice_index=7, spacing=(0.5, 0.8))
    w, h = said.boxes[0].size_mm
    assert [x for x in said.warnings if x.startswith("the sizes")] == [
        f"the sizes the answer gives differ by more than a fifth from those of its boxes (liver "
        f"30 x 20 mm written, box {w:.0f} x {h:.0f} mm): the boxes' sizes are measured from "
        f"the image's pixel spacing, the answer's are as the model wrote them."]
    assert data["image"]["slices"] == [7] and data["image"]["shape"] == [1, 100, 150]
    assert set(data["timing_ms"]) >= {"prefill", "decode", "mask", "total"}


def test_several_seg_tokens_use_their_own_hidden_states(engine):
    img = ct_slice()
    one = engine.ask(img, "Segment the liver.", window="abdomen", forced_text="liver [SEG]")
    two = engine.ask(img, "Segment the liver.", window="abdomen",
                     forced_text="liver [SEG] spleen [SEG]")
    np.testing.assert_array_equal(one.masks[0].array, two.masks[0].array)
    assert len(two.masks) == 2


def test_real_greedy_generation_emits_seg_and_boxes(fitted_engine):
    img = ct_slice(120, 90, seed=3)
    seg = fitted_engine.ask(img, "Please segment the liver in this scan.", window="abdomen")
    assert seg.text == ANSWERS["segment"]
    assert [(m.label, m.array.shape) for m in seg.masks] == [("liver", (120, 90))]
    det = fitted_engine.ask(img, "Where is the liver?", window="abdomen")
    assert det.task == "detect" and det.text == ANSWERS["detect"] and det.masks == []
    fh, fw = det_frame = smart_resize(120, 90, 28, fitted_engine.config.min_pixels,
                                      fitted_engine.config.max_pixels)
    assert det_frame == (112, 84)
    np.testing.assert_allclose(det.boxes[0].xyxy, [28 * 90 / fw, 14 * 120 / fh,
                                                   84 * 90 / fw, 70 * 120 / fh])
    rep = fitted_engine.ask(img, "Write a report, think step by step.", window="abdomen")
    assert rep.reasoning[0].box_ids == ["b1"] and rep.answer == "Normal liver [SEG]."
    assert len(rep.masks) == 1


def test_box_score_is_the_models_probability_of_the_coordinates(fitted_engine):
    """A box's score is the geometric mean of the probabilities the model gave the tokens
    that write its four numbers; decoding and a teacher-forced pass agree on them."""
    e = fitted_engine
    img = ct_slice(120, 90, seed=3)
    det = e.ask(img, "Where is the liver?", window="abdomen")
    state = e.set_image(img, window="abdomen")
    pix = pixel_inputs(e.processor.image_processor, state.frame)
    ids = text_inputs(e.tokenizer, e.config.task_system_prompts["detect"], "Where is the liver?",
                      pix["image_grid_thw"], e.merge_size)
    emb = image_embeddings(e.model.mllm, pix["pixel_values"], pix["image_grid_thw"])
    gen = generate_capturing(e.model.mllm, ids, pix["image_grid_thw"], emb,
                             e.config.seg_token_idx, e.eos_ids, 200)
    assert e.tokenizer.decode(gen.token_ids) == ANSWERS["detect"]
    forced = teacher_force(e.model.mllm, ids, pix["image_grid_thw"], emb, gen.token_ids,
                           e.config.seg_token_idx)
    np.testing.assert_allclose(gen.token_probs, forced.token_probs, atol=1e-4)
    # the tokens that write a digit of [28, 14, 84, 70] ("bbox_2d" is not a coordinate)
    text = ANSWERS["detect"]
    lo = text.index("[28")
    digits = {i for i in range(lo, text.index("]", lo)) if text[i].isdigit()}
    nums, pos = [], 0
    for t, p in zip(gen.token_ids, gen.token_probs):
        piece = e.tokenizer.decode([t])
        if digits & set(range(pos, pos + len(piece))):
            nums.append(p)
        pos += len(piece)
    assert pos == len(text) and 4 <= len(nums) <= 8
    expected = float(np.exp(np.mean(np.log(nums))))
    assert det.boxes[0].score == pytest.approx(expected, rel=2e-3)  # engine: cached prefix
    assert 0.5 < det.boxes[0].score <= 1.0  # a fitted answer is a confident one
    assert det.to_json()["boxes"][0]["score"] == round(det.boxes[0].score, 4)


@pytest.mark.parametrize("offset", [0, -1])
def test_capture_while_generating_equals_teacher_forced_states(fitted_engine, offset):
    """The [SEG] state read during decoding is the one a second full pass would give."""
    e = fitted_engine
    state = e.set_image(ct_slice(), window="abdomen")
    pix = pixel_inputs(e.processor.image_processor, state.frame)
    system = e.config.task_system_prompts["report"]
    ids = text_inputs(e.tokenizer, system, "Describe it.", pix["image_grid_thw"], e.merge_size)
    emb = image_embeddings(e.model.mllm, pix["pixel_values"], pix["image_grid_thw"])
    seg = e.config.seg_token_idx
    gen = generate_capturing(e.model.mllm, ids, pix["image_grid_thw"], emb, seg, e.eos_ids,
                             200, offset)
    assert gen.token_ids.count(seg) == 1 and gen.seg_hidden.shape == (1, 64)
    forced = teacher_force(e.model.mllm, ids, pix["image_grid_thw"], emb, gen.token_ids, seg,
                           offset)
    torch.testing.assert_close(gen.seg_hidden, forced.seg_hidden, atol=1e-4, rtol=1e-4)
    other = teacher_force(e.model.mllm, ids, pix["image_grid_thw"], emb, gen.token_ids, seg,
                          -1 - offset)
    assert not torch.allclose(other.seg_hidden, forced.seg_hidden)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_second_question_on_same_slice_skips_image_encoders(engine):
    sam_calls, h1 = _count_calls(engine.model.sam2.image_encoder)
    vit_calls, h2 = _count_calls(engine.model.mllm.model.visual)
    try:
        img = ct_slice(seed=11)
        engine.ask(img, "Segment the liver.", window="abdomen", forced_text="liver [SEG]")
        engine.ask(img.copy(), "Segment the spleen.", window="abdomen",
                   forced_text="spleen [SEG]")
        assert (len(sam_calls), len(vit_calls)) == (1, 1)
        engine.ask(img, "Segment the liver.", window="lung", forced_text="liver [SEG]")
        assert (len(sam_calls), len(vit_calls)) == (2, 2)
    finally:
        h1.remove()
        h2.remove()
    assert engine.cache.hits >= 1


def test_cache_respects_memory_budget(tiny_dir):
    e = Engine.load(tiny_dir, cache_budget_mb=0.5)
    for seed in range(4):
        e.ask(ct_slice(seed=seed), "Segment the liver.", window="abdomen",
              forced_text="liver [SEG]")
    assert len(e.cache) == 1  # each entry is over the budget: only the newest is kept
    big = Engine.load(tiny_dir, cache_budget_mb=512)
    for seed in range(4):
        big.ask(ct_slice(seed=seed), "Segment the liver.", window="abdomen",
                forced_text="liver [SEG]")
    assert len(big.cache) == 4 and big.cache.nbytes > 0


@pytest.mark.parametrize("image, prompt, field", [
    (np.zeros((32, 32)), "", "prompt"),
    (np.zeros((32, 32)), "   ", "prompt"),
    (np.zeros((32, 32)), "???", "prompt"),  # nano answered it with a zero-area box
    (np.zeros((32, 32)), " 65 ", "prompt"),
    (np.zeros(32), "Segment the liver.", "image"),
    (np.zeros((2, 3, 32, 32)), "Segment the liver.", "image"),
    (np.full((32, 32), np.nan), "Segment the liver.", "image"),
])
def test_bad_input_is_one_plain_sentence(engine, image, prompt, field):
    with pytest.raises(InputError) as err:
        engine.ask(image, prompt)
    assert isinstance(err.value, ValueError) and err.value.field == field
    assert str(err.value).endswith(".") and "\n" not in str(err.value)


def test_pixel_limit_and_unknown_task(tiny_dir, engine):
    small = Engine.load(tiny_dir, max_pixels=1000)
    with pytest.raises(InputError, match="over the limit of 1000"):
        small.ask(np.zeros((40, 40)), "Segment the liver.")
    with pytest.raises(InputError, match="task 'paint' is unknown"):
        engine.ask(np.zeros((40, 40)), "Segment the liver.", task="paint")


def test_closer_look_crops_square_roi_and_pastes_back(engine):
    img = ct_slice(120, 160, seed=5)
    res = engine.closer_look(img, "Segment the liver.", roi=[40, 30, 80, 60], margin=0.15,
                             window="abdomen", forced_text="liver [SEG] <bbox>[0, 0, 64, 64]"
                             "</bbox>")
    assert res.closer_look["roi"] == [40, 30, 80, 60]
    x1, y1, x2, y2 = res.closer_look["crop"]
    assert x2 - x1 == y2 - y1 == 52  # 40 px side * (1 + 2 * 0.15)
    assert x1 <= 40 and y1 <= 30 and x2 >= 80 and y2 >= 60
    assert res.task == "closer_look" and res.masks[0].array.shape == (120, 160)
    outside = res.masks[0].array.copy()
    outside[30:60, 40:80] = False  # kept inside the user's roi
    assert not outside.any()
    assert res.closer_look["area_px_after"] == res.masks[0].area_px
    # the first pass, asked for the comparison: its pixels inside the roi (was None, beside a
    # dice_with_before computed from them)
    first = engine.ask(img, "Segment the liver.", window="abdomen",
                       forced_text="liver [SEG] <bbox>[0, 0, 64, 64]</bbox>").masks[0].array
    assert res.closer_look["area_px_before"] == int(first[30:60, 40:80].sum())
    box = res.boxes[0].xyxy  # model frame of the canonical crop -> slice pixels
    size = engine.config.image_size
    fh, fw = smart_resize(size, size, 28, engine.config.min_pixels, engine.config.max_pixels)
    np.testing.assert_allclose(box, [x1, y1, x1 + 64 / fw * 52, y1 + 64 / fh * 52], atol=1e-6)
    assert res.to_json()["closer_look"]["crop"] == [x1, y1, x2, y2]


def test_a_closer_look_blends_each_label_with_its_own_whole_slice_view(tiny_dir):
    """`closer_look_blend` below 1: a crop mask is blended with the whole slice's view of its
    own label only (a liver certain on the whole slice fills the liver inside the square and
    leaves the spleen as the crop marks it), and the result says which blend was used."""
    engine = Engine.load(tiny_dir)  # its own: the config is changed
    engine.config.closer_look_blend = 0.5
    img = ct_slice(120, 160, seed=7)
    text, square = "liver [SEG] spleen [SEG]", [40, 30, 92, 82]
    question = "Segment the liver and the spleen."

    def masks(**kw):
        res = engine._look(img, square, "abdomen", None, question, text, None, **kw)
        return {m.label: m.array for m in res.masks}

    alone = masks()
    blended: set[str] = set()
    mixed = masks(whole={"liver": np.ones((120, 160), np.float32)}, blend=0.5,
                  blended=blended)
    assert set(alone) == set(mixed) == {"liver", "spleen"} and blended == {"liver"}
    inside = np.zeros((120, 160), bool)
    inside[30:82, 40:92] = True
    np.testing.assert_array_equal(mixed["liver"], inside)
    np.testing.assert_array_equal(mixed["spleen"], alone["spleen"])
    res = engine.closer_look(img, question, roi=square, window="abdomen", forced_text=text)
    assert res.closer_look["blend"] == 0.5 and res.timing_ms["whole_view"] > 0
    engine.config.closer_look_blend = 1.0  # the crop alone: no whole-slice pass
    res = engine.closer_look(img, question, roi=square, window="abdomen", forced_text=text)
    assert res.closer_look["blend"] == 1.0 and "whole_view" not in res.timing_ms


def test_closer_look_from_previous_mask(engine):
    img = ct_slice(120, 160, seed=6)
    prev = np.zeros((120, 160), bool)
    prev[50:70, 60:100] = True
    res = engine.closer_look(img, "", mask=prev, label="liver", window="abdomen",
                             forced_text="liver [SEG]")
    assert res.closer_look["area_px_before"] == 800
    assert res.closer_look["roi"] == res.closer_look["crop"]
    x1, y1, x2, y2 = res.closer_look["crop"]
    assert x2 - x1 == 52 and x1 <= 60 and x2 >= 100 and y1 <= 50 and y2 >= 70
    assert res.prompt == "Please segment the liver in this image."


def test_a_garbled_answer_is_said_first(engine):
    img = ct_slice(120, 160, seed=6)
    res = engine.ask(img, "Find the liver.", window="abdomen",
                     forced_text="```json, 104 " + "right lung " * 6 + "0, 112], \"left lung\"}]\n```")
    assert res.boxes == []
    assert res.warnings[0] == ('the model\'s answer is garbled (it says "right lung" 6 times in a '
                               'row; its box list cannot be read): check all of it against the '
                               'image, which may be unlike those the model was trained on.')
    plain = engine.ask(img, "Find the liver.", window="abdomen",
                       forced_text='```json\n[{"bbox_2d": [10, 10, 40, 40], "label": "liver"}]\n```')
    assert not any("garbled" in w for w in plain.warnings)


def test_closer_look_at_a_segment_named_with_capitals_is_the_models_structure(engine):
    """A Slicer segment "Liver" (or " liver ") is the model's "liver": its masks count as the
    look's (they did not: the look was said to mark nothing and compared as empty)."""
    img = ct_slice(120, 160, seed=6)
    looks = [engine.closer_look(img, "", roi=[40, 30, 100, 80], label=name, window="abdomen",
                                forced_text="liver [SEG]")
             for name in ("liver", "Liver", " liver ")]
    assert looks[0].masks[0].label == "liver" and looks[0].masks[0].area_px > 0
    assert looks[0].closer_look["dice_with_before"] > 0
    for look in looks[1:]:
        assert look.prompt == looks[0].prompt == "Please segment the liver in this image."
        assert look.closer_look == looks[0].closer_look
        assert look.warnings == looks[0].warnings


def test_closer_look_at_a_segment_named_after_nothing(engine):
    """Slicer's default name "Segment_1" names no structure: with no question there is
    nothing to ask the model (it was asked "Please segment the Segment_1 in this image."
    and given the answer "Sure, the segment_1 is [SEG] segment_1."); with one, the question
    is asked as it stands and any mask it gives is the look's."""
    img = ct_slice(120, 160, seed=6)
    with pytest.raises(InputError) as err:
        engine.closer_look(img, "", roi=[40, 30, 100, 80], label="Segment_1")
    assert str(err.value).startswith("'Segment_1' names no structure the model knows")
    named = engine.closer_look(img, "Segment the liver.", roi=[40, 30, 100, 80], label="Segment_1",
                               window="abdomen", forced_text="liver [SEG]")
    plain = engine.closer_look(img, "Segment the liver.", roi=[40, 30, 100, 80],
                               window="abdomen", forced_text="liver [SEG]")
    assert named.closer_look == plain.closer_look and named.masks[0].area_px > 0


def test_closer_look_where_the_first_pass_marks_nothing_asks_for_a_roi(engine):
    """Over HTTP no mask can be sent, so the sentence asks for the box only."""
    img = ct_slice(120, 160, seed=6)
    for label, what in (("liver", "no liver"), (None, "nothing the question asks for")):
        with pytest.raises(InputError) as err:
            engine.closer_look(img, "Segment the liver.", label=label,
                               forced_text="No liver is visible in this image.")
        assert str(err.value) == (f"the model marks {what} on this slice, so there is no "
                                  "region to look closer at; send roi=[x1, y1, x2, y2] around it.")


def test_closer_look_takes_a_square_per_main_part_or_per_box(engine):
    """Parts apart (the ascending and descending aorta on one slice) get a square each, so
    neither is a speck in a wide crop; a speck gets none; a list of boxes gets one each and
    keeps each mask inside its box."""
    img = ct_slice(120, 160, seed=6)
    prev = np.zeros((120, 160), bool)
    prev[20:36, 20:40] = True  # 320 px
    prev[80:100, 110:130] = True  # 400 px: the largest part, looked at first
    prev[5:7, 150:152] = True  # a speck
    res = engine.closer_look(img, "", mask=prev, label="liver", window="abdomen",
                             forced_text="liver [SEG]")
    crops = res.closer_look["crops"]
    assert [c[2] - c[0] for c in crops] == [26, 26]  # 20 px * (1 + 2 * 0.15)
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = crops
    assert ax1 <= 110 and ax2 >= 130 and ay1 <= 80 and ay2 >= 100
    assert bx1 <= 20 and bx2 >= 40 and by1 <= 20 and by2 >= 36
    assert res.closer_look["crop"] == res.closer_look["roi"] == [bx1, by1, ax2, ay2]
    squares = np.zeros((120, 160), bool)
    for x1, y1, x2, y2 in crops:
        squares[y1:y2, x1:x2] = True
    assert len(res.masks) == 1 and not (res.masks[0].array & ~squares).any()
    assert res.closer_look["area_px_after"] == res.masks[0].area_px
    boxes = [[40, 30, 80, 60], [100, 70, 150, 110]]
    two = engine.closer_look(img, "Segment the liver.", roi=boxes, window="abdomen",
                             forced_text="liver [SEG]")
    assert two.closer_look["roi"] == [40, 30, 150, 110] and len(two.closer_look["crops"]) == 2
    inside = np.zeros((120, 160), bool)
    for x1, y1, x2, y2 in boxes:
        inside[y1:y2, x1:x2] = True
    assert two.masks[0].array.any() and not (two.masks[0].array & ~inside).any()
    with pytest.raises(InputError, match="at most 8"):
        engine.closer_look(img, "Segment the liver.", roi=[[40, 30, 80, 60]] * 9)


def test_closer_look_at_a_named_structure_gives_the_models_segment_answer(tiny_dir, tmp_path):
    """A checkpoint whose config has `segment_answer` gets that answer, filled with the label,
    in a closer look at a named structure (nano writes no [SEG] for some crops); the answer is
    the model's own without a label, with a caller's forced_text, with a question about
    something else, or without the setting."""
    img = ct_slice(120, 160, seed=6)
    prev = np.zeros((120, 160), bool)
    prev[50:70, 60:100] = True
    ckpt = tmp_path / "answering"
    shutil.copytree(tiny_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["segment_answer"] = "Sure, the {label} is [SEG] {label}."
    (ckpt / "config.json").write_text(json.dumps(cfg))
    e = Engine.load(ckpt)
    res = e.closer_look(img, "", mask=prev, label="Left  Kidney", window="abdomen")
    assert res.text == "Sure, the left kidney is [SEG] left kidney."
    assert [m.label for m in res.masks] == ["left kidney"]
    assert res.closer_look["answer_given"] is True
    assert res.to_json()["closer_look"]["answer_given"] is True
    own = e.closer_look(img, "", mask=prev, label="liver", window="abdomen",
                        forced_text="liver [SEG]")
    assert own.text == "liver [SEG]" and own.closer_look["answer_given"] is False
    unnamed = e.closer_look(img, "Segment the liver.", roi=[40, 30, 80, 60], window="abdomen")
    assert unnamed.closer_look["answer_given"] is False
    # a question of the radiologist's own: given the answer only where it is about the label
    for prompt, want in (("segment the liver", True), ("Where is the liver?", True),
                         ("segment the left kidney", False), ("write a report", False)):
        look = e.closer_look(img, prompt, mask=prev, label="liver", window="abdomen")
        assert look.closer_look["answer_given"] is want, prompt
        assert (look.text == "Sure, the liver is [SEG] liver.") is want, (prompt, look.text)


def test_a_structure_a_listing_question_leaves_out_is_asked_about_alone(fitted_engine,
                                                                        fitted_dir):
    """The fitted tiny model answers every segmentation question about the liver, and every
    detection question with a liver box: asked about the spleen alone it answers about the
    liver again, so nothing is added and a warning names the spleen (nano, which answers
    about each when asked alone, is in tests/nano)."""
    img = ct_slice(120, 90, seed=3)
    res = fitted_engine.ask(img, "Segment the liver and the spleen.", window="abdomen")
    assert res.text == ANSWERS["segment"] and [m.label for m in res.masks] == ["liver"]
    assert res.warnings == [
        "the answer has nothing about the spleen, which the question asks for: asked about it "
        "alone, the model answered about the liver (it may not know it), so look for it "
        "yourself."]
    assert fitted_engine.ask(img, "Segment the liver.", window="abdomen").warnings == []
    # a forced answer is the answer: nothing more is asked; nor with asking again switched off
    forced = fitted_engine.ask(img, "Segment the liver and the spleen.", window="abdomen",
                               forced_text="Sure, the liver is [SEG] liver.")
    assert forced.warnings == []
    as_typed = Engine.load(fitted_dir, ask_again=False)
    off = as_typed.ask(img, "Segment the liver and the spleen.", window="abdomen")
    assert off.warnings == [] and off.text == res.text
    np.testing.assert_array_equal(off.masks[0].array, res.masks[0].array)
    vol = np.stack([img, img[::-1]])
    over = fitted_engine.ask_volume(vol, "Find the spleen and the kidneys.", window="abdomen")
    assert over.task == "detect" and [b.label for b in over.boxes] == ["liver", "liver"]
    assert over.warnings == [
        "slices 0-1: the answer is about the liver, which the question does not name: the "
        "model may have answered about something other than what was asked (it may not know "
        "that structure), so check the answer is what you wanted.",
        "slices 0-1: the answer has nothing about the spleen, right kidney and left kidney, "
        "which the question asks for: asked about each alone, the model answered about the "
        "liver (it may not know them), so look for them yourself."]
    # one structure asked about, the answer about another: asked again in the model's
    # phrasing, the answer about the liver again, so the first stays, said about twice
    other = fitted_engine.ask(img, "Find the spleen.", window="abdomen")
    assert [b.label for b in other.boxes] == ["liver"] and other.text == ANSWERS["detect"]
    assert [w for w in other.warnings if "asks for" in w] == [
        "the answer has nothing about the spleen, which the question asks for: asked about it "
        "again, the model answered about the liver (it may not know it), so look for it "
        "yourself."]
    assert len(other.warnings) == 2, other.warnings
    # asked in the model's phrasing already: not asked again
    same = fitted_engine.ask(img, FOLLOW_UP_PROMPTS["detect"].format(label="spleen"),
                             window="abdomen")
    assert [w for w in same.warnings if "asks for" in w] == []


def test_a_report_question_answered_with_no_report_keeps_it_when_asked_again_gives_none(
        tmp_path):
    """A tiny model fitted to answer every report question with a liver box: asked again
    with "Think step by step." and then in nano's phrasing it writes the box again, so the
    first answer stays and is checked as a detection answer (nano, which then writes a
    report, is in tests/nano). Each question asked is timed into the answer."""
    boxed = ANSWERS["detect"]
    e = Engine.load(write_tiny_checkpoint(tmp_path / "boxes", seed=0,
                                          answers={"report": boxed}))
    img = ct_slice(120, 90, seed=3)
    res = e.ask(img, "Write a report.", window="abdomen")
    assert res.task == "report" and res.text == boxed and res.reasoning == []
    asked, run = [], e._run

    def counted(state, prompt, *args, **kwargs):  # the engine's own pass, each question noted
        asked.append(prompt)
        return run(state, prompt, *args, **kwargs)

    e._run = counted
    caps = e.ask(img, "Write a Report, Think Step by Step.", window="abdomen")
    assert caps.text == boxed and caps.reasoning == []
    e.ask(img, "Write a report.", window="abdomen")
    assert [q for q in asked if "report" in q.lower()] == [
        "Write a Report, Think Step by Step.", REPORT_AGAIN_PROMPT,
        "Write a report.", "Write a report. Think step by step.", REPORT_AGAIN_PROMPT]
    assert [b.label for b in res.boxes] == ["liver"]
    # the answer is about the liver, which "Write a report." does not name: a detection check
    assert [w for w in res.warnings if "does not name" in w]



def _asked(engine, monkeypatch) -> list[str]:
    """The questions `engine` puts to its model from now on, in order."""
    asked, run = [], engine._run

    def counted(state, prompt, *args, **kwargs):
        asked.append(prompt)
        return run(state, prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "_run", counted)
    return asked


def test_a_misspelt_name_is_checked_and_asked_again_as_the_name_it_is_close_to(
        fitted_engine, monkeypatch):
    """"Find the livr.": the model is asked as typed; its liver box answers the question
    read as "Find the liver.", so no "does not name" sentence, nothing asked again, and one
    sentence says how the name was read; "Segmnet the livr." is a segmentation question. "Find the spleeen.": asked again about the spleen
    (the fitted model answers about the liver again, and the warning names the spleen)."""
    img = ct_slice(120, 90, seed=3)
    asked = _asked(fitted_engine, monkeypatch)
    liver = fitted_engine.ask(img, "Find the livr.", window="abdomen")
    assert [b.label for b in liver.boxes] == ["liver"] and asked == ["Find the livr."]
    assert liver.prompt == "Find the livr." and liver.warnings == [
        'read "livr" as "liver" in the question (a word the engine knows) to check the answer '
        "and to ask again."]
    asked.clear()
    seg = fitted_engine.ask(img, "Segmnet the livr.", window="abdomen")
    assert seg.task == "segment" and [m.label for m in seg.masks] == ["liver"]
    assert asked == ["Segmnet the livr."] and seg.warnings == [
        'read "segmnet" as "segment" and "livr" as "liver" in the question (words the engine '
        "knows) to check the answer and to ask again."]
    asked.clear()
    spleen = fitted_engine.ask(img, "Find the spleeen.", window="abdomen")
    assert asked == ["Find the spleeen.", FOLLOW_UP_PROMPTS["detect"].format(label="spleen")]
    assert spleen.warnings[0].startswith('read "spleeen" as "spleen" in the question')
    assert spleen.warnings[1:] == [
        "the answer is about the liver, which the question does not name: the model may have "
        "answered about something other than what was asked (it may not know that structure), "
        "so check the answer is what you wanted.",
        "the answer has nothing about the spleen, which the question asks for: asked about it "
        "again, the model answered about the liver (it may not know it), so look for it "
        "yourself."]


def test_a_question_with_no_task_words_is_asked_for_the_structures_it_names(
        tmp_path, monkeypatch):
    """A tiny model fitted to answer report questions with a liver box and detection ones
    with a spleen box. "Is the spleen normal?" (no task words: the report task) gets the liver
    box; it names the spleen, so the spleen is asked for in the detection phrasing, and that
    box is the answer, still of the report task. "Is the liver normal?" is answered: nothing
    more is asked. A question naming no structure is left as answered."""
    spleen_box = '```json\n[{"bbox_2d": [0, 42, 28, 84], "label": "spleen"}]\n```'
    e = Engine.load(write_tiny_checkpoint(tmp_path / "boxes", seed=0, answers={
        "report": ANSWERS["detect"], "detect": spleen_box}))
    img = ct_slice(120, 90, seed=3)
    asked = _asked(e, monkeypatch)
    res = e.ask(img, "Is the spleen normal?", window="abdomen")
    assert asked == ["Is the spleen normal?", FOLLOW_UP_PROMPTS["detect"].format(label="spleen")]
    assert res.task == "report" and [b.label for b in res.boxes] == ["spleen"]
    assert res.text == ANSWERS["detect"] + "\n" + spleen_box and res.warnings == []
    asked.clear()
    liver = e.ask(img, "Is the liver normal?", window="abdomen")
    assert asked == ["Is the liver normal?"] and [b.label for b in liver.boxes] == ["liver"]
    asked.clear()
    e.ask(img, "Is this normal?", window="abdomen")
    assert asked == ["Is this normal?"]
    # the task chosen, as the Slicer module sends it, and the structures named, no task words
    asked.clear()
    boxed = e.ask(img, "spleen and liver", window="abdomen", task="detect")
    assert asked == ["spleen and liver", FOLLOW_UP_PROMPTS["detect"].format(label="liver")]
    assert boxed.task == "detect" and [b.label for b in boxed.boxes] == ["spleen"]
    assert boxed.warnings[-1].startswith("the answer has nothing about the liver")
    # a misspelt report word: asked again for a report as "Describe this slice." would be
    asked.clear()
    described = e.ask(img, "Descirbe this slice.", window="abdomen")
    assert asked == ["Descirbe this slice.", "Descirbe this slice. Think step by step.",
                     REPORT_AGAIN_PROMPT]
    assert described.task == "report" and described.warnings[0].startswith(
        'read "descirbe" as "describe" in the question')

def test_a_pair_called_not_visible_is_looked_for_side_by_side():
    assert absent_members("liver", "is") == ["liver"]
    assert absent_members("kidneys", "are") == ["right kidney", "left kidney"]
    assert absent_members("Adrenal glands", "are") == ["right adrenal gland",
                                                       "left adrenal gland"]
    assert absent_members("gallstones", "are") == []  # not a paired organ: left alone
    # what a question names is asked about: a pair with no side ("the kidney") side by side
    assert asked_members("kidney") == asked_members("kidneys") == ["right kidney", "left kidney"]
    assert asked_members("left kidney") == ["left kidney"]
    assert asked_members("liver") == ["liver"] and asked_members("gallstones") == ["gallstones"]
    # a segmentation answer that said so, and the mask asked for alone
    assert absent_box_warning("liver", "liver", "is", "mask") == (
        "the answer says no liver is visible, but the model's own segmentation marks the liver "
        "in the image; the liver mask returned is the one it gives when asked for the liver "
        "alone.")


def test_an_answer_about_another_structure_than_asked_warns(engine):
    img = ct_slice(seed=8)
    off = engine.ask(img, "Please segment the pancreas.", window="abdomen",
                     forced_text="Sure, the liver is [SEG] liver.")
    assert [m.label for m in off.masks] == ["liver"]
    assert [w for w in off.warnings if "does not name" in w] == [
        "the answer is about the liver, which the question does not name: the model may have "
        "answered about something other than what was asked (it may not know that structure), "
        "so check the answer is what you wanted."]
    side = engine.ask(img, "Locate the left kidney.", window="abdomen", task="detect",
                      forced_text='```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "right '
                                  'kidney"}]\n```')
    assert any(w.startswith("the question says left, but the answer is about the right kidney")
               for w in side.warnings)
    for res in (engine.ask(img, "Please segment the liver.", window="abdomen",
                           forced_text="Sure, the liver is [SEG] liver."),
                # a report names what it finds, asked or not
                engine.ask(img, "Write a report, think step by step.", window="abdomen",
                           forced_text=FORCED),
                # closer look at a mask with no name: its question names nothing to compare
                engine.closer_look(img, "", mask=img > 0, window="abdomen",
                                   forced_text="Sure, the liver is [SEG] liver.")):
        assert not [w for w in res.warnings if "question" in w], res.warnings
    # asked a question, given no report but a box of something it does not name
    boxed = engine.ask(img, "Is there a pleural effusion?", window="abdomen",
                       forced_text='```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "left '
                                   'lung"}]\n```')
    assert boxed.task == "report" and not boxed.reasoning
    assert [w for w in boxed.warnings if "does not name" in w] == [
        "the answer is about the left lung, which the question does not name: the model may "
        "have answered about something other than what was asked (it may not know that "
        "structure), so check the answer is what you wanted."]
    vol = np.stack([ct_slice(40, 50, seed=s) for s in range(3)])
    over = engine.ask_volume(vol, "Please segment the pancreas.", slices=range(3),
                             window="abdomen", forced_text="Sure, the liver is [SEG] liver.")
    assert [w for w in over.warnings if "does not name" in w] == [
        "slices 0-2: the answer is about the liver, which the question does not name: the model "
        "may have answered about something other than what was asked (it may not know that "
        "structure), so check the answer is what you wanted."]


def test_closer_look_is_compared_with_the_mask_before_it(engine):
    # the lines the warning is said at
    assert closer_look_warning("liver", "the mask sent", 39, 0, 0.0) is None  # too small
    assert closer_look_warning("liver", "the mask sent", 500, 450, 0.8) is None
    assert closer_look_warning("liver", "the mask sent", 500, 0, 0.0).startswith(
        "the closer look marks no liver in the crop, where the mask sent marks 500 pixels")
    assert closer_look_warning("liver", "the mask sent", 500, 200, 0.69).startswith(
        "the closer look's liver mask agrees little with the mask sent (Dice 0.69 inside")
    # the figure in the result: the refined mask against the mask sent, inside the crop
    img = ct_slice(120, 160, seed=6)
    prev = np.zeros((120, 160), bool)
    prev[50:70, 60:100] = True
    res = engine.closer_look(img, "", mask=prev, label="liver", window="abdomen",
                             forced_text="liver [SEG]")
    x1, y1, x2, y2 = res.closer_look["crop"]
    inside = np.zeros_like(prev)
    inside[y1:y2, x1:x2] = True
    want = dice_score(prev & inside, res.masks[0].array & inside)
    assert res.closer_look["dice_with_before"] == round(want, 3)
    assert res.to_json()["closer_look"]["dice_with_before"] == round(want, 3)
    low = want < 0.7
    assert any("closer look" in w for w in res.warnings) == low, res.warnings
    # a box sent with fractional edges: the refined mask is kept to the pixels it touches,
    # and compared with the mask sent in those same pixels
    roi = [55.5, 45.5, 99.5, 74.5]
    assert box_pixels(roi, 120, 160).sum() == 45 * 30
    assert box_pixels([3.2, 4.0, 3.4, 4.1], 10, 10).sum() == 1
    boxed = engine.closer_look(img, "", roi=roi, mask=prev, label="liver", window="abdomen",
                               forced_text="liver [SEG]")
    touched = np.zeros_like(prev)
    touched[45:75, 55:100] = True
    after = boxed.masks[0].array
    assert after.any() and not (after & ~touched).any()
    assert boxed.closer_look["dice_with_before"] == round(
        dice_score(prev & touched, after & touched), 3)


def test_ask_volume_returns_3d_masks_in_volume_index_space(engine):
    vol = np.stack([ct_slice(40, 50, seed=s) for s in range(6)])
    res = engine.ask_volume(vol, "Segment the liver.", slices=range(1, 4), axis=0,
                            window="abdomen", spacing=(2.5, 0.7, 0.7), batch_size=2,
                            forced_text="liver [SEG]")
    (m,) = res.masks
    assert m.array.shape == vol.shape and m.label == "liver"
    assert not m.array[[0, 4, 5]].any()
    per_slice = [engine.ask(vol[k], "Segment the liver.", window="abdomen",
                            forced_text="liver [SEG]").masks[0].array for k in (1, 2, 3)]
    for k, expected in zip((1, 2, 3), per_slice):
        np.testing.assert_array_equal(m.array[k], expected)
    data = res.to_json()
    assert [e["slice"] for e in data["masks"]] == [1, 2, 3]
    assert data["image"] == {"id": None, "shape": [6, 40, 50], "spacing": [2.5, 0.7, 0.7],
                             "axis": "axial", "slices": [1, 2, 3], "window": "abdomen"}
    assert data["masks"][0]["area_mm2"] == pytest.approx(data["masks"][0]["area_px"] * 0.49)
    # the volume over the contiguous slices asked: voxels x 2.5 x 0.7 x 0.7 mm³, in mL
    assert data["volumes_ml"] == {"liver": round(m.area_px * 2.5 * 0.49 / 1000, 2)}
    assert m.array[1].any() and m.array[3].any()  # the tiny model marks both ends
    # the answer over the range is what was marked, not one slice's words
    assert res.answer == (f"Over slices 1-3 (3 slices): liver marked on slices 1-3 (3 of "
                          f"them), {m.volume_ml:.1f} mL, 7.5 mm craniocaudal.")
    assert res.text.startswith("[slice 1] ")
    assert [w for w in res.warnings if "mask reaches" in w] == [
        "the liver mask reaches slice 1, the first asked, and slice 3, the last asked: "
        f"{data['volumes_ml']['liver']:g} mL is its volume over the slices asked only; ask a "
        "range that goes past the liver for all of it."]
    # where the image itself ends, the image cuts the structure, not the range
    whole = engine.ask_volume(vol, "Segment the liver.", window="abdomen",
                              spacing=(2.5, 0.7, 0.7), forced_text="liver [SEG]")
    ml = whole.to_json()["volumes_ml"]["liver"]
    assert [w for w in whole.warnings if "mask reaches" in w] == [
        "the liver mask reaches slice 0, the image's first, and slice 5, the image's last: the "
        f"liver may go on past what the image holds, so {ml:g} mL is its volume in the image "
        "only."]
    # slices with a gap, or no spacing: no volume (it would not be measured)
    gap = engine.ask_volume(vol, "Segment the liver.", slices=[1, 3], window="abdomen",
                            spacing=(2.5, 0.7, 0.7), forced_text="liver [SEG]")
    assert "volumes_ml" not in gap.to_json() and "volumes_ml" not in engine.ask_volume(
        vol, "Segment the liver.", slices=[1, 2], forced_text="liver [SEG]").to_json()
    # a report over the range whose written liver size is off its boxes: one sentence
    sized = FORCED.replace("The liver is [SEG]", "The liver (3 x 2 mm) is [SEG]")
    reps = engine.ask_volume(vol, "Write a report, think step by step.", slices=[1, 2, 4],
                             window="abdomen", spacing=(2.5, 0.7, 0.7), forced_text=sized)
    assert [w for w in reps.warnings if "sizes" in w] == [
        "the sizes the answers give differ by more than a fifth from those of their boxes for "
        "the liver on slices 1-2, 4: the boxes' sizes (size_mm) are measured from the image's "
        "pixel spacing, the answers' are as the model wrote them."]
    # its answer: what the reports mark and cite over the range, not one slice's words
    assert reps.answer == (
        "Over slices 1-2, 4 (3 slices): liver marked on slices 1-2, 4 (3 of them); spleen "
        "marked on slices 1-2, 4 (3 of them). Each slice's findings are in its steps and in "
        "text.")
    # boxes on a coronal plane: rows run along z (2.5 mm), columns along x (0.7 mm)
    boxed = engine.ask_volume(vol, "Find the liver.", slices=[10], axis="coronal",
                              spacing=(2.5, 0.7, 0.7), forced_text=FORCED)
    (box, *_) = boxed.to_json()["boxes"]
    x1, y1, x2, y2 = box["xyxy"]
    assert box["slice"] == 10 and box["size_mm"] == pytest.approx(
        [(x2 - x1) * 0.7, (y2 - y1) * 2.5], abs=0.06)
    cor = engine.ask_volume(vol, "Segment the liver.", slices=[10], axis="coronal",
                            forced_text="liver [SEG]")
    assert cor.masks[0].array.shape == vol.shape and not cor.masks[0].array[:, :10].any()
    with pytest.raises(InputError, match="slice 40 is outside"):
        engine.ask_volume(vol, "Segment the liver.", slices=[40], axis=1)


def test_a_volume_question_about_one_slice_says_a_volume_needs_a_range(engine):
    img = ct_slice(40, 50, seed=1)
    one = engine.ask(img, "What is the volume of the liver?", forced_text="liver [SEG]")
    assert one.task == "segment" and one.masks
    assert one.warnings[-1] == ONE_SLICE_VOLUME
    plain = engine.ask(img, "Segment the liver in this volume.", forced_text="liver [SEG]")
    assert ONE_SLICE_VOLUME not in plain.warnings
    vol = np.stack([ct_slice(40, 50, seed=s) for s in range(3)])
    over = engine.ask_volume(vol, "Liver volume?", spacing=(2.5, 0.7, 0.7),
                             forced_text="liver [SEG]")
    assert ONE_SLICE_VOLUME not in over.warnings and "liver" in over.to_json()["volumes_ml"]


def test_a_question_naming_slices_about_one_slice_says_the_words_do_not_choose_them(engine):
    img = ct_slice(40, 50, seed=1)
    res = engine.ask(img, "Segment the liver on slices 40 to 60.", slice_index=45,
                     forced_text="liver [SEG]")
    assert res.warnings[-1] == (
        'the question says "slices 40 to 60", but this answer is about slice 45 only: the '
        "slices asked about are chosen with the request's slice (in the Slicer module, its "
        "scope: slice range or whole volume), not by the question's words.")
    whole = engine.ask(img, "Segment the liver in the whole volume.", forced_text="liver [SEG]")
    assert whole.warnings[-1].startswith('the question says "the whole volume", but this '
                                         "answer is about the one slice sent only")
    for k, said in ((45, False), (44, True)):
        one = engine.ask(img, "Segment the liver on slice 45.", slice_index=k,
                         forced_text="liver [SEG]")
        assert any("the question says" in w for w in one.warnings) == said, k


def test_a_mask_s_long_and_short_axis_in_mm():
    """diameters_mm: the longest line across a mask's largest part (pixel corners) and its
    width at right angles, as a radiologist measures them."""
    from citrusv.result import diameters_mm

    yy, xx = np.mgrid[:200, :200]
    disk = (yy - 100) ** 2 + (xx - 100) ** 2 <= 40 ** 2
    assert diameters_mm(disk, (1, 1)) == [81.4, 81.4]
    ellipse = ((yy - 100) / 30.0) ** 2 + ((xx - 100) / 60.0) ** 2 <= 1
    assert diameters_mm(ellipse, (1, 1)) == [121.0, 61.0]
    assert diameters_mm(ellipse, (0.5, 0.5)) == [60.5, 30.5]
    assert diameters_mm(ellipse.T, (2.0, 1.0)) == [242.0, 61.0]  # rows 2 mm apart
    speck = disk.copy()
    speck[5:15, 5:15] = True  # a part apart does not stretch it
    assert diameters_mm(speck, (1, 1)) == [81.4, 81.4]
    assert diameters_mm(np.zeros((5, 5), bool), (1, 1)) is None
    one = np.zeros((4, 4), bool)
    one[1, 1:3] = True  # two pixels side by side: the diagonal, and across it
    assert diameters_mm(one, (1, 1)) == [2.2, 1.8]


def test_uint8_rgb_input(engine):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    res = engine.ask(rgb, "Segment the liver.", forced_text="liver [SEG]")
    assert res.masks[0].array.shape == (64, 80)


def test_cached_prompt_prefix_gives_the_same_answer(fitted_dir, fitted_engine):
    """The second question on a slice starts from the KV cache of system + image tokens."""
    img = ct_slice(90, 90, seed=21)
    first = fitted_engine.ask(img, "Describe the findings.", window="abdomen")
    second = fitted_engine.ask(img, "Write a report, think step by step.", window="abdomen")
    assert first.timing_ms["prefill_reused_tokens"] == 0
    assert second.timing_ms["prefill_reused_tokens"] > 20
    fresh = Engine.load(fitted_dir, reuse_prefix=False)
    again = fresh.ask(img, "Write a report, think step by step.", window="abdomen")
    assert second.text == again.text == ANSWERS["report"]
    np.testing.assert_array_equal(second.masks[0].array, again.masks[0].array)


def test_save_pretrained_round_trip(engine, tmp_path):
    path = engine.save_pretrained(tmp_path / "copy")
    again = Engine.load(path)
    img = ct_slice(seed=2)
    a = engine.ask(img, "Segment the liver.", window="auto", forced_text="liver [SEG]")
    b = again.ask(img, "Segment the liver.", forced_text="liver [SEG]")
    np.testing.assert_array_equal(a.masks[0].array, b.masks[0].array)


def test_ask_volume_batched_decode_matches_slice_by_slice(fitted_dir):
    """Slices of one volume share one batched vision pass and greedy decode."""
    e = Engine.load(fitted_dir)
    vol = np.stack([ct_slice(70, 60, seed=s) for s in range(5)])
    for prompt, answer in (("Please segment the liver in this scan.", ANSWERS["segment"]),
                           ("Where is the liver?", ANSWERS["detect"])):
        res = e.ask_volume(vol, prompt, slices=range(5), window="abdomen", batch_size=3)
        assert res.text.split("\n")[:1] == [f"[slice 0] {answer.splitlines()[0]}"]
        assert res.text.count("[slice ") == 5
        single = Engine.load(fitted_dir)
        for k in (0, 3):
            one = single.ask(vol[k], prompt, window="abdomen")
            assert one.text == answer
            if one.masks:
                diff = np.count_nonzero(res.masks[0].array[k] ^ one.masks[0].array)
                assert diff <= 0.005 * one.masks[0].array.size
            else:
                assert [b.xyxy for b in res.boxes if b.slice == k] == [
                    b.xyxy for b in one.boxes]


def test_unknown_model_directory_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        Engine.load(tmp_path / "nope")
    assert err.value.field == "model"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(30, 400), w=st.integers(30, 400), data=st.data())
def test_box_through_the_engine_maps_back_to_the_drawn_box(engine, h, w, data):
    """A box drawn on the slice, written by the model in its frame (integers), comes back in
    slice pixels within the rounding of one frame pixel (<= 1 px unless the frame is smaller)."""
    if max(h, w) / min(h, w) > 20:
        return
    fh, fw = smart_resize(h, w, 28, engine.config.min_pixels, engine.config.max_pixels)
    x1 = data.draw(st.integers(0, w - 2))
    y1 = data.draw(st.integers(0, h - 2))
    x2 = data.draw(st.integers(x1 + 1, w))
    y2 = data.draw(st.integers(y1 + 1, h))
    frame = [round(x1 * fw / w), round(y1 * fh / h), round(x2 * fw / w), round(y2 * fh / h)]
    if frame[2] <= frame[0] or frame[3] <= frame[1]:
        return
    res = engine.ask(np.zeros((h, w), np.float32), "Where is the liver?",
                     forced_text=f"The liver <bbox>{frame}</bbox>.")
    (box,) = res.boxes
    tol_x, tol_y = 0.5 * w / fw + 1e-6, 0.5 * h / fh + 1e-6
    assert abs(box.xyxy[0] - x1) <= tol_x and abs(box.xyxy[2] - x2) <= tol_x
    assert abs(box.xyxy[1] - y1) <= tol_y and abs(box.xyxy[3] - y2) <= tol_y
    if fw >= w / 2 and fh >= h / 2:
        assert max(abs(a - b) for a, b in zip(box.xyxy, [x1, y1, x2, y2])) <= 1.0


def test_slice_list_joins_runs_of_slices():
    assert slice_list([7]) == "slice 7"
    assert slice_list([9, 3, 4, 5, 7, 10, 4]) == "slices 3-5, 7, 9-10"


def test_main_parts_box_leaves_out_small_stray_parts():
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:30, 20:40] = True  # 400 px
    mask[50:52, 70:72] = True  # 4 px far away: < 25 % of the largest part
    assert main_parts_box(mask) == [20.0, 10.0, 40.0, 30.0]
    mask[40:55, 0:10] = True  # 150 px: a main part too (>= 100 px)
    assert main_parts_box(mask) == [0.0, 10.0, 40.0, 55.0]
    assert main_parts_box(mask, min_part=0.0) == [0.0, 10.0, 72.0, 55.0]
    diagonal = np.eye(5, dtype=bool)  # 8-connected: one part
    assert main_parts_box(diagonal) == [0.0, 0.0, 5.0, 5.0]
    assert main_parts_box(np.zeros((4, 4), dtype=bool)) is None and main_parts_box(None) is None


def test_box_source_mask_puts_the_box_of_the_labels_mask_in_place_of_the_written_one(
        fitted_dir):
    """With box_source "mask" every written box is replaced by the box of the model's own mask
    of its label (asked on the same slice), the written box kept as text_xyxy; the default
    ("text", Citrus-V as trained) returns the written boxes."""
    assert Engine.load(fitted_dir).box_source == "text"
    e = Engine.load(fitted_dir, box_source="mask")
    img = ct_slice(120, 90, seed=3)
    seg = e.ask(img, "Please segment the liver in this scan.", window="abdomen")
    grounded = main_parts_box(seg.masks[0].array)
    assert grounded is not None
    fh, fw = smart_resize(120, 90, 28, e.config.min_pixels, e.config.max_pixels)
    written = [28 * 90 / fw, 14 * 120 / fh, 84 * 90 / fw, 70 * 120 / fh]
    det = e.ask(img, "Where is the liver?", window="abdomen", slice_index=4)
    assert det.text == ANSWERS["detect"] and len(det.boxes) == 1
    box = det.boxes[0]
    assert (box.label, box.source, box.xyxy, box.slice) == ("liver", "mask", grounded, 4)
    np.testing.assert_allclose(box.text_xyxy, written)
    assert box.score > 0.5  # still the model's probability of the numbers it wrote
    assert det.timing_ms["ground"] > 0
    data = json.loads(json.dumps(det.to_json()))["boxes"][0]
    assert data["source"] == "mask" and data["xyxy"] == grounded
    np.testing.assert_allclose(data["text_xyxy"], written, atol=0.01)
    plain = Engine.load(fitted_dir).ask(img, "Where is the liver?", window="abdomen")
    assert plain.boxes[0].source == "text" and plain.boxes[0].text_xyxy is None
    np.testing.assert_allclose(plain.boxes[0].xyxy, written)
    np.testing.assert_allclose(plain.to_json()["boxes"][0]["text_xyxy"], written, atol=0.01)
    # report boxes too, and each slice of a volume
    rep = e.ask(img, "Write a report, think step by step.", window="abdomen")
    assert [(b.label, b.source, b.xyxy) for b in rep.boxes] == [("liver", "mask", grounded)]
    vol = np.stack([img, img])
    res = e.ask_volume(vol, "Where is the liver?", slices=[0, 1], window="abdomen")
    assert [(b.id, b.slice, b.source, b.xyxy) for b in res.boxes] == [
        ("b1", 0, "mask", grounded), ("b2", 1, "mask", grounded)]
    with pytest.raises(ValueError, match="box_source 'pixels' is unknown"):
        Engine.load(fitted_dir, box_source="pixels")


def test_box_source_mask_boxes_the_mask_of_a_structure_the_answer_calls_not_visible(
        fitted_dir):
    """A detection answer "No liver is visible" while the model's own liver mask marks the
    liver: with box_source "mask" the box of that mask comes back (nothing written, no score)
    with a sentence saying the two disagree. For "No kidneys are visible" each kidney is asked
    for, and this model's masks are all labelled liver: a mask of something else than asked
    gives no box. box_source "text" returns the answer as written."""
    e = Engine.load(fitted_dir, box_source="mask")
    img = ct_slice(120, 90, seed=3)
    seg = e.ask(img, "Please segment the liver in this scan.", window="abdomen")
    area = seg.masks[0].area_px
    assert area >= 40
    res = e.ask(img, "Where is the liver?", window="abdomen",
                forced_text="No liver is visible in this image.")
    assert [(b.id, b.label, b.source, b.xyxy, b.text_xyxy, b.score) for b in res.boxes] == [
        ("b1", "liver", "mask", main_parts_box(seg.masks[0].array), None, None)]
    assert res.warnings == [
        "the answer says no liver is visible, but the model's own segmentation marks the liver "
        "in the image; the liver box returned is the box of that mask, not one the model wrote."]
    data = json.loads(json.dumps(res.to_json()))["boxes"][0]
    assert data["text_xyxy"] is None and data["score"] is None and data["source"] == "mask"
    # a report question answered with no report, the way nano answers "Is the liver normal?"
    # on a slice with the liver, is checked alike
    asked = e.ask(img, "Is the liver normal?", window="abdomen",
                  forced_text="No liver is visible in this image.")
    assert asked.task == "report"
    assert [(b.label, b.source, b.xyxy) for b in asked.boxes] == [
        ("liver", "mask", main_parts_box(seg.masks[0].array))]
    assert asked.warnings == res.warnings
    plural = e.ask(img, "Where are the kidneys?", window="abdomen",
                   forced_text="No kidneys are visible in this image.")
    assert [m.label for m in e.ask(img, "Please segment the right kidney in this scan.",
                                   window="abdomen").masks] == ["liver"]
    assert plural.boxes == [] and plural.warnings == []
    plain = Engine.load(fitted_dir).ask(img, "Where is the liver?", window="abdomen",
                                        forced_text="No liver is visible in this image.")
    assert plain.boxes == [] and plain.warnings == []


def test_box_source_mask_in_a_closer_look_maps_both_boxes_to_the_slice(fitted_dir):
    e = Engine.load(fitted_dir, box_source="mask")
    img = ct_slice(120, 160, seed=5)
    unnamed = e.closer_look(img, "Segment the liver.", roi=[40, 30, 80, 60], window="abdomen",
                            forced_text="liver [SEG] <bbox>[0, 0, 64, 64]</bbox>")
    assert [(b.label, b.source) for b in unnamed.boxes] == [("", "text")]  # nothing to ask
    res = e.closer_look(img, "Segment the liver.", roi=[40, 30, 80, 60], window="abdomen",
                        forced_text="The liver <bbox>[0, 0, 64, 64]</bbox> is [SEG].")
    x1, y1, x2, y2 = res.closer_look["crop"]
    box = res.boxes[0]
    assert box.label == "liver"
    size = e.config.image_size
    fh, fw = smart_resize(size, size, 28, e.config.min_pixels, e.config.max_pixels)
    assert box.source == "mask"
    np.testing.assert_allclose(box.text_xyxy, [x1, y1, x1 + 64 / fw * 52, y1 + 64 / fh * 52],
                               atol=1e-6)
    bx1, by1, bx2, by2 = box.xyxy  # the crop's mask box, in slice pixels: inside the crop
    assert x1 <= bx1 < bx2 <= x2 and y1 <= by1 < by2 <= y2


def test_masks_on_an_image_kind_the_model_was_not_taught_to_segment_say_so():
    """nano was taught to segment CT only: on a CR its empty masks do not mean "not in
    view", so those sentences go and one says why; a taught or unknown kind is left alone,
    but a picture file (PNG, JPEG), which names no kind, gets one sentence."""
    from citrusv.engine import empty_mask_warning, untaught_modality
    from citrusv.result import Mask, Result

    def answer() -> Result:
        res = Result(task="segment", prompt="Segment the lungs.",
                     masks=[Mask("right lung", np.zeros((4, 4), bool)),
                            Mask("left lung", np.ones((4, 4), bool), 2)])
        res.warnings = [empty_mask_warning("right lung"), "another sentence."]
        return res

    for modality, taught in (("CT", ["CT"]), ("", ["CT"]), (None, ["CT"]), ("CR", [])):
        res = answer()
        untaught_modality(res, modality, taught)
        assert res.warnings == answer().warnings, modality
    res = answer()
    untaught_modality(res, "cr", ["CT"])
    assert res.warnings == [
        "another sentence.",
        "this model was taught to segment CT images only, and this image is CR by its DICOM "
        "header: its masks here are guesses it was never taught, and an empty one does not "
        "mean the structure is absent."]
    # the engine's sentence from the values alone gives way to what a header or file says
    from citrusv.engine import NOT_CT_BY_VALUES
    for modality, picture, last in (("CR", False, "this image is CR by its DICOM header"),
                                    ("", True, "this image is a picture file"),
                                    ("CT", False, "another sentence.")):
        res = answer()
        res.warnings.append(NOT_CT_BY_VALUES)
        untaught_modality(res, modality, ["CT"], picture=picture)
        assert NOT_CT_BY_VALUES not in res.warnings and last in res.warnings[-1], modality
    # a picture file names no kind: one sentence, the others stay (it may be a CT slice)
    res = answer()
    untaught_modality(res, "", ["CT"], picture=True)
    assert res.warnings == answer().warnings + [
        "this image is a picture file, which does not say what kind of image it is, and this "
        "model was taught to segment CT images only: if it is not CT, its masks are guesses "
        "it was never taught, and an empty one does not mean the structure is absent."]
    for modality, taught in (("CT", ["CT"]), ("", [])):  # a picture said to be CT; any kind
        res = answer()
        untaught_modality(res, modality, taught, picture=True)
        assert res.warnings == answer().warnings, modality


def test_a_question_for_every_structure_asks_the_models_report_which_are_there(fitted_engine):
    """"Segment all organs." names none: the engine asks the model's report on the slice
    which structures are there (the tiny model's report cites the liver) and asks about each
    its first answer left out; the answer is not called one about something not asked."""
    img = ct_slice(seed=5)
    asked, run = [], fitted_engine._run

    def counted(state, prompt, *args, **kwargs):  # the engine's own pass, each question noted
        asked.append(prompt)
        return run(state, prompt, *args, **kwargs)

    fitted_engine._run = counted
    try:
        res = fitted_engine.ask(img, "Segment all organs.", window="abdomen")
    finally:
        del fitted_engine._run
    assert asked[:2] == ["Segment all organs.", REPORT_AGAIN_PROMPT]
    assert [m.label for m in res.masks] == ["liver"]  # the first answer is about it already
    assert len(asked) == 2 and res.warnings == [], (asked, res.warnings)
    assert res.timing_ms["decode"] > 0


def test_a_question_for_every_structure_but_some_leaves_those_out(fitted_engine, monkeypatch):
    """"Segment all organs except the liver.": the liver the model's report cites is not
    asked about, and the liver mask of its first answer is not returned; a sentence says so
    (and not that no [SEG] was written)."""
    img = ct_slice(seed=5)
    asked = _asked(fitted_engine, monkeypatch)
    res = fitted_engine.ask(img, "Segment all organs except the liver.", window="abdomen")
    assert asked == ["Segment all organs except the liver.", REPORT_AGAIN_PROMPT]
    assert res.masks == [] and res.text == ANSWERS["segment"]
    assert res.warnings == ["the model's answer had the liver, which the question leaves out, "
                            "so it is not returned."]
    kept = fitted_engine.ask(img, "Segment all organs except the spleen.", window="abdomen")
    assert [(m.label, m.label_index) for m in kept.masks] == [("liver", 1)]
    assert kept.warnings == []


def test_a_size_comparison_is_answered_from_the_masks():
    from citrusv.engine import compared_by_volume, compared_on_slice, measured_on_slice
    from citrusv.result import Mask

    def mask(label, rows, cols, spacing=(1.0, 1.0)):
        a = np.zeros((40, 40), bool)
        a[:rows, :cols] = True
        return Mask(label, a, spacing=spacing)

    big, small = mask("liver", 20, 30), mask("spleen", 10, 10)
    assert compared_on_slice([small, big]) == (
        "On this slice the liver is the larger (500 % more area than the spleen): liver 600.0 "
        "mm², 36 x 33 mm; spleen 100.0 mm², 14 x 14 mm. One slice is one cross-section: ask "
        "over a slice range for their volumes.")
    # within a tenth: about the same, said so; with no spacing, pixels
    assert compared_on_slice([mask("right kidney", 10, 10, None),
                              mask("left kidney", 10, 11, None)]).startswith(
        "On this slice the left kidney is the larger (10 % more area than the right kidney)")
    near = [mask("right kidney", 10, 10, None), mask("left kidney", 10, 10, None)]
    near[1].array[10, 0] = True  # 101 px against 100
    assert compared_on_slice(near) == (
        "On this slice the left kidney and the right kidney are about the same size (1 % apart, "
        "within what masks can be off by): left kidney 101 px; right kidney 100 px. One slice "
        "is one cross-section: ask over a slice range for their volumes.")
    empty = mask("heart", 0, 0)
    assert compared_on_slice([empty, big]) == (
        "On this slice only the liver is marked (600.0 mm², 36 x 33 mm), not the heart: "
        "nothing to compare it with here.")
    assert compared_on_slice([empty, mask("aorta", 0, 0)]) == (
        "On this slice the model marks neither the heart nor the aorta: nothing to compare "
        "here.")
    assert compared_on_slice([big]) is None  # one structure: the model's own answer stays
    # a mask of a few pixels is no size (nano's 1-px right kidney on held-out slice 25 was
    # "30100 % more area")
    assert compared_on_slice([mask("right kidney", 1, 1), big]) == (
        "On this slice only the liver is marked (600.0 mm², 36 x 33 mm), not the right kidney "
        "(1 px, too few to measure): nothing to compare it with here.")

    # a question asking for a size: each mask's, as its entry gives them
    assert measured_on_slice([big]) == (
        "On this slice, measured on the model's mask: liver 600.0 mm², 36 x 33 mm (area; "
        "longest axis x the axis across it). One slice is one cross-section: ask over a slice "
        "range for a volume.")
    assert measured_on_slice([mask("right kidney", 2, 3), small, empty]) == (
        "On this slice, measured on the model's mask: spleen 100.0 mm², 14 x 14 mm (area; "
        "longest axis x the axis across it). It marks too little of the right kidney (6 px) to "
        "measure. It marks no heart here. One slice is one cross-section: ask over a slice "
        "range for a volume.")
    assert measured_on_slice([empty]) == (
        "On this slice the model marks nothing to measure: heart 0 px.")

    def volume(label, voxels):
        a = np.zeros((3, 10, 10), bool)
        a.reshape(-1)[:voxels] = True
        return Mask(label, a, spacing=(10.0, 10.0), thickness=10.0)  # 1 mL a voxel

    assert compared_by_volume([volume("spleen", 13), volume("liver", 85)]) == (
        " By volume over these slices the liver is the larger (554 % more volume than the "
        "spleen): liver 85.0 mL, spleen 13.0 mL.")
    assert compared_by_volume([volume("liver", 85)]) == ""
