"""Citrus-V training recipe: joint stage, then the segmentation stage.

- Joint stage: MLLM, projector and SAM2 trained together on loss = token CE + 2 Dice + 1 BCE.
- Segmentation stage (Citrus-V stage 4): MLLM frozen; projector + full SAM2 trained on
  2 Dice + 1 BCE, plus a small IoU-head term (so "best of the multimask outputs" picks well)
  and a small area-normalised recall term (so thin structures such as the spinal cord learn).

`finetune_segmentation` runs the segmentation stage on (slice, prompt, mask) samples, for
the MONAI Label trainer; `train_nano` builds `models/nano` from the sample CT from scratch.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2TokenizerFast

from . import imaging
from .checkpoint import (EXAMPLES_FILE, INTENDED_USE_FILE, build_model, load_checkpoint,
                         qwen_processor, save_checkpoint)
from .config import CitrusVConfig
from .imaging import qwen_frame, sam2_input
from .modeling import CitrusV
from .prompting import pixel_inputs, stop_token_ids, text_inputs
from .testing import CITRUS_TOKENS, QWEN_SPECIAL, tiny_sam2_config

NANO_SYSTEM = "You are Citrus-V nano, a radiology assistant."
LOSS_WEIGHTS = {"ce": 1.0, "dice": 2.0, "bce": 1.0, "iou": 0.1, "recall": 0.0}
# Segmentation stage only: weight of the "recall" term (mask_losses). Pixel-mean BCE and soft
# Dice give a thin structure whose logits are all strongly negative almost no gradient (nano's
# spinal cord stayed empty even on training slices); this term is normalised by the
# structure's own area, so it does not vanish with size.
SEG_RECALL_WEIGHT = 0.05
# Environment variables that pin the CPU kernels torch's MKL / oneDNN / ATen dispatch to
# (recorded in training_log.json; none is set by default)
KERNEL_PINS = ("MKL_CBWR", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# what tells one kind of machine from another: the fields of training_host() and the CPU's
# maker (cpu_vendor). Not the CPU's family/model: the recipe wrote T2's weights byte for byte
# on AMD EPYC 23/49 (T2) and 25/1 (T2a), both AVX2 only (docs/nano_training_history.md)
HOST_KIND = ("machine", "cpu_vendor", "isa_flags", "torch", "torch_cpu_capability",
             "libraries", "kernel_pins")
SHIPPED_NANO = Path(__file__).resolve().parents[1] / "nano"
MASK_LOSS_SIZE = 128  # masks are scored at this size during training (SAM2 low-res is 64)


def segmentation_weights(recall_weight: float = SEG_RECALL_WEIGHT) -> dict[str, float]:
    """Loss weights of the segmentation stage: the joint stage's plus the recall term."""
    return {**LOSS_WEIGHTS, "recall": recall_weight}


Log = Callable[[dict], None]


# ----------------------------------------------------------------------------- model parts
def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048,
                    whole_names: Sequence[str] = ()) -> Qwen2TokenizerFast:
    """A small byte-level BPE trained on our corpus, with Qwen chat/vision + Citrus-V tokens.

    Each of `whole_names` (e.g. "right kidney") becomes one token, with its leading space.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in CITRUS_TOKENS])
    tok.add_tokens([AddedToken(" " + n, special=False, normalized=False) for n in whole_names])
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None)


def nano_sam2_config(image_size: int = 256, embed_dim: int = 24, d_model: int = 64) -> dict:
    """SAM2 Hiera shrunk for CPU: 7 blocks from `embed_dim` channels, FPN/decoder `d_model`."""
    cfg = tiny_sam2_config(image_size)
    trunk = cfg["image_encoder"]["trunk"]
    trunk.update(embed_dim=embed_dim, num_heads=1, stages=[1, 2, 3, 1], global_att_blocks=[5],
                 window_spec=[8, 4, 8, 8], window_pos_embed_bkg_spatial_size=[8, 8])
    neck = cfg["image_encoder"]["neck"]
    neck["d_model"] = d_model
    neck["position_encoding"]["num_pos_feats"] = d_model
    neck["backbone_channel_list"] = [embed_dim * 8, embed_dim * 4, embed_dim * 2, embed_dim]
    mem = cfg["memory_attention"]
    mem["d_model"] = d_model
    mem["layer"]["d_model"] = d_model
    for attn in ("self_attention", "cross_attention"):
        mem["layer"][attn]["embedding_dim"] = d_model
    mem["layer"]["cross_attention"]["kv_in_dim"] = 32
    enc = cfg["memory_encoder"]
    enc["out_dim"] = 32
    enc["in_dim"] = d_model
    enc["position_encoding"]["num_pos_feats"] = 32
    enc["mask_downsampler"]["embed_dim"] = d_model
    enc["fuser"]["layer"]["dim"] = d_model
    return cfg


# nano's closer look weighs its crop's view and the whole slice's equally
# (`CitrusVConfig.closer_look_blend`): over 30 training slices (every third, 1-130), Dice of
# the closer looks at nano's own masks 0.907 with the crop alone, 0.951 blended at 0.4 or 0.5,
# 0.938 at 0.6, 0.946 before the look (docs/nano_training_history.md, 2026-12-06)
NANO_CLOSER_LOOK_BLEND = 0.5


def nano_settings() -> dict:
    """What nano's config.json says beside the architecture: the answer a closer look at a
    named structure is given, the kinds of image it segments, what it was taught to find, its
    closer look's blend and the language of its questions (also written into a model
    continued with `init_from`, which may have been saved before these settings)."""
    from .nano_data import NAMES, segment_answer
    return dict(segment_answer=segment_answer("{label}"), mask_modalities=["CT"],
                structures=list(NAMES), closer_look_blend=NANO_CLOSER_LOOK_BLEND,
                languages=["en"])


def nano_config(tokenizer, min_pixels: int, max_pixels: int, image_size: int = 256,
                hidden: int = 192, layers: int = 4, vision_hidden: int = 128,
                vision_depth: int = 3, sam_d_model: int = 64) -> CitrusVConfig:
    ids = tokenizer.convert_tokens_to_ids
    vocab = ((len(tokenizer) + 63) // 64) * 64
    heads = max(1, hidden // 64)
    half = hidden // heads // 2
    rest = (half - half // 4) // 2
    mrope = [half - 2 * rest, rest, rest]
    mllm = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                         rope_theta=10000.0,
                         rope_scaling={"type": "mrope", "mrope_section": mrope},
                         tie_word_embeddings=True, bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_heads=4,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=list(range(1, vision_depth, 2))),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return CitrusVConfig(mllm=mllm, seg_token_idx=ids("[SEG]"),
                         grounding_encoder_config=nano_sam2_config(image_size, d_model=sam_d_model),
                         image_size=image_size, min_pixels=min_pixels, max_pixels=max_pixels,
                         out_dim=sam_d_model, system_prompt=NANO_SYSTEM, name="citrusv-nano",
                         version="1", box_source="mask", **nano_settings())


# ----------------------------------------------------------------------------- inputs
@dataclass
class ImageInputs:
    """One rendered image, ready for both models."""

    pixel_values: torch.Tensor  # (patches, dim) for the Qwen vision tower
    grid: torch.Tensor  # (1, 3) image_grid_thw
    sam: torch.Tensor  # (3, S, S) SAM2 input
    hw: tuple[int, int]


def render(image: np.ndarray, window, processor, config: CitrusVConfig) -> ImageInputs:
    """Scanner values (or RGB) -> the same inputs the engine builds at inference time."""
    rgb = imaging.to_rgb_uint8(np.asarray(image), window)
    vc = config.mllm.vision_config
    factor = int(vc.patch_size) * int(vc.spatial_merge_size)
    frame, _ = qwen_frame(rgb, factor, config.min_pixels, config.max_pixels)
    pix = pixel_inputs(processor.image_processor, frame)
    return ImageInputs(pix["pixel_values"], pix["image_grid_thw"],
                       sam2_input(rgb, int(config.image_size))[0], rgb.shape[:2])


def encode_chat(tokenizer, config: CitrusVConfig, prompt: str, answer: str, grid: torch.Tensor,
                task: str) -> tuple[list[int], int]:
    """Token ids of (chat prompt + answer + <|im_end|>) and where the answer starts."""
    merge = int(config.mllm.vision_config.spatial_merge_size)
    system = config.task_system_prompts.get(task, config.system_prompt)
    prompt_ids = text_inputs(tokenizer, system, prompt, grid, merge)[0].tolist()
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return prompt_ids + answer_ids + [eos], len(prompt_ids)


@dataclass
class ChatSequence:
    """One tokenised chat (prompt + answer); `image` indexes the batch's images."""

    ids: list[int]
    answer_start: int
    image: int  # index into the batch's unique images


