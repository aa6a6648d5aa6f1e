"""The training losses and the shared step loop, on values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from citrusv.training import LOSS_WEIGHTS, SEG_RECALL_WEIGHT, _lr_at, mask_losses, optimise


def _disc(size: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    return (((yy - c) ** 2 + (xx - c) ** 2) <= radius ** 2).float()


@pytest.mark.parametrize("radius", [2.0, 30.0])
def test_recall_term_is_area_normalised_where_bce_is_not(radius):
    target = _disc(64, radius)[None]
    low = torch.full((1, 3, 64, 64), -6.0)  # every logit strongly negative: an empty mask
    parts = mask_losses(low, torch.zeros(1, 3), target)
    # recall = mean over the target's pixels of softplus(6): the same for any structure size
    assert parts["recall"].item() == pytest.approx(math.log1p(math.exp(6.0)), rel=1e-4)
    # pixel-mean BCE scales with the area: a thin structure contributes almost nothing
    frac = target.mean().item()
    assert parts["bce"].item() == pytest.approx(frac * math.log1p(math.exp(6.0))
                                                + (1 - frac) * math.log1p(math.exp(-6.0)),
                                                rel=1e-3)


def test_recall_term_is_zero_for_an_empty_target_and_small_for_a_confident_hit():
    empty = mask_losses(torch.full((1, 3, 32, 32), -6.0), torch.zeros(1, 3),
                        torch.zeros(1, 32, 32))
    assert empty["recall"].item() == 0.0
    t = _disc(32, 8)[None]
    hit = mask_losses(torch.where(t > 0, 8.0, -8.0)[:, None].expand(1, 3, 32, 32),
                      torch.ones(1, 3), t)
    assert hit["recall"].item() < 1e-3 and hit["dice"].item() < 0.01
    assert hit["iou"].item() == pytest.approx(0.0, abs=1e-6)  # predicted IoU 1 = real IoU 1


def test_recall_only_weighs_in_the_segmentation_stage():
    assert LOSS_WEIGHTS["recall"] == 0.0  # the joint stage keeps the paper's loss
    assert 0 < SEG_RECALL_WEIGHT < LOSS_WEIGHTS["bce"]


def test_optimise_follows_the_schedule_and_stops_when_told():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    seen: list[tuple[int, float, dict]] = []
    opt_lr = []

    def batch():
        return {"a": (w ** 2).sum(), "b": w.sum()}

    def on_step(step, loss, parts):
        seen.append((step, loss, parts))

    ran = optimise([w], 10, 0.1, 2, batch, {"a": 1.0, "b": 0.0}, on_step)
    assert ran == 10 and [s[0] for s in seen] == list(range(10))
    assert seen[0][1] == pytest.approx(9.0) and seen[0][2] == {"a": 9.0, "b": 3.0}
    assert seen[-1][1] < seen[0][1]  # it minimises the weighted sum
    lrs = [_lr_at(k, 10, 0.1, 2) for k in range(10)]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[-1] > 0.01 and min(lrs) >= 0.01 - 1e-12  # cosine floor at 10 %
    calls = iter([False, False, True])
    assert optimise([w], 10, 0.1, 2, batch, {"a": 1.0, "b": 0.0}, lambda *a: opt_lr.append(a),
                    stop=lambda: next(calls)) == 2
    assert len(opt_lr) == 2


def test_state_bank_swaps_only_states_of_the_same_structure():
    import random

    from citrusv.training import StateBank

    rng = random.Random(0)
    keep_all = StateBank(0.0, rng)
    h = torch.arange(6.0).reshape(3, 2)
    assert keep_all.swap(h, ["liver", "heart", "liver"]) is h
    assert rng.random() == random.Random(0).random()  # share 0 draws no random numbers

    bank = StateBank(1.0, random.Random(1), keep=3)
    seen = {"liver": set(), "heart": set()}
    for step in range(20):  # liver states are >= 100, heart states < 0
        liver = torch.full((2,), 100.0 + step)
        heart = torch.full((2,), -1.0 - step)
        out = bank.swap(torch.stack([liver, heart]), ["liver", "heart"])
        assert out[0, 0] >= 100 and out[1, 0] < 0  # never another structure's state
        assert out[0, 0] >= 100 + step - 2  # only the last `keep` states are kept
        seen["liver"].add(float(out[0, 0]))
        seen["heart"].add(float(out[1, 0]))
    assert len(seen["liver"]) > 3 and len(seen["heart"]) > 3  # states do come from other steps
