"""`GET /datastore/dataset` (MONAI Label's dataset ZIP) on the real server: the images with a
final label, a series folder's files included, their labels and each label's structure
names; a sentence where there is nothing to download; and the ZIP is not left on the
server's disk. MONAI Label 0.8.5 wrote a series folder as one empty entry, answered 500 with
no final label, and kept every ZIP it sent in the temporary folder. Also `GET /logs/gpu` on a
server without nvidia-smi (MONAI Label: 500)."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest

from tests.app.helpers import put_label, reference_label
from tests.server import copy_studies, start_citrusv_server

LIVER = 5  # the reference label map's liver


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, sample_root):
    root = tmp_path_factory.mktemp("dataset")
    studies = copy_studies(root / "studies", sample_root / "studies")
    slices = sorted((sample_root / "dicom" / "chest_ct").glob("*.dcm"))[60:64]
    (studies / "ct_part").mkdir()
    for f in slices:  # a series folder of four slices
        os.symlink(f, studies / "ct_part" / f.name)
    model_dir = shutil.copytree(tiny_model_dir, root / "model")
    with start_citrusv_server(studies, model_dir) as running:
        yield running


def _zips() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "citrusv-dataset-*.zip")))


def test_the_dataset_zip_holds_each_labelled_image_its_label_and_names(server, tmp_path):
    r = server.get("/datastore/dataset")
    assert (r.status_code, r.json()) == (404, {"detail": (
        "no image has a final label yet, so there is no dataset to download; corrections sent "
        "from Slicer become final labels.")})

    liver = reference_label(tmp_path / "liver.nii.gz", LIVER, server.studies / "chest_ct.nii.gz")
    assert put_label(server, "chest_ct", liver, {"label_info": [{"name": "liver", "idx": 1}],
                                                  "prompt": "Segment the liver."}).status_code == 200
    part = server.get("/datastore/image", params={"image": "ct_part"})
    assert part.status_code == 200
    (tmp_path / "part.nii.gz").write_bytes(part.content)
    grid = nib.load(tmp_path / "part.nii.gz")
    square = np.zeros(grid.shape, dtype=np.uint8)
    square[200:240, 220:260, 1] = 1
    nib.save(nib.Nifti1Image(square, grid.affine), tmp_path / "square.nii.gz")
    assert put_label(server, "ct_part", tmp_path / "square.nii.gz",
                     {"label_info": [{"name": "spleen", "idx": 1}]}).status_code == 200

    before = _zips()
    r = server.get("/datastore/dataset")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    final = server.studies / "labels" / "final"
    assert sorted(archive.namelist()) == sorted([
        "image/chest_ct.nii.gz", *(f"image/ct_part/IM00{k}.dcm" for k in range(60, 64)),
        "label/chest_ct.nii.gz", "label/ct_part.nii.gz",
        "label/.info/chest_ct.json", "label/.info/ct_part.json", "metadata.json"])
    assert archive.read("image/ct_part/IM0061.dcm") == (server.studies / "ct_part" / "IM0061.dcm"
                                                         ).read_bytes()
    assert archive.read("image/chest_ct.nii.gz") == (server.studies / "chest_ct.nii.gz").read_bytes()
    for image in ("chest_ct", "ct_part"):
        assert archive.read(f"label/{image}.nii.gz") == (final / f"{image}.nii.gz").read_bytes()
    names = {image: [(e["idx"], e["name"]) for e in json.loads(archive.read(
        f"label/.info/{image}.json"))["info"]["label_info"]] for image in ("chest_ct", "ct_part")}
    assert names == {"chest_ct": [(1, "liver")], "ct_part": [(1, "spleen")]}
    assert set(json.loads(archive.read("metadata.json"))["objects"]) == {
        "chest_ct", "chest_xray", "ct_part"}
    for _ in range(50):  # deleted once sent
        if _zips() == before:
            break
        time.sleep(0.1)
    assert _zips() == before

    one = zipfile.ZipFile(io.BytesIO(server.get("/datastore/dataset",
                                                params={"limit_cases": 1}).content))
    assert sorted(n for n in one.namelist() if n.startswith("label/")) == [
        "label/.info/chest_ct.json", "label/chest_ct.nii.gz"]
    r = server.get("/datastore/dataset", params={"limit_cases": 0})
    assert (r.status_code, r.json()) == (400, {"detail": (
        "limit_cases must be a number of images >= 1, not 0; leave it out for all.")})

    # a disk that fills while the ZIP is written: a sentence, and no part of it left behind
    import resource

    server.limit_writes(1 << 20)
    try:
        r = server.get("/datastore/dataset")
    finally:
        server.limit_writes(resource.RLIM_INFINITY)
    assert r.status_code == 507, r.text
    assert r.json()["detail"].startswith("The server hit the file size limit set for its "
                                         "process while writing the dataset ZIP")
    assert r.json()["detail"].endswith(": ask IT to free space on the server, then ask again.")
    assert _zips() == before
    assert server.get("/datastore/dataset").status_code == 200


def test_gpu_info_without_nvidia_smi_is_a_sentence(server):
    r = server.get("/logs/gpu")
    if shutil.which("nvidia-smi"):
        assert r.status_code == 200 and "NVIDIA" in r.text
    else:
        assert (r.status_code, r.json()) == (404, {"detail": (
            "nvidia-smi is not installed on this server, so it cannot report GPUs; GET /info/ "
            "says where the model runs (citrusv.device).")})
    assert server.get("/info/").status_code == 200
