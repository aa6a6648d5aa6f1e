"""Citrus-V config: four infer tasks, the fine-tuning trainer and the uncertainty strategy.

All of them share one `SharedModel` (one engine per process, loaded on first use) and one
study cache. Settings come from `--conf`: `model_dir`, `device` (cuda|cpu), `dtype`
(bf16|fp32), `ask_again` (true|false: whether the engine asks the model again about what an
answer leaves out; docs/api.md, "Asked again"), `train_mllm_device` (auto|cuda|cpu: where a
training run computes its [SEG] states), `keep_versions` (N: a published run prunes the
weights of older versions; 0 keeps all), `study_cache`, `closer_look_margin`, the limits
`max_slice_pixels`, `max_voxels`, and `pacs_cache_gb` (main.py's PACS datastore). All are
checked at start-up, together (`read_settings`): the server stops with one sentence per bad
setting.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from .. import images
from ..datastore import pacs_cache_bytes
from ..errors import ConfError
from ..images import StudyCache
from ..infers.citrusv import CitrusVInfer
from ..model import SharedModel, shared_model
from ..strategies.citrusv_uncertainty import CitrusVUncertainty
from ..trainers.citrusv_finetune import CitrusVFinetune, parse_keep_versions, parse_mllm_device

logger = logging.getLogger(__name__)

TASKS = {
    "segment": "Segment what the prompt names on one slice (or a slice range / all slices)",
    "detect": "Find what the prompt names: boxes on the slice",
    "report": "Answer or write a report with reasoning steps that cite boxes",
    "closer_look": "Crop around a region, look again and refine its mask",
}


def _device(value: str | None) -> str:
    import torch

    from citrusv.engine import check_device
    from citrusv.errors import InputError

    if value:
        try:
            check_device(value, what="--conf device")  # say so now, not at the first question
        except InputError as e:
            raise ConfError(str(e)) from None
        return value
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(value: str | None) -> str | None:
    if not value:
        return None  # engine default: bf16 on GPU, fp32 on CPU
    import torch

    from citrusv.engine import resolve_dtype
    from citrusv.errors import InputError

    try:  # say so now, not at the first question
        chosen = resolve_dtype(value, "cpu", what="--conf dtype")
    except InputError as e:
        raise ConfError(str(e)) from None
    return "bf16" if chosen == torch.bfloat16 else "fp32"  # as /info/ shows it


def _ask_again(value: str | None) -> bool:
    """`--conf ask_again true|false` (default true)."""
    if value is None or str(value).strip() == "":
        return True
    word = str(value).strip().lower()
    if word not in ("true", "false"):
        raise ConfError(f"--conf ask_again must be true or false, not '{value}'.")
    return word == "true"


def _whole(name: str, low: int, what: str):
    """A `--conf` setting that is a whole number >= `low` (`what`: what it sets, its default)."""
    def parse(value: str | None, default: int) -> int:
        if value is None or str(value).strip() == "":
            return default
        text = str(value).strip()
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise ConfError(f"--conf {name} {value} is not a whole number >= {low} ({what}; "
                            f"default {default}).")
        return int(text)
    return parse


def _margin(value: str | None, default: float = 0.15) -> float:
    if value is None or str(value).strip() == "":
        return default
    try:
        margin = float(value)
    except ValueError:
        margin = float("nan")
    if not 0 <= margin <= 2:  # also NaN
        raise ConfError(f"--conf closer_look_margin {value} is not a number from 0 to 2 (what "
                        "a closer look adds on each side of the region, as a share of its "
                        f"larger side; default {default}).")
    return margin


# every `--conf` key this app reads (MONAI Label's own: server_mode)
SETTINGS = ("model_dir", "device", "dtype", "ask_again", "train_mllm_device", "keep_versions",
            "study_cache", "closer_look_margin", "max_slice_pixels", "max_voxels",
            "pacs_cache_gb", "server_mode")


def read_settings(conf: dict[str, str]) -> dict[str, Any]:
    """The Citrus-V settings from `--conf`, each checked, all before the server starts: one
    ConfError with a sentence for each bad value (MONAI Label would have stopped at the first,
    or for the int()/float() ones gone on to a traceback), and for a key that reads as a
    setting misspelt ("keep_version": `difflib` ratio >= 0.75), which would otherwise be
    silently unused. Other keys are left to MONAI Label."""
    said: list[str] = []

    def read(parse, *args):
        try:
            return parse(*args)
        except ConfError as e:
            said.append(str(e))
            return None

    for key in conf:
        near = difflib.get_close_matches(key, SETTINGS, n=1, cutoff=0.75)
        if key not in SETTINGS and near:
            said.append(f"--conf {key} is not a setting; did you mean {near[0]}?")
    found = {
        "device": read(_device, conf.get("device")),
        "dtype": read(_dtype, conf.get("dtype")),
        "ask_again": read(_ask_again, conf.get("ask_again")),
        "train_mllm_device": read(parse_mllm_device, conf.get("train_mllm_device")),
        "keep_versions": read(parse_keep_versions, conf.get("keep_versions")),
        "study_cache": read(_whole("study_cache", 0, "how many studies a server keeps read "
                                   "for the next question"), conf.get("study_cache"), 2),
        "closer_look_margin": read(_margin, conf.get("closer_look_margin")),
        "max_slice_pixels": read(_whole("max_slice_pixels", 1, "the most pixels a slice may "
                                        "have"), conf.get("max_slice_pixels"),
                                 images.MAX_SLICE_PIXELS),
        "max_voxels": read(_whole("max_voxels", 1, "the most voxels an image may have"),
                           conf.get("max_voxels"), images.MAX_VOXELS),
        "pacs_cache_gb": read(pacs_cache_bytes, conf.get("pacs_cache_gb")),
    }
    if said:
        raise ConfError(" ".join(said))
    return found


class CitrusV(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        settings = read_settings(conf)
        self.model: SharedModel = shared_model(model_dir, settings["device"], settings["dtype"],
                                               settings["ask_again"])
        images.MAX_SLICE_PIXELS = settings["max_slice_pixels"]
        images.MAX_VOXELS = settings["max_voxels"]
        self.studies = StudyCache(size=settings["study_cache"])
        self.margin = settings["closer_look_margin"]
        self.mllm_device = settings["train_mllm_device"]
        self.keep_versions = settings["keep_versions"]
        logger.info("Citrus-V model_dir=%s device=%s dtype=%s ask_again=%s status=%s",
                    self.model.model_dir, self.model.device, self.model.dtype or "auto",
                    self.model.ask_again, self.model.status())

    def infer(self) -> dict[str, InferTask]:
        return {
            f"citrusv_{task}": CitrusVInfer(task, self.model, self.studies, description,
                                            closer_look_margin=self.margin)
            for task, description in TASKS.items()
        }

    def trainer(self) -> dict[str, TrainTask]:
        return {"citrusv_finetune": CitrusVFinetune(self.model, mllm_device=self.mllm_device,
                                                    keep_versions=self.keep_versions)}

    def strategy(self) -> dict[str, Strategy]:
        return {"citrusv_uncertainty": CitrusVUncertainty(self.model, self.studies)}
