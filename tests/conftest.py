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


# The files that take longest, in seconds (setup, calls and teardowns summed from `python -m
# pytest --durations=0`, 2026-12-07, AMD EPYC 25/1, two workers). They are handed to the
# workers first, longest first (pyproject: `--no-loadscope-reorder`); the others follow in
# collection order. pytest-xdist's own order, the files with the most tests first, left
# one-test files of about a minute (a training run each) for the end while the other worker
# had nothing left: 13 min 36 s, where this order is about a minute shorter
# (`work/sim_sched.py`, git-ignored, replaying that run). A file missing here only starts later.
SLOW_FILES_S = {
    "tests/app/test_pacs.py": 211,
    "tests/app/test_corrections.py": 205,
    "tests/test_service_unit.py": 98,
    "tests/app/test_series_folders.py": 68,
    "tests/app/test_batch_infer.py": 60,
    "tests/app/test_datastore_processes.py": 59,
    "tests/slicer/test_mrml_pacs.py": 58,
    "tests/nano/test_nano.py": 58,
    "tests/app/test_keep_versions.py": 56,
    "tests/nano/test_recipe.py": 56,
    "tests/app/test_finetune_improves.py": 54,
    "tests/slicer/test_lib_https.py": 52,
    "tests/engine/test_engine.py": 52,
    "tests/app/test_bad_input.py": 44,
    "tests/slicer/test_mrml_server.py": 40,
    "tests/app/test_bf16.py": 40,
    "tests/app/test_info.py": 33,
    "tests/app/test_ask_again.py": 32,
}


def pytest_collection_modifyitems(config, items) -> None:
    # a stable sort on the file alone: each file's tests stay together and in their order
    first = sorted(SLOW_FILES_S, key=lambda f: -SLOW_FILES_S[f])
    rank = {f: i for i, f in enumerate(first)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The built sample_data folder; builds it (from the pinned wheels) if it is missing."""
    from sample_data.build import ROOT, build_all, is_built

    # one pytest-xdist worker builds, the other waits
    with FileLock(REPO / ".pytest_cache" / "sample_data.lock"):
        if not is_built(ROOT):
            assert build_all() == 0, "citrusv sample-data failed; see its message above"
    return ROOT
