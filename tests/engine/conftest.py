"""Tiny Citrus-V checkpoints written in the released layout, shared by the engine tests."""

from __future__ import annotations

import pytest
import torch

from citrusv import Engine
from citrusv.testing import write_tiny_checkpoint

ANSWERS = {
    "segment": "Sure, the liver is [SEG].",
    "detect": '```json\n[{"bbox_2d": [28, 14, 84, 70], "label": "liver"}]\n```',
    "report": "<think>1. The liver <bbox>[14, 14, 56, 42]</bbox> is normal.\n"
              "2. No lesion.</think><answer>Normal liver [SEG].</answer>",
}


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny matrices on a shared 2-core box: one torch thread is the fastest."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def fitted_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fitted", seed=0,
                                 answers=ANSWERS)


@pytest.fixture()
def engine(tiny_dir):
    return Engine.load(tiny_dir)


@pytest.fixture(scope="session")
def fitted_engine(fitted_dir):
    return Engine.load(fitted_dir)
