"""The sample CT with the nano structures, loaded once for all nano tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def study(sample_root):
    from citrusv.nano_data import load_study

    return load_study(sample_root)
