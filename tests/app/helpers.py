"""Reading the server's answers: multipart -> (result JSON, label image), schema checks, RLE."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

RESULT_KEYS = {"task", "prompt", "model", "text", "answer", "reasoning", "boxes", "masks", "image",
               "timing_ms", "warnings", "label_names"}
MASK_KEYS = {"label", "label_index", "slice", "area_px", "area_mm2", "diameters_mm", "score",
             "rle"}
BOX_KEYS = {"id", "label", "xyxy", "slice", "score", "source", "text_xyxy", "size_mm"}


def while_it_waits(slow, other, after_s: float = 0.5):
    """Call `slow` on a thread and, `after_s` later, `other` here: (slow's answer, other's
    answer, the seconds other took, whether slow was still waiting when other answered), for
    a test that one request held no one else's."""
    answered = {}
    waiting = threading.Thread(target=lambda: answered.update(r=slow()))
    waiting.start()
    try:
        time.sleep(after_s)
        started = time.monotonic()
        quick = other()
        took = time.monotonic() - started
        still_waiting = waiting.is_alive()
    finally:
        waiting.join(timeout=60)
    return answered.get("r"), quick, took, still_waiting


def split_multipart(r: requests.Response, tmp: Path) -> tuple[dict, nib.Nifti1Image]:
    """MONAI Label's infer reply -> (params JSON, the label file loaded with nibabel)."""
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("multipart/form-data"), r.headers["content-type"]
    params, label_bytes, name = None, None, None
    for part in MultipartDecoder.from_response(r).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        else:
            label_bytes = part.content
            name = disposition.split('filename="')[1].split('"')[0]
    assert params is not None and label_bytes is not None
    assert name.endswith(".nii.gz"), name
    path = tmp / name
    path.write_bytes(label_bytes)
    return params, nib.load(path)


def zyx(img: nib.Nifti1Image) -> np.ndarray:
    """NIfTI data as the API's [z, y, x] index order."""
    data = np.asarray(img.dataobj)
    return data.transpose(2, 1, 0) if data.ndim == 3 else data.T[None]


def decode_rle(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    assert counts.sum() == h * w
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(h, w)


def check_result(result: dict, task: str) -> None:
    """The result JSON of docs/api.md."""
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["task"] == task
    assert set(result["model"]) >= {"name", "version"}
    assert isinstance(result["text"], str) and isinstance(result["answer"], str)
    for step in result["reasoning"]:
        assert set(step) >= {"step", "text", "box_ids"}
    for box in result["boxes"]:
        assert BOX_KEYS <= set(box)
        assert len(box["xyxy"]) == 4
    for mask in result["masks"]:
        assert MASK_KEYS <= set(mask)
        assert mask["label"] in result["label_names"]
        assert result["label_names"][mask["label"]] == mask["label_index"]
        assert decode_rle(mask["rle"]).sum() == mask["area_px"]
    image = result["image"]
    assert set(image) >= {"id", "shape", "spacing", "axis", "slices"}
    assert len(image["shape"]) == 3
    if image["spacing"] is None:  # the file gives no pixel size: nothing in mm
        assert all(box["size_mm"] is None for box in result["boxes"])
        assert all(mask["area_mm2"] is None for mask in result["masks"])
        return
    assert len(image["spacing"]) == 3
    # a box's size in mm: its pixels times the plane's spacing (image spacing is z, y, x; a
    # coronal plane's rows run along z, its columns along x; a sagittal one's along z and y)
    z, y, x = image["spacing"]
    rows, cols = {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[image["axis"]]
    for box in result["boxes"]:
        x1, y1, x2, y2 = box["xyxy"]
        assert box["size_mm"] == pytest.approx([(x2 - x1) * cols, (y2 - y1) * rows], abs=0.06)
    assert isinstance(result["timing_ms"], dict) and isinstance(result["warnings"], list)


def reference_label(path: Path, index: int, ct: Path) -> Path:
    """Structure `index` of the sample CT's reference label map, written to `path` as a
    correction a radiologist would send: 0/1 on the CT's own grid (`ct`: the CT's NIfTI)."""
    ref = nib.load(Path(__file__).resolve().parents[2] / "sample_data" / "reference"
                   / "chest_ct" / "mask.nii.gz")
    mask = (np.asarray(ref.dataobj) == index).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, nib.load(ct).affine), path)
    return path


