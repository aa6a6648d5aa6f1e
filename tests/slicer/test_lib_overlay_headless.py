"""The overlay PNG (masks, labelled boxes, numbered steps) and the Slicer-less twin."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from CitrusVLib.colors import label_color
from CitrusVLib.headless import ask_server, guess_task, to_uint8
from CitrusVLib.label_io import LabelVolume, write_label_volume
from CitrusVLib.multipart import parse_multipart
from CitrusVLib.overlay import (MIN_SIDE, PANEL_WIDTH, WARNING_COLOR, fullest_slice,
                                 panel_lines, render_overlay)
from CitrusVLib.result import Result
from PIL import Image


def grey(h=40, w=60, value=50):
    return np.full((h, w), value, dtype=np.uint8)


def test_overlay_draws_mask_box_label_and_step_numbers(sample_result):
    img = render_overlay(grey(), sample_result, slice_index=3)
    scale = int(np.ceil(MIN_SIDE / 60))  # small slices are upscaled for legible labels
    assert img.size == (60 * scale + PANEL_WIDTH, max(40 * scale, img.size[1]))
    px = np.asarray(img).astype(int)
    liver = np.array(label_color("liver"))
    # mask interior: 40 % liver colour over grey 50
    inside = px[15 * scale + scale // 2, 25 * scale + scale // 2]
    assert np.allclose(inside, 0.6 * 50 + 0.4 * liver, atol=1)
    # outside any mask/box: untouched grey
    assert tuple(px[35 * scale, 5 * scale]) == (50, 50, 50)
    # the spleen box outline in the spleen colour on its right edge
    spleen = np.array(label_color("spleen", 2))
    edge_col = 55 * scale
    column = px[25 * scale : 38 * scale, edge_col - 1 : edge_col + 1].reshape(-1, 3)
    assert (np.abs(column - spleen).sum(axis=1) == 0).any()
    # step markers are white discs inside the top-left of box b1 ("1" and "2")
    whites = (
        (px[10 * scale : 10 * scale + 22, 15 * scale : 15 * scale + 44] == 255).all(axis=2).sum()
    )
    assert whites > 100
    # the side panel has text (non-background pixels) and is dark elsewhere
    panel = px[:, 60 * scale :]
    assert (np.abs(panel - 24).sum(axis=2) > 60).sum() > 500



def test_the_panel_lists_mask_areas_box_sizes_and_the_warnings(sample_result):
    """What the PNG's side panel says after the answer and steps: each mask with its area,
    each box with its size in mm (as the module's record does), and the warnings, which the
    reader of the PNG would otherwise not see; a box on another slice is left out."""
    data = json.loads(json.dumps(sample_result))
    data["boxes"][0]["size_mm"] = [15.6, 7.8]
    data["boxes"].append({"id": "b3", "label": "aorta", "xyxy": [1, 1, 5, 5], "slice": 9})
    data["warnings"] = ['read "livr" as "liver" in the question, the closest name the engine '
                        "knows, to check the answer and to ask again."]
    lines = panel_lines(Result.from_json(data), slice_index=3)
    texts = [t for t, _ in lines]
    at = texts.index("liver, 123 mm2, 18 x 11 mm")
    assert texts[at + 1:at + 3] == ["b1 liver, 16 x 8 mm", "b2 spleen"]
    assert lines[at + 1][1] == label_color("liver", 1)
    assert texts[at + 3] == "" and texts[at + 4].startswith('! read "livr" as "liver"')
    warning = [t for t, c in lines if c == WARNING_COLOR]
    assert " ".join(x.strip() for x in warning) == "! " + data["warnings"][0]
    assert len(warning) > 1 and all(len(t) <= PANEL_WIDTH // 7 for t in warning)
    assert not [t for t in texts if "aorta" in t]
    assert [t for t, _ in panel_lines(Result.from_json(data))][-len(warning) - 2] == "b3 aorta"

def test_overlay_skips_other_slices_and_accepts_rgb():
    result = {
        "task": "segment",
        "masks": [],
        "boxes": [{"id": "b1", "label": "liver", "xyxy": [1, 1, 5, 5], "slice": 9}],
    }
    rgb = np.zeros((600, 600, 3), np.uint8)
    img = render_overlay(rgb, result, slice_index=2, panel=False)
    assert img.size == (600, 600)
    assert np.asarray(img).max() == 0
    img = render_overlay(rgb, result, slice_index=9, panel=False)
    assert np.asarray(img).max() > 0
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(rgb.astype(float), result)


def test_to_uint8_windows():
    hu = np.array([[-1000, -160, 40, 240, 3000]], dtype=np.int16)
    out = to_uint8(hu, "abdomen")  # level 60 width 400 → -140..260
    assert out.tolist() == [[0, 0, 115, 242, 255]]
    assert to_uint8(hu, [40, 400]).tolist()[0][2] == 128
    auto = to_uint8(hu)  # looks like CT → abdomen window
    assert np.array_equal(auto, out)
    mr = np.linspace(0, 1000, 101).reshape(1, -1)
    scaled = to_uint8(mr)
    assert scaled[0, 0] == 0 and scaled[0, -1] == 255
    with pytest.raises(ValueError, match="window must be one of"):
        to_uint8(hu, "brain-ish")


@pytest.mark.parametrize(
    "prompt,task",
    [
        ("Segment the liver.", "segment"),
        ("Where are the kidneys?", "detect"),
        ("Write a report, think step by step.", "report"),
        ("Describe the findings in this slice", "report"),
        ("Is there a pleural effusion?", "report"),
    ],
)
def test_guess_task(prompt, task):
    assert guess_task(prompt) == task


def test_ask_server_writes_the_overlay_png(http_server, sample_result, tmp_path):
    ct = np.full((6, 40, 60), -1000, np.int16)
    ct[3, 10:20, 15:35] = 60  # the "liver" at the abdomen window centre
    nii = gzip.compress(nib.Nifti1Image(ct.transpose(2, 1, 0).copy(), np.eye(4)).to_bytes())
    sample_result["task"] = "segment"
    http_server.routes[("POST", "/infer/citrusv_segment")] = lambda h: (
        200,
        "application/json",
        json.dumps(sample_result),
    )

    def image(handler):
        return 200, "application/gzip", nii

    http_server.routes[("GET", "/datastore/image")] = image
    png = tmp_path / "out.png"
    result = ask_server(http_server.url, "ct1", 3, "segment the liver", png)
    assert result.masks[0].label == "liver"
    sent = http_server.seen[-1]
    params = json.loads(
        parse_multipart(sent["body"], sent["headers"]["Content-Type"])["params"].text()
    )
    assert params == {"prompt": "segment the liver", "slice": 3, "axis": "axial"}
    assert http_server.seen[-1]["path"] == "/infer/citrusv_segment?image=ct1"
    assert any(s["path"] == "/datastore/image?image=ct1" for s in http_server.seen)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    scale = int(np.ceil(MIN_SIDE / 60))
    liver_px = img[15 * scale + scale // 2, 25 * scale + scale // 2]
    grey_60 = 128  # HU 60 in the abdomen window
    assert np.allclose(liver_px, 0.6 * grey_60 + 0.4 * np.array(label_color("liver")), atol=1)
    assert tuple(img[35 * scale, 5 * scale]) == (0, 0, 0)  # air


def test_ask_server_on_a_2d_image_sends_no_slice(http_server, tmp_path):
    xray = np.linspace(0, 4000, 30 * 50).reshape(1, 30, 50).astype(np.int16)
    path = write_label_volume(tmp_path / "xray.nrrd", LabelVolume(xray, np.eye(4)))
    answer = {
        "task": "detect",
        "prompt": "where is the heart?",
        "boxes": [{"id": "b1", "label": "heart", "xyxy": [10, 5, 30, 25], "slice": None}],
        "image": {"axis": "axial", "slices": []},
    }
    http_server.routes[("POST", "/infer/citrusv_detect")] = lambda h: (
        200,
        "application/json",
        json.dumps(answer),
    )
    png = tmp_path / "xray.png"
    result = ask_server(
        http_server.url, "chest_xray", None, "Where is the heart?", png, image_path=path
    )
    assert result.boxes[0].name == "b1 heart"
    sent = http_server.seen[-1]
    params = json.loads(
        parse_multipart(sent["body"], sent["headers"]["Content-Type"])["params"].text()
    )
    assert params == {"prompt": "Where is the heart?"}  # 2D: no slice, no axis (docs/api.md)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    scale = int(np.ceil(MIN_SIDE / 50))
    heart = np.array(label_color("heart"))
    edge = img[15 * scale, 30 * scale - 1 : 30 * scale + 1].reshape(-1, 3)
    assert (np.abs(edge - heart).sum(axis=1) == 0).any()


def test_step_text_replaces_box_tags_with_ids():
    from CitrusVLib.result import step_text

    assert (
        step_text(
            "the liver <bbox>[10, 12, 40, 44]</bbox> and <bbox>[1,2,3,4]</bbox> ok", ["b1", "b2"]
        )
        == "the liver (b1) and (b2) ok"
    )
    assert step_text("<|box_start|>(1,2),(3,4)<|box_end|> spleen", []) == "(box) spleen"


def test_the_slice_drawn_for_a_range_is_where_the_masks_are_largest():
    def entry(label, k, area):
        return {"label": label, "label_index": 1, "slice": k, "area_px": area, "rle": None}

    masks = [entry("liver", 10, 50), entry("liver", 11, 70), entry("spleen", 10, 30),
             entry("liver", 12, 0)]
    assert fullest_slice({"task": "segment", "masks": masks}, 9) == 10  # 80 px over 70
    boxes = [{"id": "b1", "label": "liver", "xyxy": [1, 2, 3, 4], "slice": 14},
             {"id": "b2", "label": "liver", "xyxy": [1, 2, 3, 4], "slice": 13}]
    assert fullest_slice({"task": "detect", "boxes": boxes}, 9) == 13  # no mask: first box
    assert fullest_slice({"task": "segment", "masks": [entry("liver", 12, 0)]}, 9) == 9
