"""scripts/held_out_copy.py: the small sample-data copy that `citrusv eval --sample-data` reads
on a machine the device tool carries 64 MiB to."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from citrusv.evaluation import held_out_slices
from citrusv.nano_data import load_study

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "held_out_copy.py"


def test_copy_keeps_the_held_out_slices_and_blanks_the_rest(study, sample_root, tmp_path):
    spec = importlib.util.spec_from_file_location("held_out_copy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.write_held_out_copy(tmp_path / "held_out", sample_root / "studies",
                                     sample_root / "reference")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 12e6, size  # the full CT alone is 34 MB
    copy = load_study(out)
    assert copy.spacing == pytest.approx(study.spacing)
    np.testing.assert_array_equal(copy.labels, study.labels)
    held = held_out_slices()
    np.testing.assert_array_equal(copy.volume[held], study.volume[held])
    others = np.setdiff1d(np.arange(study.volume.shape[0]), held)
    assert (copy.volume[others] == study.volume.min()).all()