def mllm_forward(model: CitrusV, images: list[ImageInputs], seqs: list[ChatSequence],
                 pad_id: int, want_ce: bool = True):
    """Batched teacher-forced pass -> (mean token CE or None, last hidden (B, L, h), ids)."""
    mllm = model.mllm
    core = mllm.model
    device = next(model.parameters()).device
    pv = torch.cat([im.pixel_values for im in images]).to(device, _dtype(model))
    grids = torch.cat([im.grid for im in images]).to(device)
    feats = core.get_image_features(pv, grids)  # list per image
    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s.ids)] = torch.tensor(s.ids)
        attn[i, :len(s.ids)] = 1
        labels[i, s.answer_start:len(s.ids)] = torch.tensor(s.ids[s.answer_start:])
    ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
    emb = core.get_input_embeddings()(ids)
    img_emb = torch.cat([feats[s.image] for s in seqs]).to(emb.dtype)
    mask = (ids == mllm.config.image_token_id)[..., None].expand_as(emb)
    emb = emb.masked_scatter(mask, img_emb)
    seq_grids = torch.cat([images[s.image].grid for s in seqs]).to(device)
    position_ids, _ = core.get_rope_index(ids, seq_grids, None, attention_mask=attn)
    out = core.language_model(inputs_embeds=emb, position_ids=position_ids,
                              attention_mask=attn, use_cache=False)
    hidden = out.last_hidden_state
    ce = None
    if want_ce:
        logits = mllm.lm_head(hidden[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return ce, hidden, ids


def seg_states(hidden: torch.Tensor, ids: torch.Tensor, seqs: list[ChatSequence], seg_id: int,
               offset: int) -> tuple[torch.Tensor, list[int]]:
    """The hidden state at (or offset from) the first answer [SEG] of each sequence that has one."""
    rows, owners = [], []
    for i, s in enumerate(seqs):
        pos = (ids[i, s.answer_start:] == seg_id).nonzero().flatten()
        if len(pos):
            rows.append(hidden[i, s.answer_start + int(pos[0]) + offset])
            owners.append(i)
    if not rows:
        return hidden.new_zeros((0, hidden.shape[-1])), []
    return torch.stack(rows), owners


def sam_features(model: CitrusV, pixels: torch.Tensor) -> dict:
    """SAM2 image encoder with gradients (training twin of CitrusV.encode_slice)."""
    sam = model.sam2
    backbone_out = sam.forward_image(pixels)
    _, feats, _, sizes = sam._prepare_backbone_features(backbone_out)
    if sam.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + sam.no_mem_embed
    b = pixels.shape[0]
    maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(feats, sizes)]
    return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}


