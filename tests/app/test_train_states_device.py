"""Where a training run computes its [SEG] states: `--conf train_mllm_device auto|cuda|cpu`.

The choice is a pure function of the GPU's free memory, so it is checked here with numbers; the
server tests (CPU only here) check that a run records where it computed them.
"""

from __future__ import annotations

import sys

import pytest

from tests.server import APP_DIR, assert_refuses_setting, copy_studies

sys.path.insert(0, str(APP_DIR))
from lib.trainers.citrusv_finetune import (choose_mllm_device, failure_sentence,  # noqa: E402
                                           parse_mllm_device)

GIB = 1024**3
WEIGHTS_8B = 17 * GIB  # Citrus-V-8B in bf16, about


def test_auto_puts_a_second_copy_on_the_gpu_only_where_it_fits():
    # 80 GB card with the server's copy loaded: ~63 GiB free
    device, why = choose_mllm_device("auto", "cuda", WEIGHTS_8B, 63 * GIB)
    assert device == "cuda" and why.startswith("63.0 GiB free on the GPU")
    # 24 GB card: the server's copy leaves ~6 GiB
    device, why = choose_mllm_device("auto", "cuda:0", WEIGHTS_8B, 6 * GIB)
    assert device == "cpu" and "a second copy needs about 22.4 GiB" in why
    assert choose_mllm_device("auto", "cuda", WEIGHTS_8B, int(22.4 * GIB) + GIB)[0] == "cuda"
    assert choose_mllm_device("auto", "cuda", WEIGHTS_8B, None)[0] == "cpu"


def test_asked_device_is_used_and_cpu_training_stays_on_cpu():
    assert choose_mllm_device("cuda", "cuda:1", WEIGHTS_8B, 1 * GIB)[0] == "cuda:1"
    assert choose_mllm_device("cpu", "cuda", WEIGHTS_8B, 80 * GIB)[0] == "cpu"
    assert choose_mllm_device("cuda", "cpu", WEIGHTS_8B, None) == ("cpu", "training runs on cpu")
    assert parse_mllm_device(None) == "auto" and parse_mllm_device(" CPU ") == "cpu"


def test_every_bad_setting_is_said_at_once_and_the_server_stops(tiny_model_dir,
                                                                 citrusv_sample_studies, tmp_path):
    """One sentence per bad `--conf` value, all in the one line the server stops with, so an
    admin mends them in one go. Before 2026-12-07 the server stopped at the first, and a bad
    study_cache, closer_look_margin, max_slice_pixels or max_voxels ended in a traceback; a
    misspelt setting ("keep_version") was silently not used."""
    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    assert_refuses_setting([
        r"--conf keep_version is not a setting; did you mean keep_versions\?",
        r"--conf device gpu0 is not a device; use cuda or cpu\.",
        r"--conf dtype fp8 is not supported; use bf16 or fp32\.",
        r"--conf ask_again must be true or false, not 'maybe'\.",
        r"--conf train_mllm_device gpu is not one of auto, cuda, cpu\.",
        r"--conf keep_versions two is not a whole number >= 0 \(0 keeps every fine-tuned "
        r"version; N keeps the N newest\)\.",
        r"--conf study_cache two is not a whole number >= 0 \(how many studies a server keeps "
        r"read for the next question; default 2\)\.",
        r"--conf closer_look_margin wide is not a number from 0 to 2 \(what a closer look adds "
        r"on each side of the region, as a share of its larger side; default 0\.15\)\.",
        r"--conf max_slice_pixels 0 is not a whole number >= 1 \(the most pixels a slice may "
        r"have; default 67108864\)\.",
        r"--conf max_voxels -5 is not a whole number >= 1 \(the most voxels an image may have; "
        r"default 1073741824\)\.",
        r"--conf pacs_cache_gb must be a number of gigabytes >= 0 \(0: no limit\), not "
        r"'lots'\.",
    ], studies, tiny_model_dir, keep_version="3", device="gpu0", dtype="fp8", ask_again="maybe",
        train_mllm_device="gpu", keep_versions="two", study_cache="two",
        closer_look_margin="wide", max_slice_pixels="0", max_voxels="-5", pacs_cache_gb="lots")


def test_device_the_process_cannot_use_stops_the_server_with_a_sentence(
        tiny_model_dir, citrusv_sample_studies, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the check is for a server that sees none")
    studies = copy_studies(tmp_path / "studies", citrusv_sample_studies)
    # before: the server started and answered the first question 503 with torch's words;
    # fp16 was accepted without a word before, and Qwen2.5 in fp16 can overflow
    assert_refuses_setting([
        r"--conf device cuda: this process sees no CUDA GPU \(check the NVIDIA driver with "
        r"nvidia-smi.*",
        r"--conf dtype fp16 is not supported: Qwen2.5-VL was trained in bf16 and can overflow "
        r"in fp16; use bf16, or fp32 on a GPU without bf16\.",
    ], studies, tiny_model_dir, device="cuda", dtype="fp16")


def test_a_run_out_of_gpu_memory_says_what_to_do():
    import torch

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    said = failure_sentence(oom, {"batch_images": 4})
    assert said.startswith("The GPU ran out of memory in the fine-tune (4 slices per step): "
                           "send a smaller batch_images or free GPU memory; the corrections "
                           "are kept.")
    assert said.endswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert failure_sentence(OSError(27, "File too large"), {}) == "OSError: [Errno 27] File too large"
