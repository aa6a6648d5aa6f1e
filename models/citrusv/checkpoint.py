"""Load and save the released Citrus-V layout: config.json + safetensors shards + index +
tokenizer/processor files. Also build one from parts (Qwen2.5-VL dir + SAM2 .pt + projector).

A checkpoint may also be saved *on top of a base*: weights under some prefixes (the MLLM,
`mllm.`, which the segmentation-stage fine-tune keeps frozen) are not written again but read
from the full checkpoint named in `citrusv_base.json`. For Citrus-V-8B that is about 1 GB per
fine-tuned version (SAM2 + projector, kept fp32) instead of about 17 GB (from the parameter
counts). The base is fingerprinted (each
shard's size and a hash of its safetensors header), so a base that was replaced or re-saved
makes loading fail with a sentence, never a silent mix of weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoProcessor, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.utils import logging as hf_logging
from transformers.modeling_utils import no_init_weights

from .config import CitrusVConfig
from .errors import CheckpointError
from .modeling import CitrusV

INDEX = "model.safetensors.index.json"
BASE_FILE = "citrusv_base.json"
EXTRA_TOKENS = ["[SEG]", "<bbox>", "</bbox>"]
# optional file of a model dir: {"segment": [questions], "detect": [...], "report": [...]}, the
# questions the model is known to answer (a small model knows only its training phrasings)
EXAMPLES_FILE = "example_prompts.json"
# optional file of a model dir: one plain sentence on what the model may be used for (the model
# card's or the department's), shown to the radiologist with the model's name and answers
INTENDED_USE_FILE = "intended_use.txt"
MAX_INTENDED_USE = 300  # characters


def read_example_prompts(path: str | Path) -> dict[str, list[str]]:
    """A model dir's example questions per task ({} when it names none). A file that is not
    a JSON object of lists of non-empty strings raises CheckpointError with a sentence."""
    file = Path(path) / EXAMPLES_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file} is not readable JSON ({e}).") from e
    if not (isinstance(data, dict) and all(
            isinstance(v, list) and all(isinstance(q, str) and q.strip() for q in v)
            for v in data.values())):
        raise CheckpointError(f"{file} must map each task to a list of questions, e.g. "
                              '{"segment": ["Segment the liver."]}.')
    return {str(task): [q.strip() for q in questions] for task, questions in data.items()}


def read_intended_use(path: str | Path) -> str | None:
    """A model dir's intended-use statement, its lines joined by spaces (None when it has none).
    An unreadable or empty file, or one over MAX_INTENDED_USE characters, raises CheckpointError
    with a sentence."""
    file = Path(path) / INTENDED_USE_FILE
    if not file.is_file():
        return None
    try:
        text = " ".join(file.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not readable UTF-8 text ({e}).") from e
    if not text or len(text) > MAX_INTENDED_USE:
        raise CheckpointError(f"{file} must hold one sentence of 1 to {MAX_INTENDED_USE} "
                              "characters, e.g. \"Research use only; not for diagnosis.\"")
    return text


def qwen_processor(tokenizer, min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor for our own tokenizer, with the model's min/max pixels fixed."""
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, min_pixels=min_pixels,
                                            max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(size=size))


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config: CitrusVConfig, dtype: torch.dtype = torch.float32,
                random_init: bool = True) -> CitrusV:
    """Construct the module; without random init when weights are about to be loaded. `dtype`
    is the MLLM's: SAM2 and the projector stay fp32 (see `CitrusV.keep_sam2_fp32`)."""
    with _default_dtype(dtype):
        if random_init:
            model = CitrusV(config)
        else:
            with no_init_weights():
                model = CitrusV(config)
    return model.to(dtype).keep_sam2_fp32()


def shard_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has no {INDEX} or model.safetensors; "
                          "point at a Citrus-V checkpoint directory.")


def count_parameters(path: str | Path, prefix: str = "") -> int:
    """Number of stored values under `prefix` (e.g. "mllm.") in a checkpoint, read from the
    safetensors headers alone (no weights loaded); a checkpoint saved on top of a base counts
    its base's."""
    total = 0
    for file in shard_files(full_checkpoint(path)):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items()
                     if k != "__metadata__" and k.startswith(prefix))
    return total


def _header_hash(file: Path) -> str:
    """sha256 of a safetensors file's header (tensor names, dtypes, shapes, offsets)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(n)).hexdigest()


def base_fingerprint(path: Path) -> dict[str, list]:
    return {f.name: [f.stat().st_size, _header_hash(f)] for f in shard_files(path)}


def full_checkpoint(path: str | Path) -> Path:
    """The checkpoint that holds all weights: `path`, or the base it was saved on top of."""
    path = Path(path)
    ref = path / BASE_FILE
    if not ref.is_file():
        return path
    return (path / json.loads(ref.read_text())["path"]).resolve()


def _base_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights a checkpoint saved on top of a base takes from that base (checked)."""
    try:
        ref = json.loads((path / BASE_FILE).read_text())
        base, prefixes = (path / ref["path"]).resolve(), tuple(ref["prefixes"])
        fingerprint = ref["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / BASE_FILE} cannot be read ({e}); this checkpoint needs "
                              "it to find its base weights.") from e
    if not base.is_dir():
        raise CheckpointError(f"{path} was saved on top of the checkpoint in {base}, which is "
                              "not there any more; put it back, or remove this checkpoint.")
    try:
        found = base_fingerprint(base)
    except CheckpointError as e:
        raise CheckpointError(f"{path} was saved on top of {base}, which holds no weights "
                              f"now: {e}") from e
    if found != fingerprint:
        raise CheckpointError(f"{path} was saved on top of the checkpoint in {base}, but that "
                              "checkpoint's weight files changed since (other shards or tensors); "
                              "its frozen weights would not match. Restore the original base, or "
                              "remove this checkpoint.")
    state: dict[str, torch.Tensor] = {}
    for file in shard_files(base):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    state[key] = f.get_tensor(key)
    return state


