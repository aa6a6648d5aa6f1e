"""Tiny random-weight Citrus-V checkpoints in the released layout, for tests and demos.

`write_tiny_checkpoint(dir, answers={"segment": "Sure, it is [SEG]."})` also fits the tiny
language model for a few seconds so that its real greedy decode writes those answers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2TokenizerFast

from .checkpoint import build_model, qwen_processor, save_checkpoint
from .config import CitrusVConfig
from .modeling import resolve_sam2_config

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>"]
CITRUS_TOKENS = ["[SEG]", "<bbox>", "</bbox>", "<think>", "</think>", "<answer>", "</answer>",
                 "<p>", "</p>"]
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 16
TASK_SYSTEM = {t: f"You are a helpful assistant. Task: {t}."
               for t in ("segment", "detect", "report", "closer_look")}
FIT_PROMPTS = {
    "segment": ["Please segment the liver in this scan.", "Segment the spleen.",
                "Can you segment the left kidney?", "segment the lungs",
                "Please segment the {organ} in this image."],
    "detect": ["Where are the kidneys?", "Detect the liver.", "Locate the heart in this slice.",
               "Find the {organ}."],
    "report": ["Write a report, think step by step.", "Describe the findings.",
               "What do you see in this {organ} image?", "Report on this slice."],
}
FIT_PROMPTS["closer_look"] = FIT_PROMPTS["segment"]
ORGANS = ["liver", "spleen", "aorta", "pancreas", "bladder", "stomach", "gallbladder", "lung"]


def tiny_tokenizer() -> Qwen2TokenizerFast:
    """Byte-level tokenizer (no merges: one token per byte) + Qwen and Citrus-V tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in CITRUS_TOKENS])
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None)


