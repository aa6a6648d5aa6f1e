"""Shared fixtures: the sample studies (built once from PyPI wheels) and the repo paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the real MONAI Label server fixtures (citrusv_server, citrusv_server_without_model)
pytest_plugins = ["tests.server"]


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The built sample_data folder; builds it (from the pinned wheels) if it is missing."""
    from sample_data.build import ROOT, build_all, is_built

    if not is_built(ROOT):
        assert build_all() == 0, "citrusv sample-data failed; see its message above"
    return ROOT