def check_keys(expected: set[str], found: set[str], tied: set[str] = frozenset()) -> None:
    """Raise naming missing and unexpected keys (never a silent random init)."""
    missing = sorted(expected - found - set(tied))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32):
    """-> (model in eval mode on device, processor, config). Local files only."""
    path = Path(path)
    config = CitrusVConfig.from_pretrained(path)
    files = shard_files(path)
    model = build_model(config, dtype, random_init=False)
    state: dict[str, torch.Tensor] = {}
    if (path / BASE_FILE).is_file():
        state.update(_base_weights(path))
    for file in files:
        state.update(load_file(str(file), device="cpu"))
    expected = set(model.state_dict().keys())
    tied = {"mllm.lm_head.weight"} if config.mllm.tie_word_embeddings else set()
    check_keys(expected, set(state), tied)
    model.load_state_dict(state, strict=False)
    if tied:
        model.mllm.tie_weights()
    model.to(device=device, dtype=dtype).keep_sam2_fp32().eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the slow->fast image processor notice
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    # with the slow (numpy) Qwen image processor, the one training renders with: the default
    # fast one gives pixel values up to 2.4e-7 apart, so inference would not see exactly what
    # training saw, nor would a continued training round repeat the whole run. Only the image
    # processor: `use_fast=False` on AutoProcessor also loads the slow tokenizer, which splits
    # text into other ids than the fast one training used.
    processor.image_processor = AutoImageProcessor.from_pretrained(
        str(path), local_files_only=True, use_fast=False)
    return model, processor, config


def save_checkpoint(model: CitrusV, processor, path: str | Path,
                    max_shard_bytes: int = 2 * 1024**3, base: str | Path | None = None,
                    from_base: tuple[str, ...] = ("mllm.",)) -> Path:
    """Write the released layout (sharded safetensors + index), config and processor files.

    With `base` (a checkpoint dir), the weights under `from_base` are not written: loading reads
    them from the full checkpoint behind `base`. The caller vouches that they are unchanged
    (e.g. the MLLM after `training.finetune_segmentation`, which keeps it frozen).
    """
    if base is None and getattr(model, "mllm", None) is None:
        raise CheckpointError("This model's MLLM was released after training (release_mllm); "
                              "save it with base= the checkpoint it was loaded from.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
             if base is None or not k.startswith(tuple(from_base))}
    if model.config.mllm.tie_word_embeddings:
        state.pop("mllm.lm_head.weight", None)
    if base is not None:
        root = full_checkpoint(base).resolve()
        (path / BASE_FILE).write_text(json.dumps({
            "path": os.path.relpath(root, path.resolve()), "prefixes": list(from_base),
            "fingerprint": base_fingerprint(root)}, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                          "weight_map": weight_map}, indent=2))
    model.config.save_pretrained(path)
    processor.save_pretrained(str(path))
    return path


def from_parts(qwen_dir: str | Path, sam2_pt: str | Path | None, projector_file: str | Path | None,
               grounding_encoder_config: str | dict = "sam2_hiera_l.yaml",
               device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Research path: a base Qwen2.5-VL dir + a SAM2 checkpoint (.pt) + projector weights.

    Adds [SEG], <bbox>, </bbox> to the tokenizer if missing (new embedding rows are random:
    such a model needs stage-4 fine-tuning before its masks mean anything).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(qwen_dir), local_files_only=True)
    tok = processor.tokenizer
    missing = [t for t in EXTRA_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    mllm_cfg = Qwen2_5_VLConfig.from_pretrained(str(qwen_dir), local_files_only=True)
    ip = processor.image_processor
    config = CitrusVConfig(
        mllm=mllm_cfg, seg_token_idx=tok.convert_tokens_to_ids("[SEG]"),
        grounding_encoder_config=grounding_encoder_config,
        min_pixels=int(getattr(ip, "min_pixels", None) or ip.size["shortest_edge"]),
        max_pixels=int(getattr(ip, "max_pixels", None) or ip.size["longest_edge"]),
    )
    model = build_model(config, dtype, random_init=True)
    model.mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(qwen_dir), local_files_only=True, dtype=dtype)
    if len(tok) > model.mllm.get_input_embeddings().weight.shape[0]:
        model.mllm.resize_token_embeddings(len(tok))
    config.mllm = model.mllm.config
    if sam2_pt is not None:
        sd = torch.load(str(sam2_pt), map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        check_keys(set(model.sam2.state_dict()), set(sd))
        model.sam2.load_state_dict(sd)
    if projector_file is not None:
        if str(projector_file).endswith(".safetensors"):
            sd = load_file(str(projector_file))
        else:
            sd = torch.load(str(projector_file), map_location="cpu", weights_only=True)
        sd = {k.removeprefix("seg_projector."): v for k, v in sd.items()}
        check_keys(set(model.seg_projector.state_dict()), set(sd))
        model.seg_projector.load_state_dict(sd)
    model.to(device=device, dtype=dtype).keep_sam2_fp32().eval()
    return model, processor, config