def tiny_sam2_config(image_size: int = 128) -> dict:
    """The SAM2 Hiera-T config shrunk (5 blocks, 16 channels), as an inline dict."""
    cfg = OmegaConf.to_container(OmegaConf.load(resolve_sam2_config("sam2_hiera_t.yaml")).model)
    trunk = cfg["image_encoder"]["trunk"]
    trunk.update(embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_att_blocks=[3],
                 window_spec=[4, 4, 4, 2], window_pos_embed_bkg_spatial_size=[4, 4])
    cfg["image_encoder"]["neck"]["backbone_channel_list"] = [128, 64, 32, 16]
    mem = cfg["memory_attention"]
    mem["num_layers"] = 1
    mem["layer"]["dim_feedforward"] = 64
    for attn in ("self_attention", "cross_attention"):
        mem["layer"][attn]["feat_sizes"] = [image_size // 16, image_size // 16]
    cfg["memory_encoder"]["fuser"]["num_layers"] = 1
    cfg["image_size"] = image_size
    return copy.deepcopy(cfg)


def tiny_config(tokenizer, image_size: int = 128, hidden: int = 64, layers: int = 2,
                intermediate: int | None = None) -> CitrusVConfig:
    ids = tokenizer.convert_tokens_to_ids
    vocab = ((len(tokenizer) + 63) // 64) * 64
    half_head = hidden // 4 // 2  # 4 heads; M-RoPE sections (t, h, w) in the ratio 2:3:3
    section = [half_head // 4, 3 * half_head // 8, half_head - half_head // 4 - 3 * half_head // 8]
    mllm = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=10000.0,
                         rope_scaling={"type": "mrope", "mrope_section": section},
                         tie_word_embeddings=False, bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return CitrusVConfig(mllm=mllm, seg_token_idx=ids("[SEG]"),
                         grounding_encoder_config=tiny_sam2_config(image_size),
                         image_size=image_size, min_pixels=TINY_MIN_PIXELS,
                         max_pixels=TINY_MAX_PIXELS, name="citrusv-tiny", version="0")


def tiny_processor(tokenizer) -> Qwen2_5_VLProcessor:
    return qwen_processor(tokenizer, TINY_MIN_PIXELS, TINY_MAX_PIXELS)


def write_tiny_checkpoint(path: str | Path, seed: int = 0, answers: dict[str, str] | None = None,
                          image_size: int = 128, max_fit_steps: int = 400) -> Path:
    """Write a tiny random-weight model in the released layout; fit `answers` if given."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, image_size=image_size)
    processor = tiny_processor(tokenizer)
    if answers:
        config.task_system_prompts = {
            t: TASK_SYSTEM.get(t, f"You are a helpful assistant. Task: {t}.") for t in answers}
        if "closer_look" not in answers and "segment" in answers:
            config.task_system_prompts["closer_look"] = TASK_SYSTEM["segment"]
    model = build_model(config, torch.float32, random_init=True)
    if answers:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, even more so on a busy box
        try:
            _fit_answers(model, processor, config, answers, seed, max_fit_steps)
        finally:
            torch.set_num_threads(threads)
    model.eval()
    return save_checkpoint(model, processor, path)


def _fit_answers(model, processor, config, answers: dict[str, str], seed: int,
                 max_steps: int) -> None:
    """Teacher-force the tiny LM on (task system prompt, random question) -> answer.

    The vision merger's last layer is zeroed and frozen so the answer cannot depend on the
    pixels, and questions are drawn at random from all tasks' wordings, so the answer depends on
    the task (carried by the system prompt) only. Masks still come from SAM2 on the real slice.
    Stops once greedy decoding reproduces every answer (checked by teacher-forced argmax).
    """
    from .imaging import qwen_frame
    from .prompting import pixel_inputs, text_inputs

    rng = np.random.default_rng(seed)
    tok = processor.tokenizer
    merger_out = model.mllm.model.visual.merger.mlp[-1]
    torch.nn.init.zeros_(merger_out.weight)
    torch.nn.init.zeros_(merger_out.bias)
    model.mllm.model.visual.requires_grad_(False)
    merge = config.mllm.vision_config.spatial_merge_size
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    sizes = [(64, 64), (512, 512), (96, 64), (64, 96), (56, 112), (112, 56), (40, 200),
             (300, 80), (33, 70), (100, 150)]
    pixels = []
    for h, w in sizes:
        frame, _ = qwen_frame(np.zeros((h, w, 3), np.uint8), 28, config.min_pixels,
                              config.max_pixels)
        pixels.append(pixel_inputs(processor.image_processor, frame))
    kinds = list(answers)
    targets = {k: tok(answers[k], add_special_tokens=False)["input_ids"] + [eos] for k in kinds}
    systems = {k: config.task_system_prompts.get(k, config.system_prompt) for k in kinds}
    wordings = [w for ws in FIT_PROMPTS.values() for w in ws]
    fillers = ORGANS + ["the", "scan", "image", "please", "in", "CT", "MR", "this", "show"]

    def question() -> str:
        text = str(rng.choice(wordings)).replace("{organ}", str(rng.choice(ORGANS)))
        if rng.random() < 0.5:
            noise = " ".join(str(rng.choice(fillers)) for _ in range(int(rng.integers(1, 5))))
            text = f"{noise} {text}" if rng.random() < 0.5 else f"{text} {noise}"
        return text

    def batch(kinds_: list[str], pix: dict) -> tuple[torch.Tensor, ...]:
        rows = []
        for kind in kinds_:
            ids = text_inputs(tok, systems[kind], question(), pix["image_grid_thw"], merge)[0]
            rows.append((ids, torch.tensor(targets[kind])))
        n = max(len(a) + len(b) for a, b in rows)
        input_ids = torch.full((len(rows), n), pad)
        labels = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            input_ids[i, :len(a) + len(b)] = torch.cat([a, b])
            labels[i, len(a):len(a) + len(b)] = b
            mask[i, :len(a) + len(b)] = 1
        grid = pix["image_grid_thw"].repeat(len(rows), 1)
        pv = pix["pixel_values"].repeat(len(rows), 1)
        return input_ids, labels, mask, grid, pv

    params = [p for p in model.mllm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    passed = 0
    for step in range(max_steps):
        model.mllm.train()
        opt.zero_grad()
        pix = pixels[step % len(pixels)]
        input_ids, labels, mask, grid, pv = batch(kinds * 3, pix)
        loss = model.mllm(input_ids=input_ids, attention_mask=mask, labels=labels,
                          pixel_values=pv, image_grid_thw=grid).loss
        loss.backward()
        opt.step()
        if step % 10 == 9:
            model.mllm.eval()
            with torch.no_grad():
                input_ids, labels, mask, grid, pv = batch(kinds * 4, pixels[(step // 10) % 10])
                logits = model.mllm(input_ids=input_ids, attention_mask=mask,
                                    pixel_values=pv, image_grid_thw=grid).logits
            pred = logits[:, :-1, :len(tok)].argmax(-1)
            gold = labels[:, 1:]
            ok = bool(((pred == gold) | (gold == -100)).all())
            passed = passed + 1 if ok else 0
            if passed >= 3:
                break
    model.mllm.eval()
    if passed < 3:
        raise RuntimeError(f"the tiny model did not learn the answers in {max_steps} steps; "
                           "pass shorter answers or a larger max_fit_steps.")
    model.fit_steps = step + 1


def bright_square_samples(n: int, size: int = 96, seed: int = 0) -> list:
    """`n` segmentation-stage samples (`training.SegSample`): noise slices in HU, each with one
    bright square as the "liver" mask to find. For fine-tune plumbing and the memory bench."""
    from .training import SegSample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.normal(40, 60, (size, size)).astype(np.float32)
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(size // 8, size // 2, 2)
        mask[y:y + size // 3, x:x + size // 3] = True
        image[mask] += 200
        out.append(SegSample(image=image, prompt="Please segment the liver in this scan.",
                             mask=mask, window="abdomen", label="liver"))
    return out
