"""`citrusv_finetune`: corrections -> the engine's segmentation-stage recipe -> model_dir/versions/N.

Runs in MONAI Label's training subprocess. It loads its own engine from the version being
served, computes the frozen MLLM's [SEG] state for every corrected slice, then drops that MLLM
(the server's copy keeps serving), so the steps hold SAM2 and the projector only. Where the GPU
lacks room for a second MLLM next to the server's, the states are computed on the CPU instead
(`--conf train_mllm_device auto|cuda|cpu`, see `choose_mllm_device`). It measures Dice on
held-out corrected slices, trains (projector + SAM2, MLLM frozen:
2 Dice + 1 BCE + a small recall term, see `citrusv.training.mask_losses`), measures again, and
publishes a checkpoint of what it trained: projector + SAM2 in the released layout, the frozen
MLLM read from `model_dir` when the version loads (`citrusv.checkpoint`, "saved on top of a
base"), so a version of Citrus-V-8B costs SAM2's size on disk, not the whole model's. It is
written to a temporary folder inside `versions/`, then renamed
to the next number in one step (not when the version it started from was withdrawn
meanwhile, see `lib/model.py`). The server notices the
new folder on its next request. A crash or kill leaves only a temporary folder, removed by the
next run, and the serving model is never touched. `versions/last_run.json` records the outcome.
With `--conf keep_versions N` (default 0: keep all), a published run then prunes the weights of
the versions beyond the N newest that are not withdrawn (`lib/model.py`, `prune_versions`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from ..corrections import Sample, collect, split
from ..errors import ConfError
from ..model import LAST_RUN, TRAIN_STATS, SharedModel, prune_versions, write_json_atomic

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


MLLM_DEVICES = ("auto", "cuda", "cpu")
GIB = 1024**3
# what computing the states needs on the GPU beyond the weights (activations of one slice's
# answer, CUDA context, allocator slack); a guess, not measured on a GPU here
STATES_HEADROOM_BYTES = 2 * GIB


def choose_mllm_device(choice: str, train_device: str, weight_bytes: int,
                       free_gpu_bytes: int | None) -> tuple[str, str]:
    """Where the training run's own copy of the model computes the [SEG] states: (device, why).

    `choice` is `--conf train_mllm_device`: cuda or cpu as asked; auto puts it on the GPU when
    the GPU has the checkpoint's weights (`weight_bytes`) x 1.2 + 2 GiB free (the server's copy
    is already there), else on the CPU (slower, but no out-of-memory)."""
    if not str(train_device).startswith("cuda"):
        return str(train_device), f"training runs on {train_device}"
    if choice in ("cuda", "cpu"):
        return (str(train_device) if choice == "cuda" else "cpu"), f"--conf train_mllm_device {choice}"
    need = int(weight_bytes * 1.2) + STATES_HEADROOM_BYTES
    if free_gpu_bytes is not None and free_gpu_bytes >= need:
        return str(train_device), (f"{free_gpu_bytes / GIB:.1f} GiB free on the GPU, a second copy "
                                   f"needs about {need / GIB:.1f} GiB")
    free = "unknown" if free_gpu_bytes is None else f"{free_gpu_bytes / GIB:.1f} GiB"
    return "cpu", (f"{free} free on the GPU, a second copy needs about {need / GIB:.1f} GiB: the "
                   "[SEG] states are computed on the CPU (slower); SAM2 trains on the GPU")


def failure_sentence(error: BaseException, opts: dict) -> str:
    """What `last_run` says about a failed run: the exception as raised, led by what to do
    where the GPU ran out of memory."""
    import torch

    raw = f"{type(error).__name__}: {error}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (f"The GPU ran out of memory in the fine-tune ({opts.get('batch_images')} slices "
                "per step): send a smaller batch_images or free GPU memory; the corrections "
                "are kept. For scale, on an H200 the 8B's steps at 2 slices per step took "
                "21.9 GiB and serving the 8B 17.0 GiB. " + raw)
    return raw


def parse_mllm_device(value: str | None) -> str:
    value = (value or "auto").strip().lower()
    if value not in MLLM_DEVICES:
        raise ConfError(f"--conf train_mllm_device {value} is not one of auto, cuda, cpu.")
    return value


# MONAI Label's own keys in a training request (its clients and AsyncTask add them)
GENERIC_KEYS = {"model", "gpus", "multi_gpu", "dataset", "name", "bundle_path", "local_rank"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _whole(low: int, high: int | None = None):
    def check(name: str, v: Any) -> int:
        digits = isinstance(v, str) and v.strip().lstrip("-").isdigit()
        if isinstance(v, bool) or not (isinstance(v, int) or digits):
            raise ValueError(f"{name} must be a whole number, not {v!r}.")
        v = int(v)
        if v < low or (high is not None and v > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ValueError(f"{name} must be a whole number {span}, not {v}.")
        return v
    return check


def _number(low: float, high: float, low_open: bool = False):
    def check(name: str, v: Any) -> float:
        try:
            x = float(v) if not isinstance(v, bool) else float("nan")
        except (TypeError, ValueError):
            x = float("nan")
        if not (x > low if low_open else x >= low) or not x <= high:  # NaN fails both
            above = "above" if low_open else "at least"
            raise ValueError(f"{name} must be a number {above} {low:g} and at most {high:g}, "
                             f"not {v!r}.")
        return x
    return check


def _val_every(name: str, v: Any) -> int:
    n = _whole(0)(name, v)
    if n == 1:
        raise ValueError(f"{name} 1 would hold out every corrected slice; use 0 (no held-out "
                         "check) or N >= 2 (every Nth slice of a structure is held out).")
    return n


def _flag(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).strip().lower() in TRUE + FALSE:
        return str(v).strip().lower() in TRUE
    raise ValueError(f"{name} must be true or false, not {v!r}.")


OPTION_CHECKS = {
    "steps": _whole(1, 100_000),
    "learning_rate": _number(0.0, 1.0, low_open=True),
    "batch_images": _whole(1, 64),
    "val_every": _val_every,
    "negatives_per_positive": _number(0.0, 10.0),
    "max_per_structure": _whole(1),
    "seed": _whole(0, 2**31 - 1),
    "publish_if_worse": _flag,
}


def check_options(options: dict | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The run's options: `defaults` updated by the request's, each checked (ValueError with
    one sentence naming the option for an unknown name or a bad value). MONAI Label's own
    request keys (`model`, `gpus`, ...) are passed over."""
    if options is not None and not isinstance(options, dict):
        raise ValueError("The training options must be a JSON object, e.g. {\"steps\": 200}.")
    unknown = sorted(k for k in (options or {}) if k not in defaults and k not in GENERIC_KEYS)
    if unknown:
        raise ValueError(f"Unknown training option {', '.join(map(repr, unknown))}; the options "
                         f"are {', '.join(defaults)}.")
    opts = dict(defaults)
    for k, v in (options or {}).items():
        if k in defaults:
            opts[k] = OPTION_CHECKS[k](k, v) if k in OPTION_CHECKS else v
    return opts


