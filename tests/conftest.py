"""Shared fixtures: the sample studies (built once from PyPI wheels) and the repo paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]

# the real MONAI Label server fixtures (citrusv_server, citrusv_server_without_model)
pytest_plugins = ["tests.server"]

# The suite runs in pytest-xdist workers (pyproject: `-n auto --dist loadfile`), at most two.
# Much of a test's time is a server starting (one core importing MONAI Label) or a test waiting
# on one, so two workers overlap that. Each worker and what it starts (servers, their training
# runs) gets its share of the cores as torch threads: two workers with two threads each on two
# cores made one 12-second training run take 230 s. At most two threads each, as the servers
# had before (a container may see more cores than its CPU quota lets it use).
MAX_WORKERS = 2
MAX_THREADS = 2


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _share = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _share = max(1, min(MAX_THREADS, _share))
    os.environ["OMP_NUM_THREADS"] = str(_share)  # read when the worker first imports torch


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The built sample_data folder; builds it (from the pinned wheels) if it is missing."""
    from sample_data.build import ROOT, build_all, is_built

    # one pytest-xdist worker builds, the other waits
    with FileLock(REPO / ".pytest_cache" / "sample_data.lock"):
        if not is_built(ROOT):
            assert build_all() == 0, "citrusv sample-data failed; see its message above"
    return ROOT
