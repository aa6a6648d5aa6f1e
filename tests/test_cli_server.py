"""`citrusv ask --server`: the headless twin of the Slicer module, against the real server."""

from __future__ import annotations

import json

import numpy as np
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
    assert err.startswith("error: ") and len(err.splitlines()) == 1
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