def decode_train(model: CitrusV, feats: dict, image_index: list[int], seg_hidden: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[SEG] states -> all multimask low-res logits (n, 3, h, w) and IoU predictions (n, 3)."""
    sam = model.sam2
    n = seg_hidden.shape[0]
    idx = torch.tensor(image_index, device=seg_hidden.device)
    prompt = model.seg_projector(seg_hidden)
    sparse, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)
    sparse = torch.cat([sparse.expand(n, -1, -1), prompt[:, None, :].to(sparse.dtype)], dim=1)
    dense = dense.expand(n, -1, -1, -1)
    low_res, iou, _, _ = sam.sam_mask_decoder(
        image_embeddings=feats["image_embed"][idx],
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        repeat_image=False,
        high_res_features=[f[idx] for f in feats["high_res_feats"]],
    )
    return low_res, iou


def mask_losses(low_res: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """Dice + BCE on every multimask output, the IoU head against the real IoU, and "recall":
    the BCE of the target's own pixels averaged over the target (area-normalised)."""
    size = target.shape[-1]
    logits = F.interpolate(low_res.float(), size=(size, size), mode="bilinear",
                           align_corners=False)
    t = target[:, None].expand_as(logits)
    prob = logits.sigmoid()
    inter = (prob * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").flatten(2).mean(-1)
    recall = ((F.softplus(-logits) * t).flatten(2).sum(-1)
              / t.flatten(2).sum(-1).clamp(min=1))
    with torch.no_grad():
        hard = (logits > 0).float()
        i = (hard * t).flatten(2).sum(-1)
        u = ((hard + t) > 0).float().flatten(2).sum(-1)
        real_iou = torch.where(u > 0, i / u.clamp(min=1), torch.ones_like(u))
    iou = F.mse_loss(iou_pred.float(), real_iou)
    return {"dice": dice.mean(), "bce": bce.mean(), "iou": iou, "recall": recall.mean()}


def target_mask(mask: np.ndarray, size: int = MASK_LOSS_SIZE) -> torch.Tensor:
    """A full-size boolean mask -> (size, size) float target (area-averaged, SAM2 frame)."""
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0]


def augment_sam(pixels: torch.Tensor, targets: torch.Tensor, owners: list[int],
                rng: random.Random, strength: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random scale/shift on each image and on the targets that belong to it."""
    b = pixels.shape[0]
    theta = torch.zeros(b, 2, 3, device=pixels.device)  # on the images' device (GPU)
    for i in range(b):
        s = 1.0 + rng.uniform(-strength, strength)
        theta[i, 0, 0] = theta[i, 1, 1] = s
        theta[i, 0, 2] = rng.uniform(-strength, strength)
        theta[i, 1, 2] = rng.uniform(-strength, strength)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border",
                           align_corners=False)
    tgrid = F.affine_grid(theta[owners], [len(owners), 1, *targets.shape[-2:]],
                          align_corners=False)
    targets = F.grid_sample(targets[:, None], tgrid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[:, 0]
    return pixels, targets


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise(params: list, steps: int, lr: float, warmup: int,
             batch: Callable[[], dict[str, torch.Tensor]], weights: dict[str, float],
             on_step: Callable[[int, float, dict[str, float]], None],
             stop: Callable[[], bool] | None = None) -> int:
    """The one step loop of every stage: AdamW (weight decay 0.01), linear warmup then cosine
    to 10% of `lr`, loss = weighted sum of `batch()`'s parts, gradient norm clipped at 1.
    `on_step(step, loss, parts)` sees plain floats. Returns the number of steps run."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        if stop is not None and stop():
            return step
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        parts = batch()
        loss = sum(weights[k] * v for k, v in parts.items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        on_step(step, loss.item(), {k: v.item() for k, v in parts.items()})
    return steps


# ----------------------------------------------------------------------------- segmentation stage
@dataclass
class SegSample:
    """One correction: a 2D slice, the question, the mask the answer should give."""

    image: np.ndarray
    prompt: str
    mask: np.ndarray
    window: str | tuple | None = None
    label: str | None = None


def _seg_answer(sample: SegSample) -> str:
    from .parsing import prompt_target

    from .nano_data import segment_answer

    return segment_answer(sample.label or prompt_target(sample.prompt) or "structure")


def finetune_segmentation(model: CitrusV, processor, samples: Sequence[SegSample | dict],
                          steps: int = 200, lr: float = 3e-4, seed: int = 0,
                          batch_images: int = 4, log: Log | None = None,
                          augment: bool = True, val_samples: Sequence | None = None,
                          stop: Callable[[], bool] | None = None,
                          recall_weight: float = SEG_RECALL_WEIGHT, release_mllm: bool = False,
                          train_device: str | torch.device | None = None) -> dict:
    """Citrus-V stage 4 on (slice, prompt, mask) samples: MLLM frozen, projector + SAM2 trained.

    `samples` are SegSample or dicts with keys image, prompt, mask (+ window, label); empty masks
    are negatives. The [SEG] state is the frozen MLLM's own, from its greedy answer to the prompt,
    computed once per sample (training and validation) before any step (see own_seg_state): the
    steps and the Dice on `val_samples` need SAM2 and the projector only. `release_mllm` then drops
    the MLLM from `model` (`model.mllm` is None afterwards; save it with `base=`), and
    `train_device` moves what is left there, so the MLLM can compute the states on the CPU while
    SAM2 trains on the GPU. Returns stats: loss curve, final loss, and Dice on `val_samples`
    before/after when given. The model is left in eval mode.
    """
    samples = [s if isinstance(s, SegSample) else SegSample(**s) for s in samples]
    if not samples:
        raise ValueError("finetune_segmentation needs at least one (image, prompt, mask) sample.")
    val = [s if isinstance(s, SegSample) else SegSample(**s) for s in val_samples or []]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()

    # frozen MLLM: one [SEG] state per sample (its own greedy answer), images rendered once
    inputs, seg_hidden = seg_states_of(model, processor, samples)
    val_inputs, val_hidden = seg_states_of(model, processor, val) if val else ([], None)
    states_seconds = time.perf_counter() - t0
    if release_mllm:
        model.mllm = None  # its weights go when the caller's engine holds no other reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if train_device is not None:
        model.to(train_device)
    before = _dice_of_states(model, val_inputs, val_hidden, val) if val else None
    targets = [target_mask(s.mask) for s in samples]

    if model.mllm is not None:
        model.mllm.requires_grad_(False)
    params = list(model.seg_projector.parameters()) + list(model.sam2.parameters())
    for p in params:
        p.requires_grad_(True)
    curve: list[float] = []
    model.sam2.train()
    model.seg_projector.train()
    order: list[int] = []

    def batch() -> dict[str, torch.Tensor]:  # up to `batch_images` samples, each once per epoch
        chosen = []
        while len(chosen) < max(1, min(batch_images, len(samples))):
            if not order:
                order.extend(range(len(samples)))
                rng.shuffle(order)
            chosen.append(order.pop())
        return seg_batch_losses(model, [inputs[i] for i in chosen],
                                [targets[i] for i in chosen], seg_hidden[chosen],
                                rng if augment else None)

    def on_step(step: int, loss: float, parts: dict[str, float]) -> None:
        curve.append(loss)
        if log is not None:
            log({"stage": "segmentation", "step": step + 1, "steps": steps, "loss": loss,
                 **parts})

    optimise(params, steps, lr, max(1, steps // 20), batch,
             segmentation_weights(recall_weight), on_step, stop)
    model.eval()
    stats = {"steps": len(curve), "loss_curve": curve,
             "final_loss": float(np.mean(curve[-10:])) if curve else None,
             "states_seconds": states_seconds, "seconds": time.perf_counter() - t0}
    if val:
        stats["val_dice_before"] = before
        stats["val_dice_after"] = _dice_of_states(model, val_inputs, val_hidden, val)
    return stats


def seg_batch_losses(model: CitrusV, inputs: Sequence[ImageInputs], targets: Sequence[torch.Tensor],
                     seg_hidden: torch.Tensor, rng: random.Random | None) -> dict[str, torch.Tensor]:
    """One segmentation-stage batch on the model's device: images (randomly scaled/shifted with
    their targets when `rng` is given), SAM2 with gradients, the [SEG] states through the
    projector, and `mask_losses`. Inputs, targets and states may be on the CPU."""
    device = next(model.parameters()).device
    pixels = torch.stack([inp.sam for inp in inputs]).to(device, model.sam2_dtype)
    tgt = torch.stack(list(targets)).to(device)
    owners = list(range(len(inputs)))
    if rng is not None:
        pixels, tgt = augment_sam(pixels, tgt, owners, rng)
    feats = sam_features(model, pixels)
    low, iou = decode_train(model, feats, owners, seg_hidden.to(device, model.sam2_dtype))
    return mask_losses(low, iou, tgt)


@torch.no_grad()
def seg_states_of(model: CitrusV, processor, samples: Sequence[SegSample]
                  ) -> tuple[list[ImageInputs], torch.Tensor]:
    """(rendered inputs, [SEG] states on the CPU in float32) of the samples, with the MLLM."""
    model.eval()
    inputs = [render(s.image, s.window, processor, model.config) for s in samples]
    states = [own_seg_state(model, processor, inp, s) for inp, s in zip(inputs, samples)]
    return inputs, torch.stack(states)


def _dtype(model) -> torch.dtype:
    """The MLLM's dtype (SAM2 and the projector take `model.sam2_dtype`)."""
    return next(model.mllm.parameters()).dtype


@torch.no_grad()
def own_seg_state(model: CitrusV, processor, inp: ImageInputs, sample: SegSample
                  ) -> torch.Tensor:
    """The [SEG] state of the model's own greedy answer to the prompt (what inference feeds
    SAM2); falls back to teacher-forcing "Sure, the <label> is [SEG] <label>." if it writes none.
    """
    from .generation import generate_capturing, image_embeddings

    config = model.config
    tok = processor.tokenizer
    device, dtype = next(model.parameters()).device, _dtype(model)
    merge = int(config.mllm.vision_config.spatial_merge_size)
    grid = inp.grid.to(device)
    embeds = image_embeddings(model.mllm, inp.pixel_values.to(device, dtype), grid)
    system = config.task_system_prompts.get("segment", config.system_prompt)
    ids = text_inputs(tok, system, sample.prompt, inp.grid, merge).to(device)
    gen = generate_capturing(model.mllm, ids, grid, embeds, int(config.seg_token_idx),
                             stop_token_ids(tok),
                             max_new_tokens=64, offset=int(config.seg_hidden_offset),
                             vocab_limit=len(tok))
    if gen.seg_hidden.shape[0]:
        return gen.seg_hidden[0].float().cpu()
    full, start = encode_chat(tok, config, sample.prompt, _seg_answer(sample), inp.grid,
                              "segment")
    seq = ChatSequence(full, start, 0)
    _, hidden, ids_t = mllm_forward(model, [inp], [seq], tok.pad_token_id, want_ce=False)
    h, _ = seg_states(hidden, ids_t, [seq], config.seg_token_idx, config.seg_hidden_offset)
    return h[0].float().cpu()


@torch.no_grad()
def segmentation_dice(model: CitrusV, processor, samples: Sequence[SegSample | dict]) -> float:
    """Mean Dice of the masks the model gives for each prompt (its own [SEG] state)."""
    samples = [s if isinstance(s, SegSample) else SegSample(**s) for s in samples]
    if not samples:
        return float("nan")
    return _dice_of_states(model, *seg_states_of(model, processor, samples), samples)


@torch.no_grad()
def _dice_of_states(model: CitrusV, inputs: Sequence[ImageInputs], states: torch.Tensor,
                    samples: Sequence[SegSample]) -> float:
    """Mean Dice of SAM2's masks for given [SEG] states (needs no MLLM)."""
    device, dtype = next(model.parameters()).device, model.sam2_dtype
    model.eval()
    scores = []
    for inp, h, s in zip(inputs, states, samples):
        feats = model.encode_slice(inp.sam[None].to(device, dtype))
        logits, _ = model.decode_masks(feats, h[None].to(device, dtype), inp.hw)
        scores.append(dice_score(logits[0].cpu().numpy() > 0, np.asarray(s.mask, bool)))
    return float(np.mean(scores)) if scores else float("nan")


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice; 1.0 when both are empty."""
    a, b = int(pred.sum()), int(ref.sum())
    if a + b == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (a + b)


# ----------------------------------------------------------------------------- nano
class StateBank:
    """[SEG] states seen per structure (the last `keep`), and a `share` of each batch's states
    swapped for one of them: the state then names the structure without telling whether it is
    on the slice, so SAM2 has to see that in the image. `share` 0 changes nothing and draws no
    random numbers (runs without it stay as they were)."""

    def __init__(self, share: float, rng: random.Random, keep: int = 64) -> None:
        self.share, self.rng, self.keep = share, rng, keep
        self.states: dict[str, list[torch.Tensor]] = {}

    def swap(self, h: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.share <= 0:
            return h
        h = h.detach().clone()
        for i, name in enumerate(names):
            bank = self.states.setdefault(name, [])
            bank.append(h[i].clone())
            del bank[:-self.keep]
        for i, name in enumerate(names):
            if self.rng.random() < self.share:
                h[i] = self.rng.choice(self.states[name])
        return h


class NanoBank:
    """Rendered inputs of every training image (CT slice x window, DRR), built lazily."""

    def __init__(self, data, processor, config) -> None:
        self.data = data
        self.processor = processor
        self.config = config
        self.cache: dict[tuple, ImageInputs] = {}

    def get(self, image_key: str, window) -> ImageInputs:
        key = (image_key, window if image_key.startswith("ct:") else None)
        if key not in self.cache:
            kind, ref = image_key.split(":", 1)
            img = self.data.volume[int(ref)] if kind == "ct" else self.data.drr[ref]
            self.cache[key] = render(img, key[1], self.processor, self.config)
        return self.cache[key]


def _corpus(samples: list[dict]) -> list[str]:
    # the chat scaffolding and system prompt repeat in every sample: let BPE merge them
    texts = [NANO_SYSTEM, "system\n", "user\n", "assistant\n"] * 50
    seen = set()
    for s in samples:
        for t in (s["prompt"], s["answer"]):
            if t not in seen:
                seen.add(t)
                texts.append(t)
    return texts


# closer-look crops in a segmentation stage (crop_share): each edge of the structure's box
# moved by up to this share of its size before the square is taken around it
CROP_JITTER = 0.15


# The recipe `citrusv train` runs by default, and how models/nano was made: rounds of
# (joint stage, segmentation stage) with fixed step counts. Round r uses seed + r, a fresh
# optimizer and a warm restart of the learning rate, and starts from the previous round's
# checkpoint as stored (fp16, the released layout's separate lm_head), exactly as `--init`
# continues a saved model; the same seed gives the same model (at one thread, on the same kind
# of CPU). whole_names: see train_nano. Seed 1 made the shipped models/nano: run T2 in
# MODEL_CARD.md made rounds 1-2, and `--init <T2> --first-round 3` added the crop round (T2c);
# seed 0 made the weights shipped before T2 (W, at 2 threads).
NANO_RECIPE: dict = dict(
    seed=1,
    whole_names=True,
    recall_weight=SEG_RECALL_WEIGHT,
    state_swap=0.0,  # off: run S with 0.5 missed mean Dice and citation precision
    # (docs/nano_training_history.md)
    rounds=(dict(joint_steps=900, seg_steps=900, lr=1e-3, seg_lr=5e-4),
            dict(joint_steps=450, seg_steps=3000, lr=5e-4, seg_lr=5e-4),
            # the crop round: half the segmentation images are closer-look crops, so that a
            # closer look no longer spoils nano's masks (docs/nano_training_history.md)
            dict(joint_steps=0, seg_steps=1200, lr=5e-4, seg_lr=5e-4, crop_share=0.5)),
)


def training_host() -> dict:
    """What ran the training, as far as it can change the numbers: on CPU, MKL and oneDNN
    pick kernels by the instruction set, library version and pins (MKL_CBWR changes the
    losses), and another kernel sums in another order. A busy machine changes them too
    (MODEL_CARD.md, "Recipe"), which no field here can show."""
    import os
    import platform

    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
                cpu[key] = value.strip()
    except OSError:
        pass
    flags = set(cpu.pop("flags", "").split())
    libs = [line.strip(" -") for line in torch.__config__.show().splitlines()
            if "Math Kernel Library Version" in line or "MKL-DNN v" in line]
    return {"machine": platform.machine(), "cpu": cpu.get("model name", platform.processor()),
            "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
            "isa_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile"}),
            "torch": torch.__version__, "torch_cpu_capability":
                torch.backends.cpu.get_cpu_capability(), "libraries": libs,
            "kernel_pins": {k: os.environ[k] for k in KERNEL_PINS if k in os.environ}}


def cpu_vendor(host: dict) -> str:
    """The CPU's maker, from training_host()'s model name ("AMD EPYC" -> "AMD"): MKL and oneDNN
    choose kernels by maker as well as by instruction set."""
    name = str(host.get("cpu") or "")
    return next((v for v in ("AMD", "Intel") if v in name), name or "?")


def host_differences(host: dict, other: dict) -> list[str]:
    """Where two training_host() records differ in kind of machine: "field here (other)"."""
    def kind(h: dict, k: str):
        return cpu_vendor(h) if k == "cpu_vendor" else h.get(k)
    return [f"{k} {kind(host, k)} (there: {kind(other, k)})" for k in HOST_KIND
            if kind(host, k) != kind(other, k)]


def recipe_host_note(host: dict, shipped: str | Path = SHIPPED_NANO,
                     out: str | Path = "OUT") -> str | None:
    """What a one-thread run of the recipe on this host can expect against the shipped nano:
    its weights repeat only on the kind of machine that made them (MODEL_CARD.md, "Recipe")."""
    try:
        made_on = json.loads((Path(shipped) / "training_log.json").read_text())["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no shipped nano beside this code (an installed package), or no host record
    diffs = host_differences(host, made_on)
    if not diffs:
        return ("This machine is of the kind that made models/nano: at one thread the recipe "
                "repeats there, so the weights should come out as shipped (compare them with "
                "cmp; they did on two AMD EPYC models, MODEL_CARD.md).")
    return ("This machine is not of the kind that made models/nano (" + "; ".join(diffs) + "): "
            "the recipe gives other weights here, which can miss the model card's targets (run "
            "T2i in MODEL_CARD.md missed mean Dice and liver). Score them with `citrusv eval "
            f"--model {out}` before serving them.")


def train_nano(out_dir: str | Path = "models/nano", seed: int = NANO_RECIPE["seed"],
               data_dir: str | Path = "work/nano_data",
               rounds: Sequence[dict] = NANO_RECIPE["rounds"],
               whole_names: bool = NANO_RECIPE["whole_names"],
               recall_weight: float = NANO_RECIPE["recall_weight"],
               batch_images: int = 4, seqs_per_image: int = 4, seg_batch_images: int = 6,
               threads: int = 1, log: Log | None = None, log_every: int = 10,
               save_dtype: str = "float16", max_minutes: float | None = None,
               joint_checkpoint: str | Path | None = None,
               init_from: str | Path | None = None,
               state_swap: float = NANO_RECIPE["state_swap"],
               first_round: int = 1) -> dict:
    """Build the data (if missing), train nano from scratch, save it in the released layout.

    `whole_names`: two-word structure names ("right kidney") are one token each. The state
    at [SEG] is trained to predict the token after it, and "right" starts both "right lung"
    and "right kidney", which made their [SEG] states nearly equal.

    `state_swap`: in the segmentation stages, the share of [SEG] states replaced by a state of
    the same structure from another training slice (present there or not; kept from earlier
    batches). The state then names the structure but no longer says whether it is on the
    slice, so SAM2 learns that from the image; the frozen MLLM's judgement of that is what
    lost the liver dome in run R (docs/nano_training_history.md).

    `first_round` N > 1: continue `init_from`, a model saved after round N-1 of these same
    `rounds` (same seed and data), with rounds N... only. Each round starts from the previous
    one's checkpoint as stored and is seeded by its number, so this writes the weights the
    whole run would (tests/nano/test_recipe.py checks it byte for byte); the log's earlier
    rounds are copied from `init_from`'s log.
    """
    first = int(first_round)
    if first < 1 or first > len(rounds):
        raise ValueError(f"first_round must be 1 to {len(rounds)}; got {first_round}")
    if first > 1 and not init_from:
        raise ValueError("first_round > 1 continues a model saved after the round before it: "
                         "give init_from")
    from .engine import CLOSER_LOOK_MARGIN, closer_look_image, square_roi
    from .nano_data import (MIN_AREA_PX, NAMES, NANO_MAX_PIXELS, NANO_MIN_PIXELS,
                            TRAIN_WINDOWS, build_nano_data, data_is_current, load_nano_data,
                            mask_box)

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    deadline = None if max_minutes is None else t_start + 60 * max_minutes
    data_dir = Path(data_dir)
    if not data_is_current(data_dir, seed):  # missing, built by an older builder or seed
        build_nano_data(data_dir, seed=seed)
    data = load_nano_data(data_dir)
    train = [s for s in data.samples if s["split"] == "train"]
    torch.manual_seed(seed)
    if init_from:  # continue from a saved nano (e.g. more segmentation-stage steps)
        # the processor training has: the fast tokenizer and the slow image processor
        model, processor, config = load_checkpoint(init_from, dtype=torch.float32)
        tokenizer = processor.tokenizer
        for key, value in nano_settings().items():  # a model saved before them lacks them
            setattr(config, key, value)
    else:
        tokenizer = train_tokenizer(_corpus(data.samples),
                                    whole_names=[n for n in NAMES if " " in n] if whole_names
                                    else ())
        processor = qwen_processor(tokenizer, NANO_MIN_PIXELS, NANO_MAX_PIXELS)
        config = nano_config(tokenizer, NANO_MIN_PIXELS, NANO_MAX_PIXELS)
        model = build_model(config, torch.float32, random_init=True)
    bank = NanoBank(data, processor, config)
    pad = tokenizer.pad_token_id
    say = log or (lambda rec: print(json.dumps(rec), flush=True))

    by_image: dict[str, list[dict]] = {}
    for s in train:
        by_image.setdefault(s["image"], []).append(s)
    ct_keys = sorted(k for k in by_image if k.startswith("ct:"))
    drr_keys = sorted(k for k in by_image if k.startswith("drr:"))
    targets: dict[tuple[int, str], torch.Tensor] = {}
    rng = random.Random(seed)

    def target(k: int, name: str, crop: list[int] | None = None) -> torch.Tensor:
        if crop is not None:  # a closer-look crop: its own target, not kept
            x1, y1, x2, y2 = crop
            return target_mask(data.mask(name, k)[y1:y2, x1:x2])
        if (k, name) not in targets:
            targets[(k, name)] = target_mask(data.mask(name, k))
        return targets[(k, name)]

    @functools.cache
    def present_on(k: int) -> tuple[str, ...]:
        """The structures on training slice k (at least MIN_AREA_PX), in NAMES order."""
        return tuple(n for n in NAMES if data.mask(n, k).sum() >= MIN_AREA_PX)

    def closer_look_crop(k: int, window) -> tuple[ImageInputs, list[str], list[int]] | None:
        """A square around a structure's box on slice k, cropped and scaled as
        `Engine.closer_look` does (the box's edges moved by up to CROP_JITTER of its size, as a
        first pass's mask would place it), the structures to ask for in it: that one, one other
        inside the crop, one more at random. The box is the whole structure's: the engine has
        since taken a square per main part (the aorta's two parts on one slice get two), which
        these crops, part of the shipped recipe, do not do: a crop round that did (CP1 in
        docs/nano_training_history.md) was not better."""
        on = present_on(k)
        if not on:
            return None
        name = rng.choice(on)
        x1, y1, x2, y2 = mask_box(data.mask(name, k))
        jitter = [rng.uniform(-CROP_JITTER, CROP_JITTER) for _ in range(4)]
        bw, bh = x2 - x1, y2 - y1
        box = [x1 + jitter[0] * bw, y1 + jitter[1] * bh, x2 + jitter[2] * bw,
               y2 + jitter[3] * bh]
        vol_h, vol_w = data.volume.shape[1:]
        crop = square_roi(box, vol_h, vol_w, CLOSER_LOOK_MARGIN)
        inp = render(closer_look_image(data.volume[k], crop, window, int(config.image_size)),
                     None, processor, config)
        inside = [n for n in NAMES if n != name and
                  data.mask(n, k)[crop[1]:crop[3], crop[0]:crop[2]].sum() >= MIN_AREA_PX]
        names = [name] + rng.sample(inside, min(1, len(inside)))
        names.append(rng.choice([n for n in NAMES if n not in names]))
        return inp, names, crop

    def pick_batch(with_text: bool, n_images: int = batch_images, crop_share: float = 0.0):
        """Images (CT slices in random windows, sometimes a DRR, or, for a share `crop_share`
        of the CT slices, closer-look crops) and their sequences: a crop gets segmentation
        questions only (its structures'), in the joint stage as well, where they teach the
        text side to answer a segmentation question about a crop."""
        images, seqs, seg_meta = [], [], []
        for b in range(n_images):
            use_drr = with_text and drr_keys and rng.random() < 0.1
            key = rng.choice(drr_keys if use_drr else ct_keys)
            window = rng.choice(TRAIN_WINDOWS) if key.startswith("ct:") else None
            cropped = None
            if crop_share and key.startswith("ct:") and rng.random() < crop_share:
                cropped = closer_look_crop(int(key.split(":")[1]), window)
            crop = None
            if cropped is not None:
                crops_made[0] += 1
                inp, names, crop = cropped
            else:
                inp = bank.get(key, window)
            images.append((key, window, inp))
            pool = by_image[key]
            if with_text and crop is None:
                chosen = []
                reports = [s for s in pool if s["task"] == "report"]
                if reports and rng.random() < 0.5:
                    chosen.append(rng.choice(reports))
                segs = [s for s in pool if s["task"] == "segment"]
                dets = [s for s in pool if s["task"] == "detect"]
                while len(chosen) < seqs_per_image:
                    chosen.append(rng.choice(dets if (rng.random() < 0.6 or not segs) else segs))
            else:
                if crop is None:  # a crop's structures came with it
                    on = list(present_on(int(key.split(":")[1])))
                    rng.shuffle(on)
                    names = on[:seqs_per_image - 1]
                    names.append(rng.choice([n for n in NAMES if n not in names]))
                chosen = [rng.choice([s for s in pool if s["task"] == "segment"
                                      and s["structure"] == n]) for n in names]
            for s in chosen:
                ids, start = encode_chat(tokenizer, config, s["prompt"], s["answer"], inp.grid,
                                         s["task"])
                seqs.append(ChatSequence(ids, start, b))
                seg_meta.append(s if crop is None else {**s, "crop": crop})
        return images, seqs, seg_meta

    state_bank = StateBank(state_swap, rng)

    def seg_step(images, seqs, meta, hidden, ids, augment: bool, swap: bool = False):
        h, owners = seg_states(hidden, ids, seqs, config.seg_token_idx, config.seg_hidden_offset)
        if not owners:
            return None
        if swap:
            h = state_bank.swap(h, [meta[i]["structure"] for i in owners])
        pixels = torch.stack([im[2].sam for im in images])
        tgt = torch.stack([target(meta[i]["slice"], meta[i]["structure"], meta[i].get("crop"))
                           for i in owners])
        img_idx = [seqs[i].image for i in owners]
        if augment:
            pixels, tgt = augment_sam(pixels, tgt, img_idx, rng)
        feats = sam_features(model, pixels)
        low, iou = decode_train(model, feats, img_idx, h)
        return mask_losses(low, iou, tgt)

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    def run_stage(stage: str, steps: int, lr: float, warmup: int, r: int, params: list,
                  batch, weights: dict) -> None:
        def on_step(step: int, loss: float, parts: dict[str, float]) -> None:
            rec = {"round": r + 1, "stage": stage, "step": step + 1, "steps": steps,
                   "loss": loss, **{k: round(v, 4) for k, v in parts.items()},
                   "elapsed_s": round(time.perf_counter() - t_start, 1)}
            history.append(rec)
            if (step + 1) % log_every == 0 or step == 0:
                say(rec)

        optimise(params, steps, lr, warmup, batch, weights, on_step, out_of_time)

    def joint_batch() -> dict:
        images, seqs, meta = pick_batch(with_text=True, crop_share=joint_crop_share)
        ce, hidden, ids = mllm_forward(model, [im[2] for im in images], seqs, pad)
        ct_seg = [i for i, s in enumerate(meta) if s["task"] == "segment" and s["slice"] is not None]
        parts = {"ce": ce}
        if ct_seg:
            sp = seg_step(images, [seqs[i] for i in ct_seg], [meta[i] for i in ct_seg],
                          hidden[ct_seg], ids[ct_seg], augment=False)
            if sp:
                parts.update(sp)
        return parts

    crop_share = joint_crop_share = 0.0  # the round's, set below
    crops_made = [0]  # closer-look crop images made in the stage so far

    def segmentation_batch() -> dict:
        images, seqs, meta = pick_batch(with_text=False, n_images=seg_batch_images,
                                        crop_share=crop_share)
        with torch.no_grad():
            _, hidden, ids = mllm_forward(model, [im[2] for im in images], seqs, pad,
                                          want_ce=False)
        return seg_step(images, seqs, meta, hidden, ids, augment=True, swap=True)

    history: list[dict] = []
    seconds: list[dict] = []
    for r, spec in enumerate(rounds):
        if r < first - 1:  # ran before: init_from is its checkpoint
            continue
        if r:  # the next round starts from this round's checkpoint as stored (as --init does)
            with tempfile.TemporaryDirectory() as tmp:
                save_nano(model, processor, Path(tmp), save_dtype)
                model = load_checkpoint(tmp, dtype=torch.float32)[0]
        rng.seed(seed + r)
        torch.manual_seed(seed + r)
        # stage 1: joint (token CE + 2 Dice + 1 BCE), everything trained
        joint_crop_share = float(spec.get("joint_crop_share", 0.0))
        crops_made[0] = 0
        model.requires_grad_(True)
        model.train()
        t1 = time.perf_counter()
        run_stage("joint", spec["joint_steps"], spec["lr"], 30, r,
                  [p for p in model.parameters() if p.requires_grad], joint_batch, LOSS_WEIGHTS)
        joint_s = time.perf_counter() - t1
        joint_crops = crops_made[0]
        if joint_checkpoint and spec["joint_steps"] and r == 0:
            model.eval()
            save_nano(model, processor, Path(joint_checkpoint), save_dtype)
        # stage 2: segmentation (MLLM frozen; projector + SAM2)
        crop_share = float(spec.get("crop_share", 0.0))
        crops_made[0] = 0
        model.train()
        model.mllm.requires_grad_(False)
        model.mllm.eval()
        t2 = time.perf_counter()
        run_stage("segmentation", spec["seg_steps"], spec["seg_lr"], 20, r,
                  list(model.seg_projector.parameters()) + list(model.sam2.parameters()),
                  segmentation_batch, segmentation_weights(recall_weight))
        seconds.append({"joint_seconds": round(joint_s, 1),
                        "seg_seconds": round(time.perf_counter() - t2, 1),
                        **({"joint_crop_images": joint_crops} if joint_crop_share else {}),
                        **({"crop_images": crops_made[0]} if crop_share else {})})

    model.eval()
    model.requires_grad_(False)
    total_s = time.perf_counter() - t_start
    out = Path(out_dir)
    save_nano(model, processor, out, save_dtype)
    ran = [{**spec,
            "joint_steps_run": sum(h["stage"] == "joint" and h["round"] == r + 1 for h in history),
            "seg_steps_run": sum(h["stage"] == "segmentation" and h["round"] == r + 1
                                 for h in history),
            **secs,
            "final": {h["stage"]: h for h in history if h["round"] == r + 1}}
           for (r, spec), secs in zip(list(enumerate(rounds))[first - 1:], seconds)]
    earlier_run = {}
    if first > 1:
        init_log = Path(init_from) / "training_log.json"
        init_stats = json.loads(init_log.read_text()) if init_log.is_file() else {}
        ran = init_stats.get("rounds", [])[:first - 1] + ran
        # what ran the earlier rounds: their time and machine are part of the model's record
        earlier_run = {"earlier_run": {k: init_stats.get(k) for k in (
            "init_from", "total_seconds", "threads", "host")}}
    stats = {"seed": seed, "init_from": None if init_from is None else str(init_from),
             **({"first_round": first} if first > 1 else {}), **earlier_run,
             "whole_names": whole_names, "recall_weight": recall_weight,
             "state_swap": state_swap, "rounds": ran,
             "stopped_early": any(x["joint_steps_run"] < x["joint_steps"]
                                  or x["seg_steps_run"] < x["seg_steps"] for x in ran),
             "total_seconds": round(total_s, 1), "batch_images": batch_images,
             "seqs_per_image": seqs_per_image, "seg_batch_images": seg_batch_images,
             "threads": threads, "n_train_samples": len(train), "vocab": len(tokenizer),
             "parameters": sum(p.numel() for p in model.parameters()),
             "host": training_host()}
    (out / "training_log.json").write_text(json.dumps(stats, indent=1))
    return stats


def save_nano(model: CitrusV, processor, out: Path, save_dtype: str = "float16") -> Path:
    """Save in the released layout; weights stored in fp16 to stay small (loaded as fp32)."""
    import copy

    dtype = {"float16": torch.float16, "float32": torch.float32}[save_dtype]
    model = copy.deepcopy(model)
    if model.config.mllm.tie_word_embeddings:  # the released layout stores mllm.lm_head.*
        weight = model.mllm.get_input_embeddings().weight
        model.mllm.lm_head.weight = torch.nn.Parameter(weight.detach().clone())
        model.config.mllm.tie_word_embeddings = False
        model.config.mllm.text_config.tie_word_embeddings = False
    save_checkpoint(model.to(dtype), processor, out)
    from .nano_data import NANO_INTENDED_USE, nano_example_prompts

    (Path(out) / EXAMPLES_FILE).write_text(json.dumps(nano_example_prompts(), indent=2) + "\n")
    (Path(out) / INTENDED_USE_FILE).write_text(NANO_INTENDED_USE + "\n")
    return out


def train_nano_cli(args) -> int:
    """`citrusv train`: train nano and print where it went and how long it took."""
    given = {k: getattr(args, k) for k in ("joint_steps", "seg_steps", "lr", "seg_lr",
                                           "crop_share", "joint_crop_share")
             if getattr(args, k, None) is not None}
    first_round = getattr(args, "first_round", None) or 1
    if first_round > 1 and (given or args.init is None):
        print("--first-round continues the recipe from a model saved after the round before "
              "it: give --init, and no step counts or rates.", file=sys.stderr)
        return 2
    # the recipe by default; step counts or rates on the command line make one round of them
    rounds = NANO_RECIPE["rounds"] if not given else ({**NANO_RECIPE["rounds"][0], **given},)
    if not 1 <= first_round <= len(rounds):
        print(f"--first-round must be 1 to {len(rounds)}, the recipe's rounds; got "
              f"{first_round}.", file=sys.stderr)
        return 2
    whole_names = NANO_RECIPE["whole_names"] if args.whole_names is None else args.whole_names
    seed = NANO_RECIPE["seed"] if args.seed is None else args.seed
    state_swap = NANO_RECIPE["state_swap"] if args.state_swap is None else args.state_swap
    is_recipe = (not given and seed == NANO_RECIPE["seed"] and args.init is None
                 and whole_names == NANO_RECIPE["whole_names"]
                 and state_swap == NANO_RECIPE["state_swap"] and args.threads == 1
                 and args.max_minutes is None and first_round == 1)
    note = recipe_host_note(training_host(), out=args.out) if is_recipe else None
    if note:
        print(note, flush=True)
    stats = train_nano(out_dir=args.out, seed=seed, data_dir=args.data, rounds=rounds,
                       whole_names=whole_names,
                       state_swap=state_swap,
                       threads=args.threads, max_minutes=args.max_minutes,
                       joint_checkpoint=args.joint_checkpoint, init_from=args.init,
                       first_round=first_round)
    print(json.dumps({k: v for k, v in stats.items() if k != "rounds"}, indent=1))
    print(f"wrote {args.out} in {stats['total_seconds'] / 60:.1f} min")
    if note:
        print(note)
    if getattr(args, "eval", True):
        print(post_training_verdict(args.out, args.threads))
    return 0


def post_training_verdict(out_dir, threads: int = 1, slices: list[int] | None = None) -> str:
    """Score freshly trained weights on the held-out blocks (`citrusv eval`), write the scores
    to `<out_dir>/evaluation.json`, and say whether they meet the issue's targets: a retrain is
    another draw of the recipe and can miss them (MODEL_CARD.md, "Recipe")."""
    from .evaluation import (evaluate_model, format_table, missed_targets,
                             written_detection_miss)

    path = Path(out_dir) / "evaluation.json"
    scores = evaluate_model(out_dir, threads, slices=slices, json_path=path)
    missed = missed_targets(scores)
    verdict = (f"These weights meet the targets on the held-out blocks, with the boxes the "
               f"engine returns standing for detection (scores: {path})."
               if not missed else
               f"These weights MISS targets on the held-out blocks: {'; '.join(missed)}. "
               f"Do not serve them in place of a model that meets them; train again with "
               f"another --seed, or keep models/nano (scores: {path}).")
    written = written_detection_miss(scores)
    if written:
        verdict += (f" The boxes as the model writes them miss detection: {written}, as for "
                    f"every nano so far (models/nano/MODEL_CARD.md).")
    return format_table(scores) + "\n\n" + verdict
