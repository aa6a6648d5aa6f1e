"""Citrus-V config: four infer tasks, the fine-tuning trainer and the uncertainty strategy.

All of them share one `SharedModel` (one engine per process, loaded on first use) and one
study cache. Settings come from `--conf`: `model_dir`, `device` (cuda|cpu), `dtype`
(bf16|fp32), `ask_again` (true|false: whether the engine asks the model again about what an
answer leaves out; docs/api.md, "Asked again"), `train_mllm_device` (auto|cuda|cpu: where a training run computes its [SEG]
states), `keep_versions` (N: a published run prunes the weights of older versions; 0 keeps
all), and the limits `max_slice_pixels`, `max_voxels`.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from .. import images
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


class CitrusV(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.model: SharedModel = shared_model(model_dir, _device(conf.get("device")),
                                               _dtype(conf.get("dtype")),
                                               _ask_again(conf.get("ask_again")))
        images.MAX_SLICE_PIXELS = int(conf.get("max_slice_pixels", images.MAX_SLICE_PIXELS))
        images.MAX_VOXELS = int(conf.get("max_voxels", images.MAX_VOXELS))
        self.studies = StudyCache(size=int(conf.get("study_cache", 2)))
        self.margin = float(conf.get("closer_look_margin", 0.15))
        self.mllm_device = parse_mllm_device(conf.get("train_mllm_device"))
        self.keep_versions = parse_keep_versions(conf.get("keep_versions"))
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
