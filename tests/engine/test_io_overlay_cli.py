import json
import re

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image

from citrusv import InputError
from citrusv.bench import run_bench
from citrusv.cli import main
from citrusv.io import read_study


def _volume():
    return np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z) as stored


def test_nifti_is_read_in_zyx_index_order(tmp_path):
    data = _volume()
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    study = read_study(tmp_path / "ct.nii.gz")
    assert study.array.shape == (6, 5, 4) and study.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert study.array[3, 2, 1] == data[1, 2, 3]
    np.testing.assert_allclose(study.affine, affine)


def test_nrrd_is_read_in_zyx_index_order(tmp_path):
    data = _volume()
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([0.7, 0.8, 2.5]), "space origin": [1.0, 2.0, 3.0]}
    nrrd.write(str(tmp_path / "ct.nrrd"), data, header)
    study = read_study(tmp_path / "ct.nrrd")
    assert study.array.shape == (6, 5, 4) and study.array[3, 2, 1] == data[1, 2, 3]
    assert study.spacing == pytest.approx((2.5, 0.8, 0.7))


def _dicom(path, z, value, photometric="MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 4, 3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = photometric
    ds.PixelSpacing = [0.6, 0.9]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.full((4, 3), value, np.uint16).tobytes()
    ds.save_as(str(path), write_like_original=False)


def test_dicom_series_sorted_along_normal_and_rescaled(tmp_path):
    for i, z in enumerate([5.0, -5.0, 0.0]):
        _dicom(tmp_path / f"im{i}.dcm", z, 1000 + int(z))
    study = read_study(tmp_path)
    assert study.array.shape == (3, 4, 3)
    assert study.array[:, 0, 0].tolist() == [-29.0, -24.0, -19.0]
    assert study.spacing == pytest.approx((5.0, 0.6, 0.9)) and study.modality == "CT"
    single = read_study(tmp_path / "im0.dcm")
    assert single.kind == "image" and single.array.shape == (4, 3)
    # a second series in the folder: said, not one of them taken in silence
    _dicom(tmp_path / "other.dcm", 10.0, 1000)
    other = pydicom.dcmread(tmp_path / "other.dcm")
    other.SeriesInstanceUID = "1.2.3.5"
    other.save_as(str(tmp_path / "other.dcm"))
    with pytest.raises(InputError, match=f"^{tmp_path.name} holds 2 DICOM series; pick the "
                       "folder of one series.$"):
        read_study(tmp_path)


def test_png_and_unreadable(tmp_path):
    Image.fromarray(np.full((7, 9), 200, np.uint8)).save(tmp_path / "x.png")
    study = read_study(tmp_path / "x.png")
    assert study.kind == "image" and study.array.shape == (7, 9)
    (tmp_path / "junk.dcm").write_bytes(b"not an image")
    with pytest.raises(InputError, match="could not be read"):
        read_study(tmp_path / "junk.dcm")


def test_cli_ask_writes_json_and_png(fitted_dir, tmp_path, capsys):
    vol = np.full((60, 50, 5), -100, np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    rc = main(["ask", "--model", str(fitted_dir), "--image", str(tmp_path / "ct.nii.gz"),
               "--slice", "3", "--prompt", "Please segment the liver in this scan.",
               "--window", "abdomen", "--json", str(tmp_path / "r.json"),
               "--png", str(tmp_path / "r.png")])
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["text"] == "Sure, the liver is [SEG]." and data["masks"][0]["slice"] == 3
    assert data["masks"][0]["rle"]["size"] == [50, 60]
    assert data["image"]["shape"] == [5, 50, 60] and data["image"]["slices"] == [3]
    assert Image.open(tmp_path / "r.png").size[1] >= 50
    out = capsys.readouterr().out
    assert "mask 'liver'" in out and "intended use" not in out and "intended_use" not in data["model"]
    # with the model folder's intended use: in the JSON and printed, as the server sends it
    (fitted_dir / "intended_use.txt").write_text("Test model; not for clinical use.\n")
    try:
        rc = main(["ask", "--model", str(fitted_dir), "--image", str(tmp_path / "ct.nii.gz"),
                   "--slice", "3", "--prompt", "Please segment the liver in this scan.",
                   "--json", str(tmp_path / "r.json")])
    finally:
        (fitted_dir / "intended_use.txt").unlink()
    assert rc == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["model"]["intended_use"] == "Test model; not for clinical use."
    assert "intended use: Test model; not for clinical use." in capsys.readouterr().out.splitlines()
    rc = main(["ask", "--model", str(fitted_dir), "--image", str(tmp_path / "ct.nii.gz"),
               "--slice", "9", "--prompt", "Segment the liver."])
    assert rc == 2 and "slice 9 is outside" in capsys.readouterr().err


def test_printed_boxes_carry_their_score(capsys):
    from citrusv.commands import print_result

    print_result({"task": "detect", "text": "", "answer": "", "boxes": [
        {"id": "b1", "label": "liver", "xyxy": [1.0, 2.0, 30.25, 40.0], "score": 0.42},
        {"id": "b2", "label": "spleen", "xyxy": [5.0, 6.0, 7.0, 8.0], "score": None},
        {"id": "b3", "label": "heart", "xyxy": [5.0, 6.0, 9.0, 8.0], "score": 0.3,
         "source": "mask", "text_xyxy": [4.0, 6.0, 9.5, 8.25]}]})
    out = capsys.readouterr().out.splitlines()
    assert "box b1 'liver': [1.0, 2.0, 30.2, 40.0], score 0.420" in out
    assert "box b2 'spleen': [5.0, 6.0, 7.0, 8.0]" in out
    assert ("box b3 'heart': [5.0, 6.0, 9.0, 8.0] (from the 'heart' mask; written "
            "[4.0, 6.0, 9.5, 8.2]), score 0.300") in out
    # with the image's spacing: a box's size, a mask's area and its axes in mm
    print_result({"task": "segment", "text": "", "answer": "", "masks": [
        {"label": "liver", "area_px": 100, "area_mm2": 49.0, "diameters_mm": [11.3, 7.2],
         "score": 0.5}], "boxes": [
        {"id": "b1", "label": "liver", "xyxy": [0.0, 0.0, 10.0, 20.0], "size_mm": [7.0, 14.0],
         "score": None}]})
    out = capsys.readouterr().out.splitlines()
    assert "mask 'liver': 100 px (49.0 mm²), 11 x 7 mm, score 0.500" in out
    assert "box b1 'liver': [0.0, 0.0, 10.0, 20.0], 7 x 14 mm" in out


def test_bench_figures_on_tiny_model(tiny_dir):
    from citrusv import Engine

    r = run_bench(Engine.load(tiny_dir), size=96, new_tokens=8, repeats=2)
    assert r["new_tokens"] == 8 and r["prompt_tokens"] > 40
    assert r["plain_generate_ms"] > 0 and r["capture_generate_ms"] > 0
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
    # figures, not a race: that a cached slice skips the image encoders is counted, not timed,
    # in test_engine.py (cached < cold in ms failed beside a training run: 16.2 against 15.4)
    assert r["mask_cold_ms"] > 0 and r["mask_cached_ms"] > 0
    assert r["mask_cached_over_cold"] == r["mask_cached_ms"] / r["mask_cold_ms"]
    assert r["range_slices"] == 24 and r["range_alone_ms"] > 0 and r["question_alone_ms"] > 0
    assert r["question_during_over_alone"] == (r["question_during_range_ms"]
                                               / r["question_alone_ms"])


def test_finetune_memory_figure_runs_each_mode_in_its_own_process(tiny_dir):
    from citrusv import Engine
    from citrusv.bench import finetune_memory, format_finetune_memory

    r = finetune_memory(str(tiny_dir), None, "cpu", None, steps=2, size=64, samples=2)
    mllm = Engine.load(tiny_dir).model.mllm
    assert r["mllm_weights_mb"] == sum(p.numel() * p.element_size()
                                       for p in mllm.parameters()) / 1024**2
    assert r["finetune_kept_mb"] > 100 and r["finetune_released_mb"] > 100  # torch alone is more
    text = format_finetune_memory(r)
    assert "resident set" in text and "% of kept" in text


def test_cli_eval_on_a_missing_model_says_one_sentence(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: model directory ") and "does not exist" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_eval_with_an_unknown_window_says_one_sentence(capsys):
    rc = main(["eval", "--window", "purple"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: --window must be one of abdomen, bone, lung, soft_tissue, "
                               "not 'purple'.")


@pytest.mark.parametrize("device, words", [
    ("gpu", "error: --device gpu is not a device; use cuda or cpu."),
    ("cuda:x", "error: --device cuda:x is not a device; use cuda or cpu."),
    ("cuda", "error: --device cuda: this process sees no CUDA GPU (check the NVIDIA driver"),
])
@pytest.mark.parametrize("command", [["eval"], ["bench", "--model", "models/nano"]])
def test_cli_device_this_process_cannot_use_says_one_sentence(command, device, words, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the check is for one that has none")
    rc = main(command + ["--device", device])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(words)
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_engine_load_checks_the_device_first(tiny_dir):
    from citrusv import Engine

    with pytest.raises(InputError, match=r"^device cuda:x is not a device; use cuda or cpu\.$"):
        Engine.load(tiny_dir, device="cuda:x")


FP16_REFUSED = ("is not supported: Qwen2.5-VL was trained in bf16 and can overflow in fp16; "
                "use bf16, or fp32 on a GPU without bf16.")


@pytest.mark.parametrize("dtype, words", [
    ("fp16", f"error: --dtype fp16 {FP16_REFUSED}"),
    ("int8", "error: --dtype int8 is not supported; use bf16 or fp32."),
])
@pytest.mark.parametrize("command", [["eval"], ["bench", "--model", "models/nano"]])
def test_cli_dtype_it_cannot_run_says_one_sentence(command, dtype, words, capsys):
    rc = main(command + ["--dtype", dtype])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == words


def test_engine_refuses_fp16_and_takes_the_dtype_names_in_any_case(tiny_dir):
    import torch

    from citrusv import Engine
    from citrusv.engine import resolve_dtype

    with pytest.raises(InputError, match=f"^dtype half {re.escape(FP16_REFUSED)}$"):
        Engine.load(tiny_dir, dtype="half")
    assert resolve_dtype("BF16", "cpu") is torch.bfloat16
    assert resolve_dtype(None, "cpu") is torch.float32 and resolve_dtype(None, "cuda") is torch.bfloat16


def test_cli_eval_without_the_sample_data_says_one_sentence(tmp_path, capsys):
    rc = main(["eval", "--sample-data", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"error: {tmp_path}/studies/chest_ct.nii.gz is missing; build the sample data "
                   "with `python -m sample_data` (scripts/install.sh does).")
