"""Show it works: corrections on some slices of a structure raise Dice on its other slices.

The reference spleen is submitted as a correction on every other slice it appears on; after
`citrusv_finetune`, Dice of the served masks (full HTTP path: prompt -> generate -> [SEG] ->
SAM2) on the *held-out* spleen slices is compared with Dice before training.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.app.helpers import put_label
from tests.server import copy_studies, start_citrusv_server

from .helpers import decode_rle

REFERENCE = Path(__file__).resolve().parents[2] / "sample_data" / "reference" / "chest_ct"
PROMPT = "Segment the spleen."
# Set to a real checkpoint (e.g. models/nano) to run the same benchmark on it.
MODEL_DIR = os.environ.get("CITRUSV_FINETUNE_BENCH_MODEL")
STEPS = int(os.environ.get("CITRUSV_FINETUNE_BENCH_STEPS", "60"))


def _dice(server, k: int, truth: np.ndarray) -> float:
    r = server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                    data={"params": json.dumps({"prompt": PROMPT, "slice": k})})
    assert r.status_code == 200, r.text
    pred = np.zeros_like(truth)
    for m in r.json()["masks"]:
        pred |= decode_rle(m["rle"])
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def test_finetune_on_some_slices_raises_dice_on_the_others(tmp_path_factory, tiny_model_dir,
                                                            citrusv_sample_studies):
    root = tmp_path_factory.mktemp("finetune_bench")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    model_dir = root / "model"
    shutil.copytree(MODEL_DIR or tiny_model_dir, model_dir,
                    ignore=shutil.ignore_patterns("versions"))

    ref = nib.load(REFERENCE / "mask.nii.gz")
    names = json.loads((REFERENCE / "labels.json").read_text())
    spleen_idx = int(next(k for k, v in names.items() if v == "spleen"))
    spleen = np.asarray(ref.dataobj).transpose(2, 1, 0) == spleen_idx  # [z, y, x]
    slices = [int(k) for k in np.flatnonzero(spleen.reshape(spleen.shape[0], -1).any(axis=1))]
    trained, held_out = slices[::2], slices[1::2]
    correction = np.zeros(spleen.shape, dtype=np.uint8)
    correction[trained] = spleen[trained]
    label_path = root / "spleen_correction.nii.gz"
    nib.save(nib.Nifti1Image(correction.transpose(2, 1, 0), ref.affine), label_path)

    with start_citrusv_server(studies, model_dir) as server:
        before = [_dice(server, k, spleen[k]) for k in held_out]
        r = put_label(server, "chest_ct", label_path,
                      {"label_info": [{"name": "spleen", "idx": 1}], "prompt": PROMPT})
        assert r.status_code == 200, r.text
        t0 = time.monotonic()
        r = server.post("/train/citrusv_finetune",
                        json={"steps": STEPS, "batch_images": 4, "val_every": 0})
        assert r.status_code == 200, r.text
        while True:
            task = server.get("/train/").json()
            if task.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            assert time.monotonic() - t0 < 480, "training took too long"
            time.sleep(2)
        assert task["status"] == "DONE", "\n".join(task.get("details", []))
        train_s = time.monotonic() - t0
        after = [_dice(server, k, spleen[k]) for k in held_out]
        version = server.post("/infer/citrusv_segment?image=chest_ct&output=json",
                              data={"params": json.dumps({"prompt": PROMPT, "slice": held_out[0]})}
                              ).json()["model"]["version"]

    summary = {"structure": "spleen", "trained_slices": trained, "held_out_slices": held_out,
               "dice_before": round(float(np.mean(before)), 4),
               "dice_after": round(float(np.mean(after)), 4), "train_seconds": round(train_s, 1),
               "served_version": version}
    print("\nfine-tune on corrections:", json.dumps(summary))
    (root / "finetune_bench.json").write_text(json.dumps(summary, indent=2))
    assert version == "1"
    assert summary["dice_after"] > summary["dice_before"] + 0.05, summary
