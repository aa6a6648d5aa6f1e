"""Active learning: the unlabelled image (and slice) where Citrus-V is least sure of its mask.

Sureness is the mask score the engine reports (SAM2's predicted mask IoU). A few evenly spaced
slices of each unlabelled image are asked once per model version (cached), and the slice with
the lowest score wins. Without a model, or when no slice yields a scored mask, the pick is
random, and the answer says so.
"""

from __future__ import annotations

import logging
import random
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..errors import ModelNotInstalled, RequestError
from ..images import StudyCache
from ..model import SharedModel
from ..params import parse

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Segment the most prominent organ."


class CitrusVUncertainty(Strategy):
    def __init__(self, model: SharedModel, studies: StudyCache, slices_per_image: int = 3,
                 max_images: int = 8, time_budget_s: float = 120.0) -> None:
        super().__init__("Unlabelled image + slice with the lowest Citrus-V mask score")
        self.model = model
        self.studies = studies
        self.slices_per_image = slices_per_image
        self.max_images = max_images
        self.time_budget_s = time_budget_s
        self._scores: dict[tuple, float | None] = {}

    def info(self) -> dict:
        return {**super().info(), "status": self.model.status()}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return {}
        prompt = str(request.get("prompt") or DEFAULT_PROMPT)
        try:
            engine, version = self.model.engine()
        except ModelNotInstalled as e:
            return self._random(images, f"{e.detail} Picked at random.")

        rng = random.Random(request.get("seed"))
        candidates = images if len(images) <= self.max_images else rng.sample(images, self.max_images)
        best: tuple[float, str, int] | None = None
        deadline = time.monotonic() + float(request.get("time_budget_s", self.time_budget_s))
        for image_id in candidates:
            try:
                study = self.studies.get(datastore.get_image_uri(image_id))
            except RequestError as e:
                logger.warning("Skipping %s: %s", image_id, e.detail)
                continue
            n = 1 if study.is_2d else study.shape[0]
            picks = sorted({round((i + 1) * n / (self.slices_per_image + 1)) for i in
                            range(self.slices_per_image)}) if n > 1 else [0]
            for k in picks:
                if time.monotonic() > deadline:
                    break
                key = (image_id, version, k, prompt)
                if key not in self._scores:
                    self._scores[key] = self._score(engine, study, k, prompt)
                score = self._scores[key]
                if score is not None and (best is None or score < best[0]):
                    best = (score, image_id, k)
        if best is None:
            return self._random(images, "No slice gave a scored mask; picked at random.")
        score, image_id, k = best
        study = self.studies.get(datastore.get_image_uri(image_id))
        return {"id": image_id, "slice": None if study.is_2d else k, "axis": "axial",
                "score": round(score, 4), "uncertainty": round(1.0 - score, 4),
                "prompt": prompt, "model_version": version,
                "reason": f"lowest predicted mask IoU ({score:.3f}) among unlabelled slices"}

    def _score(self, engine, study, k: int, prompt: str) -> float | None:
        try:
            p = parse({"prompt": prompt, "slice": None if study.is_2d else k}, study, "segment")
            result = engine.ask(study.plane(k, 0), prompt, window=p.window, task="segment")
        except Exception:
            logger.exception("Uncertainty pass failed on slice %s", k)
            return None
        scores = [float(m.score) for m in result.masks if m.score is not None]
        return min(scores) if scores else 0.0 if not result.masks else None

    @staticmethod
    def _random(images: list[str], reason: str) -> dict:
        return {"id": random.choice(images), "slice": None, "axis": "axial", "score": None,
                "uncertainty": None, "reason": reason}
