"""The nano recipe: `citrusv train` with no options runs it, rounds hand over through the stored
checkpoint, and the shipped models/nano is what one such run wrote (fixed steps, no early stop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from citrusv.checkpoint import read_example_prompts, read_intended_use
from citrusv.nano_data import NAMES, NANO_INTENDED_USE, nano_example_prompts, segment_answer
from citrusv.training import (NANO_RECIPE, cpu_vendor, host_differences, recipe_host_note,
                              train_nano, training_host)

NANO = Path(__file__).resolve().parents[2] / "models" / "nano"


def test_shipped_nano_was_made_by_the_default_recipe():
    """One run of the recipe, or (T2 + its crop round) a run of its last rounds with
    `--first-round`, continuing a model a whole run of the earlier rounds saved, which
    test_continuing_from_a_rounds_checkpoint_gives_the_whole_runs_weights shows to be the same."""
    log = json.loads((NANO / "training_log.json").read_text())
    runs = [log]
    if log.get("first_round", 1) > 1:
        earlier = log["earlier_run"]
        assert log["init_from"] is not None and earlier["init_from"] is None
        runs.append(earlier)
    else:
        assert log["init_from"] is None
    assert log["seed"] == NANO_RECIPE["seed"] == 1
    for run in runs:  # the default: repeats byte for byte on the same kind of CPU
        assert run["threads"] == 1
    assert cpu_vendor(log["host"]) == cpu_vendor(runs[-1]["host"])
    assert log["stopped_early"] is False
    assert log["whole_names"] == NANO_RECIPE["whole_names"]
    assert log["recall_weight"] == NANO_RECIPE["recall_weight"]
    assert log.get("state_swap", 0.0) == NANO_RECIPE["state_swap"]  # W's log predates the option
    keys = ("joint_steps", "seg_steps", "lr", "seg_lr")
    assert [{**{k: r[k] for k in keys}, "crop_share": r.get("crop_share", 0.0)}
            for r in log["rounds"]] == [{"crop_share": 0.0, **r} for r in NANO_RECIPE["rounds"]]
    for r in log["rounds"]:
        assert (r["joint_steps_run"], r["seg_steps_run"]) == (r["joint_steps"], r["seg_steps"])
    assert sum(run["total_seconds"] for run in runs) < 2 * 3600


def test_cli_defaults_are_the_recipe():
    from citrusv.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.joint_steps, args.seg_steps, args.lr, args.seg_lr, args.whole_names,
            args.state_swap, args.seed, args.crop_share, args.joint_crop_share,
            args.first_round) == (None,) * 10
    assert args.threads == 1 and args.out == "models/nano"
    assert args.eval is True  # a retrain is scored before anyone serves it
    assert build_parser().parse_args(["train", "--no-eval"]).eval is False


def test_first_round_on_the_command_line_is_checked_before_any_work(capsys):
    from citrusv.cli import build_parser

    for argv, said in ((["--first-round", "2"], "give --init"),
                       (["--init", "models/nano", "--first-round", "2", "--seg-steps", "5"],
                        "no step counts"),
                       (["--init", "models/nano", "--first-round", "9"],
                        f"must be 1 to {len(NANO_RECIPE['rounds'])}")):
        args = build_parser().parse_args(["train", *argv, "--out", "unused"])
        assert args.func(args) == 2
        assert said in capsys.readouterr().err


def test_missed_targets_are_named_with_their_shortfall():
    from citrusv.evaluation import missed_targets

    dice = {"right lung": 0.97, "left lung": 0.98, "liver": 0.55}
    scores = {"mean_dice": 0.701, "dice": dice, "detection_precision": 0.759,
              "citation_precision": 0.852}  # T2i's figures (MODEL_CARD.md)
    assert missed_targets(scores) == ["mean Dice 0.701 < 0.75 (by 0.049)",
                                      "liver Dice 0.550 < 0.85 (by 0.300)"]
    shipped = {**scores, "mean_dice": 0.761, "dice": {**dice, "liver": 0.905}}  # T2c's
    assert missed_targets(shipped) == []
    assert missed_targets({**shipped, "citation_precision": None}) == [
        "report citation precision n/a (target 0.8)"]


@pytest.mark.usefixtures("sample_root")
def test_after_training_the_weights_are_scored_and_the_verdict_follows_the_scores(tmp_path):
    """What `citrusv train` prints at its end (here on one held-out slice, the shipped weights
    standing in for fresh ones): the table, evaluation.json beside the weights, a verdict."""
    import shutil

    from citrusv.evaluation import missed_targets
    from citrusv.training import post_training_verdict

    out = shutil.copytree(NANO, tmp_path / "nano")
    text = post_training_verdict(out, slices=[100])
    scores = json.loads((out / "evaluation.json").read_text())
    assert scores["slices"] == [100]
    assert "| mean Dice (10 structures) |" in text
    # on slice 100 alone (the chest: no liver) nano's mean Dice is 0.723 and the liver cannot
    # be scored: the verdict names both misses
    assert missed_targets(scores) == ["mean Dice 0.723 < 0.75 (by 0.027)",
                                      "liver Dice n/a (target 0.85)"]
    assert text.splitlines()[-1] == (
        "These weights MISS targets on the held-out blocks: mean Dice 0.723 < 0.75 (by 0.027); "
        "liver Dice n/a (target 0.85). Do not serve them in place of a model that meets them; "
        "train again with another --seed, or keep models/nano (scores: "
        f"{out / 'evaluation.json'}). The boxes as the model writes them miss detection: "
        "precision@IoU0.5 0.500 < 0.6 (by 0.100), as for every nano so far "
        "(models/nano/MODEL_CARD.md).")


@pytest.mark.usefixtures("sample_root")
def test_two_rounds_write_a_loadable_checkpoint_with_whole_name_tokens(tmp_path):
    from citrusv.engine import Engine

    rounds = (dict(joint_steps=2, seg_steps=2, lr=1e-3, seg_lr=5e-4),
              dict(joint_steps=1, seg_steps=3, lr=5e-4, seg_lr=5e-4, crop_share=1.0,
                   joint_crop_share=1.0))
    out = tmp_path / "nano"
    stats = train_nano(out, seed=3, data_dir=tmp_path / "data", rounds=rounds,
                       whole_names=True, log=lambda rec: None)
    log = json.loads((out / "training_log.json").read_text())
    assert log == json.loads(json.dumps(stats))
    assert [(r["joint_steps_run"], r["seg_steps_run"]) for r in log["rounds"]] == [(2, 2), (1, 3)]
    assert [r["final"]["segmentation"]["round"] for r in log["rounds"]] == [1, 2]
    # round 2's segmentation stage saw only closer-look crops: 3 steps x 6 images
    assert "crop_images" not in log["rounds"][0]
    assert (log["rounds"][1]["crop_share"], log["rounds"][1]["crop_images"]) == (1.0, 18)
    # and its joint step's 4 images (CT slices, no DRR drawn this time) were crops too
    assert "joint_crop_images" not in log["rounds"][0]
    assert log["rounds"][1]["joint_crop_images"] == 4
    assert log["stopped_early"] is False
    assert log["whole_names"] is True
    # what ran it: the CPU's kernels change the numbers, so the log says which ran
    import torch
    assert log["host"]["torch"] == torch.__version__
    assert log["host"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    # the folder's own words for the server: its example questions and intended use
    assert read_example_prompts(out) == nano_example_prompts()
    assert read_intended_use(out) == NANO_INTENDED_USE
    engine = Engine.load(out)
    tok = engine.processor.tokenizer
    assert tok.tokenize(" right kidney") == [" right kidney"]
    assert tok.tokenize(" spinal cord") == [" spinal cord"]
    assert len(tok.tokenize(" right lung")) == 1 and len(tok.tokenize(" liver")) == 1
    # a closer look gives it the answer its training gave every segmentation question
    assert engine.config.segment_answer.format(label="spinal cord") == \
        segment_answer("spinal cord") == "Sure, the spinal cord is [SEG] spinal cord."
    # it learns masks from CT slices only (its radiographs teach boxes and reports)
    assert engine.config.mask_modalities == ["CT"]
    # what it was taught to find: its ten structures, as the shipped config.json lists them
    assert engine.config.structures == NAMES == Engine.load(NANO).config.structures
    # and its closer looks weigh the crop and the whole slice equally, as the shipped one's
    assert engine.config.closer_look_blend == 0.5 == Engine.load(NANO).config.closer_look_blend
    # and its questions were in English
    assert engine.config.languages == ["en"] == Engine.load(NANO).config.languages


@pytest.mark.usefixtures("sample_root")
def test_continuing_from_a_rounds_checkpoint_gives_the_whole_runs_weights(tmp_path):
    """A recipe round can be run on its own from the model saved after the round before it
    (`citrusv train --init ... --first-round N`) and writes, byte for byte, what the whole run
    writes: how a round added to the recipe can be run from the shipped weights."""
    rounds = (dict(joint_steps=2, seg_steps=1, lr=1e-3, seg_lr=5e-4),
              dict(joint_steps=1, seg_steps=2, lr=5e-4, seg_lr=5e-4, crop_share=0.5))
    data = tmp_path / "data"
    whole = train_nano(tmp_path / "whole", seed=3, data_dir=data, rounds=rounds,
                       log=lambda rec: None)
    train_nano(tmp_path / "round1", seed=3, data_dir=data, rounds=rounds[:1],
               log=lambda rec: None)
    # as a model saved before config.json had segment_answer (T2), mask_modalities (T2c),
    # structures, closer_look_blend and languages (2026-12-06):
    # the run writes them anyway
    config = json.loads((tmp_path / "round1" / "config.json").read_text())
    config.pop("segment_answer")
    config.pop("mask_modalities")
    config.pop("structures")
    config.pop("closer_look_blend")
    config.pop("languages")
    (tmp_path / "round1" / "config.json").write_text(json.dumps(config, indent=2))
    cont = train_nano(tmp_path / "cont", seed=3, data_dir=data, rounds=rounds,
                      init_from=tmp_path / "round1", first_round=2, log=lambda rec: None)
    weights = "model-00001-of-00001.safetensors"
    for name in (weights, "config.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cont" / name).read_bytes()
    # its log lists both rounds: the first copied from round1's log, the second as run
    assert cont["first_round"] == 2 and cont["init_from"] == str(tmp_path / "round1")
    def losses(stats):
        return [{stage: {k: v for k, v in rec.items() if k != "elapsed_s"}
                 for stage, rec in r["final"].items()} for r in stats["rounds"]]

    assert losses(cont) == losses(whole)
    with pytest.raises(ValueError, match="give init_from"):
        train_nano(tmp_path / "x", seed=3, data_dir=data, rounds=rounds, first_round=2)


def test_training_host_names_the_kernel_pins_that_were_set(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    host = training_host()
    assert host["kernel_pins"] == {"MKL_CBWR": "AVX2"}
    assert set(host["isa_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert any("Math Kernel Library" in line for line in host["libraries"])


def test_recipe_run_is_told_whether_this_machine_made_the_shipped_nano(tmp_path):
    """`citrusv train` says up front whether its weights can come out as shipped: one-thread
    runs repeat only on the kind of machine that made them (MODEL_CARD.md, run T2i)."""
    here = training_host()
    assert host_differences(here, here) == []
    (tmp_path / "training_log.json").write_text(json.dumps({"host": here}))
    assert recipe_host_note(here, tmp_path).startswith("This machine is of the kind that made")

    # another model of the same maker and instruction set is the same kind: T2's command wrote
    # T2's weights byte for byte on AMD EPYC 23/49 and 25/1 (MODEL_CARD.md, "Recipe")
    assert host_differences({**here, "cpu_family_model": "0/0"}, here) == []
    assert [cpu_vendor({"cpu": c}) for c in ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+",
                                             "", "Other CPU")] == ["AMD", "Intel", "?",
                                                                  "Other CPU"]

    other = {**here, "cpu": "Other CPU", "torch": "0.0"}  # a kind no machine is
    assert host_differences(here, other) == [
        f"cpu_vendor {cpu_vendor(here)} (there: Other CPU)",
        f"torch {here['torch']} (there: 0.0)"]
    (tmp_path / "training_log.json").write_text(json.dumps({"host": other}))
    note = recipe_host_note(here, tmp_path)
    assert note.startswith("This machine is not of the kind that made models/nano (")
    assert "cpu_vendor" in note and "citrusv eval --model OUT" in note

    # the shipped folder's own record is read when no folder is named
    shipped = json.loads((NANO / "training_log.json").read_text())["host"]
    same_kind = host_differences(here, shipped) == []
    assert ("is of the kind" in recipe_host_note(here)) == same_kind
    assert recipe_host_note(here, tmp_path / "missing") is None