def parse_keep_versions(value: str | None) -> int:
    """`--conf keep_versions N`: after a published run, keep the weights of the N newest
    versions that are not withdrawn; 0 (the default) keeps every version."""
    try:
        keep = int(str(value).strip()) if value not in (None, "") else 0
    except ValueError:
        keep = -1
    if keep < 0:
        raise ConfError(f"--conf keep_versions {value} is not a whole number >= 0 (0 keeps "
                        "every fine-tuned version; N keeps the N newest).")
    return keep


class CitrusVFinetune(TrainTask):
    def __init__(self, model: SharedModel, steps: int = 200, learning_rate: float = 3e-4,
                 batch_images: int = 4, val_every: int = 5, negatives_per_positive: float = 0.5,
                 max_per_structure: int = 64, mllm_device: str = "auto",
                 keep_versions: int = 0) -> None:
        super().__init__("Fine-tune Citrus-V's projector + SAM2 on corrected labels (final)")
        self.model = model
        self.mllm_device = parse_mllm_device(mllm_device)
        self.keep_versions = int(keep_versions)
        self.defaults = {
            "steps": steps,
            "learning_rate": learning_rate,
            "batch_images": batch_images,
            "val_every": val_every,
            "negatives_per_positive": negatives_per_positive,
            "max_per_structure": max_per_structure,
            "seed": 0,
            "publish_if_worse": False,
        }

    def config(self) -> dict[str, Any]:
        return dict(self.defaults)

    def stats(self) -> dict[str, Any]:
        last = self.model.last_run()
        if last.get("status") == "running" and not _alive(last.get("pid")):
            last = {**last, "status": "killed"}
        versions = self.model.versions_info()
        return {"versions": versions, "last_run": last,
                "train_loss": last.get("train_loss"), "val_dice": last.get("val_dice")}

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        # the POST was checked already (main.py); this is the same check, for direct callers
        opts = check_options({k: request[k] for k in self.defaults if k in request},
                             self.defaults)
        versions_dir = self.model.versions_dir
        versions_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp(versions_dir)
        record: dict[str, Any] = {"status": "running", "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "options": opts}
        write_json_atomic(versions_dir / LAST_RUN, record)
        tmp = versions_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            record.update(self._train(opts, datastore, tmp))
        except Exception as e:
            logger.exception("Citrus-V fine-tuning failed")
            record.update(status="failed", error=failure_sentence(e, opts))
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_json_atomic(versions_dir / LAST_RUN, record)
        return record

    def _train(self, opts: dict, datastore: Datastore, tmp: Path) -> dict[str, Any]:
        from citrusv.training import finetune_segmentation

        samples = collect(datastore, float(opts["negatives_per_positive"]),
                          int(opts["max_per_structure"]), int(opts["seed"]))
        train, val = split(samples, int(opts["val_every"]))
        if not any(s.positive for s in train):
            raise ValueError("No corrected label has any structure in it; save labels with "
                             "PUT /datastore/label?tag=final first.")
        if not self.model.installed():
            raise ValueError(self.model.not_installed_sentence())
        base_version, base_path = self.model.serving()
        mllm_device, why = self._states_device(base_path)
        engine = self.model.load_engine(base_path, device=mllm_device)
        logger.info("Fine-tuning from version %s on %d slices (%d positive), validating on %d; "
                    "[SEG] states on %s (%s), then the MLLM copy is dropped", base_version,
                    len(train), sum(s.positive for s in train), len(val), mllm_device, why)
        t0 = time.time()
        stats = finetune_segmentation(
            engine.model, engine.processor, [_seg_sample(s) for s in train],
            steps=int(opts["steps"]), lr=float(opts["learning_rate"]), seed=int(opts["seed"]),
            batch_images=int(opts["batch_images"]),
            val_samples=[_seg_sample(s) for s in val] or None, log=_log_every(20),
            release_mllm=True, train_device=self.model.device)
        dice_before, dice_after = stats.get("val_dice_before"), stats.get("val_dice_after")
        result: dict[str, Any] = {
            "base_version": base_version,
            "samples": {"train": len(train), "train_positive": sum(s.positive for s in train),
                        "val": len(val), "structures": sorted({s.label for s in samples})},
            "steps": stats.get("steps"),
            "train_loss": stats.get("final_loss"),
            "val_dice_before": dice_before,
            "val_dice": dice_after,
            "train_seconds": round(time.time() - t0, 1),
            "states": {"device": mllm_device, "why": why,
                       "seconds": round(float(stats.get("states_seconds") or 0.0), 1)},
        }
        worse = (dice_before is not None and dice_after is not None
                 and dice_after < dice_before - 0.02)
        if worse and str(opts["publish_if_worse"]).lower() not in ("true", "1", "yes"):
            result.update(status="rejected", reason="validation Dice fell; the serving model is "
                          "unchanged (pass publish_if_worse=true to publish anyway)")
            return result
        if self.model.withdrawn(base_version) is not None:
            result.update(status="rejected", reason=f"version {base_version}, which this run "
                          "started from, was withdrawn during the run; the serving model is "
                          "unchanged (train again to start from the version now served)")
            return result
        _save(engine, tmp, self.model.model_dir)
        number = self.model.next_version()
        write_json_atomic(tmp / TRAIN_STATS, {**result, "version": str(number),
                                              "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        final = self.model.versions_dir / str(number)
        os.rename(tmp, final)  # atomic: the folder appears complete or not at all
        result.update(status="done", version=str(number))
        logger.info("Published Citrus-V version %s: loss %s, val Dice %s -> %s", number,
                    result["train_loss"], dice_before, dice_after)
        if self.keep_versions:
            try:  # the run is published either way; a failed prune only leaves more on disk
                result["pruned"] = prune_versions(self.model.model_dir, self.keep_versions,
                                                  f"--conf keep_versions {self.keep_versions}")
            except Exception as e:
                logger.exception("Pruning old Citrus-V versions failed")
                result["prune_error"] = f"{type(e).__name__}: {e}"
        return result

    def _states_device(self, base_path: Path) -> tuple[str, str]:
        """`choose_mllm_device` for this run, with the GPU's free memory now."""
        import torch

        from citrusv.checkpoint import count_parameters
        from citrusv.engine import resolve_dtype

        device = self.model.device
        free = None
        if device.startswith("cuda") and self.mllm_device == "auto" and torch.cuda.is_available():
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        itemsize = torch.empty((), dtype=resolve_dtype(self.model.dtype, device)).element_size()
        weight_bytes = count_parameters(base_path) * itemsize if free is not None else 0
        return choose_mllm_device(self.mllm_device, device, weight_bytes, free)

    @staticmethod
    def _remove_stale_temp(versions_dir: Path) -> None:
        for p in versions_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def _seg_sample(s: Sample) -> dict:
    return {"image": s.image, "prompt": s.prompt, "mask": s.mask, "window": s.window,
            "label": s.label}


def _log_every(n: int):
    def log(record: dict) -> None:
        if record.get("step", 0) % n == 0 or record.get("step") == 1:
            logger.info("train %s", {k: round(v, 4) if isinstance(v, float) else v
                                     for k, v in record.items()})
    return log


def _save(engine, path: Path, base: Path) -> None:
    """Projector + SAM2 in the released layout on top of `base` (the MLLM stayed frozen), so
    `Engine.load` serves it unchanged."""
    engine.save_pretrained(path, base=base)


def _alive(pid) -> bool:
    """Is the training process still there (a killed, unreaped zombie counts as gone)?"""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (TypeError, ValueError, psutil.Error):
        return False
