"""CitrusVConfig: the checkpoint's config.json as data (Qwen2.5-VL fields + the Citrus-V extras)."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Qwen2_5_VLConfig

from .errors import CheckpointError

# Keys of config.json that belong to Citrus-V rather than to Qwen2.5-VL.
CITRUS_KEYS = (
    "seg_token_idx", "grounding_encoder_config", "use_res_seg_projector", "image_size",
    "seg_hidden_offset", "min_pixels", "max_pixels", "out_dim", "system_prompt",
    "task_system_prompts", "name", "version", "box_source", "segment_answer", "mask_modalities",
    "structures", "closer_look_blend", "languages",
)
# Where the boxes of an answer come from: "text", the numbers the model wrote (Citrus-V as
# trained), or "mask", each written box replaced by the box of the model's own mask of that
# label (`Engine` grounding; the written box is kept beside it).
BOX_SOURCES = ("text", "mask")


@dataclass
class CitrusVConfig:
    """Data only: how to build the torch module and how to feed it."""

    mllm: Qwen2_5_VLConfig
    seg_token_idx: int
    grounding_encoder_config: str | dict = "sam2_hiera_l.yaml"
    use_res_seg_projector: bool = False
    image_size: int = 1024
    seg_hidden_offset: int = 0  # 0: hidden state AT [SEG] (Citrus-V); -1: the one before (LISA)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    out_dim: int = 256
    system_prompt: str = "You are a helpful assistant."
    task_system_prompts: dict[str, str] = field(default_factory=dict)
    name: str = "citrusv"
    version: str = ""
    box_source: str = "text"
    # How the model was trained to answer a segmentation question, "{label}" standing for the
    # structure (nano: "Sure, the {label} is [SEG] {label}."). Where set, a closer look at a
    # named structure gives the model this answer rather than letting it write one: the
    # structure is already named, and a model that writes no [SEG] for a crop gives no mask.
    # Empty (the released Citrus-V): the model writes its own answer.
    segment_answer: str = ""
    # The kinds of image (DICOM Modality codes) the model was taught to segment (nano: CT;
    # its radiographs taught boxes and reports only). On another kind an empty mask says
    # nothing of the structure (`citrusv.engine.untaught_modality`). Empty (the released
    # Citrus-V, which segments X-rays too): any.
    mask_modalities: list[str] = field(default_factory=list)
    # What the model was taught to find, by name (nano: its ten structures, and no findings).
    # A question naming something else ("Segment the pancreas.", "Is there an effusion?",
    # "Is this normal?") gets a sentence that the model cannot answer it
    # (`citrusv.parsing.untaught_warning`), and the engine asks nothing again about it.
    # Empty (the released Citrus-V, taught many structures and findings): not listed.
    structures: list[str] = field(default_factory=list)
    # A closer look's mask where the crop and the whole slice both see it: the crop's
    # probability weighted by this, the whole slice's (the model asked for the structure on
    # it) by the rest (`Engine.closer_look`). 1.0 (the released Citrus-V): the crop alone.
    # nano: 0.5, chosen on training slices; its crop alone loses Dice (MODEL_CARD.md).
    closer_look_blend: float = 1.0
    # The languages the model was taught questions in, as ISO 639-1 codes (nano: ["en"]). A
    # question that reads as another (`citrusv.parsing.question_language`: "Segmentez le
    # foie.") gets a sentence that the answer may not be about what was asked, and is not
    # read for what it asks (no misspelt word read, nothing asked again). Empty (the released
    # Citrus-V, taught Chinese and English questions): not listed.
    languages: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        blend = self.closer_look_blend
        if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0 < blend <= 1:
            raise CheckpointError(f"config.json has closer_look_blend {blend!r}; use a number "
                                  "above 0 and at most 1 (1: the crop's view alone).")
        self.closer_look_blend = float(blend)
        if (not isinstance(self.languages, list)
                or not all(isinstance(x, str) and re.fullmatch(r"\s*[A-Za-z]{2}\s*", x)
                           for x in self.languages)):
            raise CheckpointError(f"config.json has languages {self.languages!r}; use a list "
                                  "of ISO 639-1 codes such as [\"en\"], or [].")
        self.languages = [x.strip().lower() for x in self.languages]
        if (not isinstance(self.structures, list)
                or not all(isinstance(m, str) and m.strip() for m in self.structures)):
            raise CheckpointError(f"config.json has structures {self.structures!r}; use a "
                                  "list of names such as [\"liver\", \"spleen\"], or [].")
        self.structures = [" ".join(m.split()).lower() for m in self.structures]
        if (not isinstance(self.mask_modalities, list)
                or not all(isinstance(m, str) and m.strip() for m in self.mask_modalities)):
            raise CheckpointError(f"config.json has mask_modalities {self.mask_modalities!r}; "
                                  "use a list of DICOM Modality codes such as [\"CT\"], or [].")
        self.mask_modalities = [m.strip().upper() for m in self.mask_modalities]
        if self.box_source not in BOX_SOURCES:
            raise CheckpointError(f"config.json has box_source '{self.box_source}'; use "
                                  f"{' or '.join(repr(b) for b in BOX_SOURCES)}.")
        if self.segment_answer:
            try:
                filled = self.segment_answer.format(label="liver")
            except (KeyError, IndexError, ValueError):
                filled = ""
            if "{label}" not in self.segment_answer or "[SEG]" not in filled:
                raise CheckpointError(f"config.json has segment_answer "
                                      f"'{self.segment_answer}'; it must hold [SEG] and {{label}} "
                                      "(and no other {...}), or be empty.")

    @property
    def hidden_size(self) -> int:
        return int(self.mllm.text_config.hidden_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CitrusVConfig:
        data = copy.deepcopy(data)
        if data.get("model_type") not in (None, "citrus_v"):
            raise CheckpointError(f"config.json has model_type '{data.get('model_type')}', "
                                  "expected 'citrus_v'.")
        if "seg_token_idx" not in data:
            raise CheckpointError("config.json has no seg_token_idx; it is not a Citrus-V model.")
        extras = {k: data.pop(k) for k in CITRUS_KEYS if k in data}
        for k in ("model_type", "architectures", "auto_map"):
            data.pop(k, None)
        mllm = Qwen2_5_VLConfig(**data)
        return cls(mllm=mllm, **extras)

    def to_dict(self) -> dict[str, Any]:
        data = self.mllm.to_dict()
        data["model_type"] = "citrus_v"
        data["architectures"] = ["CitrusV"]
        for k in CITRUS_KEYS:
            data[k] = copy.deepcopy(getattr(self, k))
        return data

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CitrusVConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no config.json; point at a Citrus-V checkpoint dir.")
        return cls.from_dict(json.loads(file.read_text()))

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
