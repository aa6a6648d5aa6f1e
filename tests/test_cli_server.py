"""`citrusv ask --server`: the headless twin of the Slicer module, against the real server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from citrusv.cli import main


def test_ask_server_writes_overlay_and_json(citrusv_server, tmp_path, capsys):
    png, out = tmp_path / "overlay.png", tmp_path / "result.json"
    rc = main(["ask", "--server", citrusv_server.url, "--image", "chest_ct", "--slice", "60",
               "--prompt", "Please segment the liver in this scan.", "--window", "abdomen",
               "--png", str(png), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["task"] == "segment"
    assert [m["slice"] for m in data["masks"]] == [60] * len(data["masks"]) and data["masks"]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] >= 512 and image.shape[1] >= 512  # the slice, plus the text panel
    assert "overlay:" in capsys.readouterr().out


def test_ask_server_on_an_unknown_image_is_one_sentence(citrusv_server, tmp_path, capsys):
    rc = main(["ask", "--server", citrusv_server.url, "--image", "no_such_image", "--slice", "1",
               "--prompt", "Please segment the liver in this scan.",
               "--png", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    # the server's own sentence (MONAI Label's GET /datastore/image said "Image NOT Found")
    assert err == ("error: image 'no_such_image' is not in the datastore; use an id from GET "
                   "/datastore/?output=all or upload the file.")
    assert not (tmp_path / "x.png").exists()


def test_ask_server_without_png_prints_the_answer(citrusv_server, tmp_path, capsys):
    # answer only: no overlay asked for, none written
    rc = main(["ask", "--server", citrusv_server.url, "--image", "chest_ct", "--slice", "60",
               "--prompt", "Please segment the liver in this scan.",
               "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["task"] == "segment" and [m["slice"] for m in data["masks"]] == [60]
    assert "mask 'liver'" in out and "overlay:" not in out
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]


def _wheres(server, model_dir, sample_root) -> list[list[str]]:
    """`citrusv ask` through the server, then with the same checkpoint run here."""
    return [["--server", server.url, "--image", "chest_ct"],
            ["--model", str(model_dir), "--image",
             str(sample_root / "studies" / "chest_ct.nii.gz")]]


def _asked_both_ways(server, model_dir, sample_root, tmp_path, capsys, args: list[str],
                     printed: str = "") -> tuple[dict, dict]:
    """The JSON results of `citrusv ask ARGS` through the server and with the local model
    (each run must succeed and, where `printed` is given, print it)."""
    results = []
    for where in _wheres(server, model_dir, sample_root):
        out = tmp_path / f"r{len(results)}.json"
        rc = main(["ask", *where, *args, "--json", str(out)])
        assert rc == 0, capsys.readouterr().err
        results.append(json.loads(out.read_text()))
        assert printed in capsys.readouterr().out
    return results[0], results[1]


def test_ask_over_a_slice_range_is_the_same_from_the_server_and_the_local_model(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys):
    """`--slice 58-62` asks over five slices: the server and the same checkpoint run here give
    the same answer, the same masks on the same slices and the same volume."""
    server, local = _asked_both_ways(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys,
        ["--slice", "58-62", "--prompt", "Segment the liver.", "--window", "abdomen",
         "--png", str(tmp_path / "r.png")], printed="shows slice ")
    assert server["image"]["slices"] == local["image"]["slices"] == [58, 59, 60, 61, 62]
    assert server["answer"] == local["answer"]
    assert [(m["slice"], m["area_px"]) for m in server["masks"]] == \
        [(m["slice"], m["area_px"]) for m in local["masks"]]
    assert server["volumes_ml"] == pytest.approx(local["volumes_ml"], rel=1e-6)
    assert set(server["volumes_ml"]) == {"liver"} and server["volumes_ml"]["liver"] > 0


def test_a_report_over_a_slice_range_is_the_same_from_the_server_and_the_local_model(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys):
    """A report question over slices 60-62: the server answers it (before 2026-12-06 its
    report task refused a range, where the local engine answered) as the local model does."""
    server, local = _asked_both_ways(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys,
        ["--slice", "60-62", "--prompt", "Write a report for this CT slice. Think step by step.",
         "--window", "abdomen"])
    assert server["task"] == local["task"] == "report"
    assert server["image"]["slices"] == local["image"]["slices"] == [60, 61, 62]
    assert server["text"] == local["text"] and server["answer"] == local["answer"]
    assert [line.split("]")[0] for line in server["text"].splitlines()
            if line.startswith("[slice ")] == ["[slice 60", "[slice 61", "[slice 62"]


def test_a_bad_slice_range_is_one_sentence(capsys):
    for value, said in (("40-30", "slice range 40-30 is reversed; give the first slice "
                                  "first (30-40)."),
                        ("x", "'x' is not a slice; give an index (65), a range (26-54) or all.")):
        with pytest.raises(SystemExit) as stop:
            main(["ask", "--server", "http://127.0.0.1:9", "--image", "chest_ct",
                  "--slice", value, "--prompt", "Segment the liver."])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().endswith(said)


def test_a_slice_range_outside_the_image_or_on_an_xray_is_one_sentence(
        tiny_model_dir, sample_root, capsys):
    studies = sample_root / "studies"
    for image, value, said in (
            ("chest_ct.nii.gz", "26-200", "error: slice 200 is out of range; this image has 133 "
             "axial slices, numbered 0 to 132."),
            ("chest_xray.dcm", "3-5", "error: --slice 3-5 asks over slices, but chest_xray.dcm "
             "is one image; leave --slice out.")):
        rc = main(["ask", "--model", str(tiny_model_dir), "--image", str(studies / image),
                   "--slice", value, "--prompt", "Segment the liver."])
        assert rc == 2
        assert capsys.readouterr().err.strip() == said


def test_a_slice_range_on_the_servers_xray_is_one_sentence(citrusv_server, capsys):
    rc = main(["ask", "--server", citrusv_server.url, "--image", "chest_xray", "--slice", "all",
               "--prompt", "Segment the lungs."])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "error: 'chest_xray' is one image, not a volume: a slice range (all) does not apply to "
        "it; leave the range out.")


def test_a_closer_look_with_roi_is_the_same_from_the_server_and_the_local_model(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys):
    """`--roi` asks for a closer look at that box: through the server as through a local
    model (before 2026-12-06 `--server` dropped `--roi` and answered a plain segmentation)."""
    server, local = _asked_both_ways(
        citrusv_server, tiny_model_dir, sample_root, tmp_path, capsys,
        ["--slice", "60", "--prompt", "Segment the liver.", "--roi", "80,110,300,320",
         "--window", "abdomen"])
    assert server["task"] == local["task"] == "closer_look"
    assert server["closer_look"]["roi"] == local["closer_look"]["roi"] == [80.0, 110.0, 300.0,
                                                                          320.0]
    assert server["closer_look"]["crops"] == local["closer_look"]["crops"]
    assert [m["area_px"] for m in server["masks"]] == [m["area_px"] for m in local["masks"]]


@pytest.mark.parametrize("extra, said", [
    (["--slice", "60", "--roi", "1,2,x"], "error: --roi 1,2,x is not a box; give four numbers "
                                          "x1,y1,x2,y2 in slice pixels, e.g. --roi "
                                          "80,110,300,320."),
    (["--slice", "60", "--roi", "1,2,3"], "error: --roi 1,2,3 is not a box;"),
    (["--slice", "20-25", "--roi", "1,2,3,4"], "error: a closer look (--roi) is about one "
                                               "slice; give --slice one index."),
])
def test_a_bad_roi_is_one_sentence_for_the_server_and_the_local_model(
        citrusv_server, tiny_model_dir, sample_root, capsys, extra, said):
    for where in _wheres(citrusv_server, tiny_model_dir, sample_root):
        rc = main(["ask", *where, "--prompt", "Segment the liver.", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(said) and len(err.splitlines()) == 1, err