def put_label(server, image: str, path: Path, params: dict,
              token: str | None = None) -> requests.Response:
    """PUT /datastore/label?tag=final: the label file at `path` with these params (JSON), as
    the Slicer module sends a correction; `token`: a bearer token when sign-in is on."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with open(path, "rb") as f:
        return server.put(f"/datastore/label?image={image}&tag=final", headers=headers,
                          files={"label": (path.name, f, "application/gzip")},
                          data={"params": json.dumps(params)})


def run_training(server, **options) -> dict:
    """POST /train/citrusv_finetune with these options and wait for the run to end; returns
    its last status (check `status` == "DONE")."""
    r = server.post("/train/citrusv_finetune", json=options)
    assert r.status_code == 200, r.text
    return wait_for_training(server)


def wait_for_training(server, timeout_s: float = 900) -> dict:
    """Poll GET /train/ until the running training task ends; its last status. The limit only
    says when to give up: 420 s was enough with the suite alone on a 2-core box, and ran out
    (a 200-step run at ~4 s a step) with another training run beside the suite."""
    return wait_for_task(server, "/train/", timeout_s, every_s=2)


def wait_until_listed_running(server, path: str, sending, timeout_s: float = 60,
                              every_s: float = 0.05):
    """Poll `GET {path}?check_if_running=true` (GET /train/, GET /batch/infer) while the
    thread `sending` waits for a `run_sync` request, until the run is in MONAI Label's task
    table (200), the request has been answered, or `timeout_s` has passed; the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = server.get(path, params={"check_if_running": "true"})
        if running.status_code == 200 or not sending.is_alive() or time.monotonic() > deadline:
            return running
        time.sleep(every_s)


def wait_for_task(server, path: str, timeout_s: float, every_s: float, until=None) -> dict:
    """Poll a MONAI Label task list (GET /train/, GET /batch/infer) until its latest task has
    ended (DONE, ERROR or STOPPED), or `until(task)` holds; that task's status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = server.get(path)
        if r.status_code == 200 and (r.json().get("status") in ("DONE", "ERROR", "STOPPED")
                                     or (until is not None and until(r.json()))):
            return r.json()
        time.sleep(every_s)
    raise AssertionError(f"the task of {path} did not end in {timeout_s} s:\n{server.log()}")


def read_as_slicer(path) -> np.ndarray:
    """The pixels of a DICOM file as 3D Slicer's DICOM module loads them, [k, j, i]: with ITK's
    GDCMImageIO (the module's default reader, "GDCM with DCMTK fallback", through vtkITK), here
    through SimpleITK. It turns MONOCHROME1 into MONOCHROME2 at read (2^BitsStored - 1 minus
    the stored value: bone bright), so that is what Slicer holds and uploads."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_slicer_reader(path).Execute())


def slicer_spacing(path) -> tuple[float, float, float]:
    """The voxel size (i, j, k) that 3D Slicer's DICOM module gives a DICOM file, by the same
    reader as `read_as_slicer` (for a CR, GDCM takes ImagerPixelSpacing only: 1 mm where there
    is none, PixelSpacing or not)."""
    reader = _slicer_reader(path)
    reader.ReadImageInformation()
    return tuple(float(v) for v in reader.GetSpacing())


def _slicer_reader(path):
    """A SimpleITK reader with ITK's GDCMImageIO, the reader of Slicer's DICOM module."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    return reader
