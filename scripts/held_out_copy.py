"""A small copy of the sample data that `citrusv eval --sample-data DIR` scores the same way.

The `device` tool carries at most 64 MiB; the sample CT alone is 34 MB. `citrusv eval` reads
only the held-out slices, so this copy keeps those and fills every other slice with the CT's
lowest value (air), which compresses to almost nothing (8 MB in all):

    .venv/bin/python scripts/held_out_copy.py work/held_out
    citrusv eval --sample-data work/held_out      # the same digits as without --sample-data
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "models")]

from citrusv.evaluation import held_out_slices  # noqa: E402
from sample_data.build import REFERENCE, STUDIES  # noqa: E402


def write_held_out_copy(out: Path, studies: Path = STUDIES, reference: Path = REFERENCE) -> Path:
    img = nib.load(str(studies / "chest_ct.nii.gz"))
    data = np.asarray(img.dataobj)  # (x, y, z) as stored; the engine's slice k is z = k
    keep = np.zeros(data.shape[2], dtype=bool)
    keep[held_out_slices()] = True
    data = data.copy()
    data[:, :, ~keep] = data.min()
    (out / "studies").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(out / "studies" / "chest_ct.nii.gz"))
    shutil.copytree(reference / "chest_ct", out / "reference" / "chest_ct", dirs_exist_ok=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: scripts/held_out_copy.py OUT_DIR")
    print(write_held_out_copy(Path(sys.argv[1])))
