"""The segmentation-stage fine-tune without its MLLM: [SEG] states first, then SAM2 alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from citrusv import Engine
from citrusv.checkpoint import count_parameters
from citrusv.errors import CheckpointError
from citrusv.testing import bright_square_samples
from citrusv.training import (SegSample, finetune_segmentation, seg_batch_losses,
                              seg_states_of, target_mask)


def _samples(seed: int, n: int) -> list[SegSample]:
    return bright_square_samples(n, 96, seed)


def _trained(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.state_dict().items() if not k.startswith("mllm.")}


def test_released_mllm_trains_the_same_weights_and_saves_on_its_base(fitted_dir, tmp_path):
    train, val = _samples(0, 6), _samples(1, 3)
    kept, released = Engine.load(fitted_dir), Engine.load(fitted_dir)
    a = finetune_segmentation(kept.model, kept.processor, train, steps=6, batch_images=2,
                              val_samples=val)
    b = finetune_segmentation(released.model, released.processor, train, steps=6,
                              batch_images=2, val_samples=val, release_mllm=True,
                              train_device="cpu")
    assert released.model.mllm is None and kept.model.mllm is not None
    assert sum(p.numel() for p in released.model.parameters()) == sum(
        p.numel() for k, p in kept.model.named_parameters() if not k.startswith("mllm."))
    # the same steps, the same losses, the same weights, the same held-out Dice
    assert b["loss_curve"] == a["loss_curve"]
    assert (b["val_dice_before"], b["val_dice_after"]) == (a["val_dice_before"], a["val_dice_after"])
    wa, wb = _trained(kept), _trained(released)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in _trained(Engine.load(fitted_dir)).items())

    with pytest.raises(CheckpointError, match="MLLM was released"):
        released.save_pretrained(tmp_path / "whole")
    version = released.save_pretrained(tmp_path / "version", base=fitted_dir)
    back = Engine.load(version)
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in wb.items())
    base = Engine.load(fitted_dir).model.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in back.model.state_dict().items()
               if k.startswith("mllm."))


def test_parameter_count_read_from_the_headers(fitted_dir, tmp_path):
    model = Engine.load(fitted_dir).model
    stored = {k: v for k, v in model.state_dict().items()}
    if model.config.mllm.tie_word_embeddings:
        stored.pop("mllm.lm_head.weight")
    assert count_parameters(fitted_dir, "mllm.") == sum(
        v.numel() for k, v in stored.items() if k.startswith("mllm."))
    assert count_parameters(fitted_dir) == sum(v.numel() for v in stored.values())
    engine = Engine.load(fitted_dir)
    version = engine.save_pretrained(tmp_path / "v", base=fitted_dir)
    assert count_parameters(version, "mllm.") == count_parameters(fitted_dir, "mllm.")


def test_bf16_model_fine_tunes_sam2_in_fp32(fitted_dir, tmp_path):
    # bf16 is the default on a GPU; SAM2's own code needs fp32 weights without autocast
    engine = Engine.load(fitted_dir, dtype="bf16")
    assert next(engine.model.mllm.parameters()).dtype == torch.bfloat16
    stats = finetune_segmentation(engine.model, engine.processor, _samples(0, 4), steps=3,
                                  batch_images=2, val_samples=_samples(1, 2), release_mllm=True)
    assert len(stats["loss_curve"]) == 3 and all(np.isfinite(stats["loss_curve"]))
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    back = Engine.load(engine.save_pretrained(tmp_path / "v", base=fitted_dir), dtype="bf16")
    res = back.ask(_samples(2, 1)[0].image, "Please segment the liver in this scan.",
                   window="abdomen")
    assert res.masks and res.masks[0].area_px > 0


def test_fine_tune_step_and_masks_keep_to_the_gpu(fitted_dir):
    # No GPU here: torch's fake tensors carry a device ("cuda") and check the devices of every
    # op as the GPU would, without computing. A tensor a step builds on the CPU fails it.
    from torch._subclasses.fake_tensor import FakeTensorMode

    engine = Engine.load(fitted_dir)
    samples = _samples(0, 2)
    # the [SEG] states need real values (generation); the fine-tune computes them first anyway
    inputs, states = seg_states_of(engine.model, engine.processor, samples)
    targets = [target_mask(s.mask) for s in samples]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = engine.model.to("cuda")
        assert next(model.parameters()).device.type == "cuda"
        parts = seg_batch_losses(model, inputs, targets, states, random.Random(0))  # augmented
        assert set(parts) == {"dice", "bce", "iou", "recall"}
        assert {v.device.type for v in parts.values()} == {"cuda"}
        feats = model.encode_slice(inputs[0].sam[None].to("cuda"))
        logits, iou = model.decode_masks(feats, states[:1].to("cuda"), inputs[0].hw)
        assert logits.device.type == iou.device.type == "cuda"
        assert tuple(logits.shape) == (1, *inputs[0].hw)
