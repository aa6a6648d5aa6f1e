"""`citrusv bench`: the engine's own overheads, measured in one run on one model.

Figures: plain `generate` vs capture-while-generating, cold vs cached mask step on the same
slice, prefill/decode tokens/s, a question's wait while a slice range is asked (the engine's
turns), peak RSS (and GPU memory on CUDA).
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .engine import Engine, resolve_dtype
from .generation import generate_capturing, image_embeddings
from .prompting import pixel_inputs, text_inputs

PROMPT = "Please segment the liver in this scan."
FORCED = "Sure, the liver is [SEG]."


def real_8b_engine(device: str = "cuda", dtype=None) -> Engine:
    """Random-init model of the released 8B shape (Qwen2.5-VL-7B + SAM2 Hiera-L), for timing."""
    from transformers import Qwen2_5_VLConfig

    from .checkpoint import build_model
    from .config import CitrusVConfig
    from .testing import tiny_processor, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    mllm = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         max_position_embeddings=128000, rope_theta=1000000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    config = CitrusVConfig(mllm=mllm, seg_token_idx=ids("[SEG]"),
                           grounding_encoder_config="sam2_hiera_l.yaml", image_size=1024,
                           min_pixels=56 * 56, max_pixels=28 * 28 * 1280, name="citrusv-8b-shape")
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device(device):
        model = build_model(config, torch_dtype, random_init=False)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    processor = tiny_processor(tok)
    processor.image_processor.min_pixels, processor.image_processor.max_pixels = (
        config.min_pixels, config.max_pixels)
    return Engine(model.to(device).eval(), processor, config, device=device, dtype=torch_dtype)


def tiny_llm_sam2_l_engine(device: str = "cpu", dtype=None) -> Engine:
    """Tiny language model + the real SAM2 Hiera-L at 1024 (random init): mask-step timing at
    the released SAM2 size on any machine."""
    from .checkpoint import build_model
    from .testing import tiny_config, tiny_processor, tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config(tok)
    config.grounding_encoder_config = "sam2_hiera_l.yaml"
    config.image_size = 1024
    config.name = "citrusv-tiny-llm+sam2-hiera-l"
    torch_dtype = resolve_dtype(dtype, device)
    model = build_model(config, torch_dtype, random_init=True).to(device).eval()
    return Engine(model, tiny_processor(tok), config, device=device, dtype=torch_dtype)


def wide_llm_engine(device: str = "cpu", dtype=None) -> Engine:
    """A 0.4 B-parameter language model (24 layers of width 1024) on the tiny vision tower and
    SAM2, random init: big enough that the MLLM's share of memory shows on a CPU."""
    from .checkpoint import build_model
    from .testing import tiny_config, tiny_processor, tiny_tokenizer

    tok = tiny_tokenizer()
    config = tiny_config(tok, hidden=1024, layers=24, intermediate=4096)
    config.name = "citrusv-wide-llm"
    torch_dtype = resolve_dtype(dtype, device)
    model = build_model(config, torch_dtype, random_init=True).to(device).eval()
    return Engine(model, tiny_processor(tok), config, device=device, dtype=torch_dtype)


def _memory_mb(device: torch.device) -> float:
    """Memory in use now: allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1024**2
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def finetune_memory(model: str | None, shape: str | None, device: str, dtype, steps: int = 10,
                    size: int = 256, samples: int = 4) -> dict:
    """Memory during the segmentation-stage fine-tune's steps (what MONAI Label's training run
    does), with the run's MLLM copy kept and with it released after its [SEG] states. Each
    mode runs in a fresh process of its own (memory a process freed is not always handed back
    to the OS, so one process for both would blur them). GPU: peak allocated over steps 2..N;
    CPU: the largest resident set seen at a step."""
    import multiprocessing

    out: dict = {"finetune_steps": steps, "device": device}
    ctx = multiprocessing.get_context("spawn")
    for mode in ("kept", "released"):
        with ctx.Pool(1) as pool:
            one = pool.apply(_finetune_memory_once, (model, shape, device, dtype, steps, size,
                                                     samples, mode == "released",
                                                     torch.get_num_threads()))
        out["mllm_weights_mb"] = one["mllm_weights_mb"]
        out[f"finetune_{mode}_mb"] = one["peak_mb"]
    out["finetune_released_over_kept"] = out["finetune_released_mb"] / out["finetune_kept_mb"]
    return out


def _finetune_memory_once(model, shape, device, dtype, steps, size, samples, release,
                          threads) -> dict:
    from .testing import bright_square_samples
    from .training import finetune_segmentation

    torch.set_num_threads(threads)
    engine = load_engine(model, shape, device, dtype)
    dev = engine.device
    data = bright_square_samples(samples + 2, size)
    weights = sum(p.numel() * p.element_size() for p in engine.model.mllm.parameters())
    seen: list[float] = []

    def log(record: dict) -> None:
        if record.get("step") == 1 and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seen.append(_memory_mb(dev))

    finetune_segmentation(engine.model, engine.processor, data[:samples], steps=steps,
                          batch_images=2, val_samples=data[samples:], log=log,
                          release_mllm=release)
    peak = torch.cuda.max_memory_allocated(dev) / 1024**2 if dev.type == "cuda" else max(seen)
    return {"mllm_weights_mb": weights / 1024**2, "peak_mb": peak}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_bench(engine: Engine, size: int = 512, new_tokens: int = 32, repeats: int = 5) -> dict:
    """All figures for one engine; ratios compare paths measured in this same run."""
    dev = engine.device
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 120, (size, size)).astype(np.float32)
    state = engine.set_image(ct, window="abdomen")
    pix = pixel_inputs(engine.processor.image_processor, state.frame)
    pv = pix["pixel_values"].to(dev, engine.dtype)
    grid = pix["image_grid_thw"].to(dev)
    ids = text_inputs(engine.tokenizer, engine.config.system_prompt, PROMPT, grid,
                      engine.merge_size).to(dev)
    mllm = engine.model.mllm

    def plain():
        with torch.no_grad():
            return mllm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=pv, image_grid_thw=grid, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0)

    last = {}

    def capture():
        with torch.no_grad():
            emb = image_embeddings(mllm, pv, grid)
            last["gen"] = generate_capturing(mllm, ids, grid, emb, engine.config.seg_token_idx,
                                             set(), new_tokens, vocab_limit=len(engine.tokenizer))

    plain(), capture()  # warm-up
    pairs = [(_median_ms(plain, 1, dev), _median_ms(capture, 1, dev)) for _ in range(repeats)]
    plain_ms = statistics.median(p for p, _ in pairs)  # interleaved: load drift hits both
    capture_ms = statistics.median(c for _, c in pairs)
    gen = last["gen"]

    def cold():
        engine.cache.clear()
        return engine.ask(ct, PROMPT, window="abdomen", forced_text=FORCED).timing_ms["mask"]

    def cached():
        return engine.ask(ct, PROMPT, window="abdomen", forced_text=FORCED).timing_ms["mask"]

    cold()
    cold_ms = statistics.median(cold() for _ in range(repeats))
    cached()
    cached_ms = statistics.median(cached() for _ in range(repeats))
    def questions():
        engine.cache.clear()
        a = engine.ask(ct, PROMPT, window="abdomen", max_new_tokens=1).timing_ms
        b = engine.ask(ct, "Segment the spleen.", window="abdomen", max_new_tokens=1).timing_ms
        return a["vision"] + a["prefill"], b["vision"] + b["prefill"]

    questions()
    pairs = [questions() for _ in range(repeats)]
    out = {
        "prompt_first_ms": statistics.median(p[0] for p in pairs),
        "prompt_second_ms": statistics.median(p[1] for p in pairs),
        "model": engine.name, "device": str(dev), "dtype": str(engine.dtype).replace("torch.", ""),
        "slice": f"{size}x{size}", "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(gen.token_ids),
        "plain_generate_ms": plain_ms, "capture_generate_ms": capture_ms,
        "capture_overhead": capture_ms / plain_ms - 1.0,
        "prefill_tok_s": gen.prefill_tokens / (gen.prefill_ms / 1e3),
        "decode_tok_s": gen.decode_tokens / (gen.decode_ms / 1e3) if gen.decode_ms else 0.0,
        "mask_cold_ms": cold_ms, "mask_cached_ms": cached_ms,
        "mask_cached_over_cold": cached_ms / cold_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out.update(turns(engine, ct, repeats))
    if dev.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1024**2
    return out


RANGE_SLICES = 24  # three of the server's chunks of 8 slices


def turns(engine: Engine, ct: np.ndarray, repeats: int) -> dict:
    """A one-slice question asked while a range of RANGE_SLICES slices is being asked (once its
    first chunk has begun), against the same question alone and the range alone: with the
    engine's turns it waits for at most one chunk; without them it waited for the range."""
    dev = engine.device
    rng = np.random.default_rng(1)
    vol = ct[None] + rng.normal(0, 5, (RANGE_SLICES, *ct.shape)).astype(np.float32)

    def question() -> float:
        engine.cache.clear()
        t0 = time.perf_counter()
        engine.ask(ct, PROMPT, window="abdomen", forced_text=FORCED)
        _sync(dev)
        return (time.perf_counter() - t0) * 1e3

    def ranged(progress=None) -> float:
        engine.cache.clear()
        t0 = time.perf_counter()
        engine.ask_volume(vol, PROMPT, window="abdomen", forced_text=FORCED, progress=progress)
        _sync(dev)
        return (time.perf_counter() - t0) * 1e3

    def during() -> float:
        begun = threading.Event()

        def progress(asked, total):
            if asked == 8:  # the second chunk is about to take its turn
                begun.set()

        asking = threading.Thread(target=ranged, args=(progress,))
        asking.start()
        begun.wait()
        ms = question()
        asking.join()
        return ms

    question(), ranged()  # warm-up
    alone = statistics.median(question() for _ in range(repeats))
    range_ms = statistics.median(ranged() for _ in range(max(1, repeats // 2)))
    waits = statistics.median(during() for _ in range(repeats))
    return {"question_alone_ms": alone, "range_slices": RANGE_SLICES, "range_alone_ms": range_ms,
            "question_during_range_ms": waits, "question_during_over_alone": waits / alone}


def format_bench(r: dict) -> str:
    lines = [
        f"model {r['model']} on {r['device']} ({r['dtype']}), slice {r['slice']}, "
        f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens",
        f"plain generate           {r['plain_generate_ms']:9.1f} ms",
        f"capture-while-generating {r['capture_generate_ms']:9.1f} ms   overhead "
        f"{100 * r['capture_overhead']:+.1f}% (target <= +5%)",
        f"prefill                  {r['prefill_tok_s']:9.1f} tokens/s",
        f"decode                   {r['decode_tok_s']:9.1f} tokens/s",
        f"mask step, cold          {r['mask_cold_ms']:9.1f} ms",
        f"mask step, cached slice  {r['mask_cached_ms']:9.1f} ms   = "
        f"{100 * r['mask_cached_over_cold']:.1f}% of cold (target <= 20%)",
        f"vision+prefill, 1st question on a slice {r['prompt_first_ms']:9.1f} ms",
        f"vision+prefill, 2nd question (cached)   {r['prompt_second_ms']:9.1f} ms",
        f"a question alone         {r['question_alone_ms']:9.1f} ms",
        f"  asked during a range   {r['question_during_range_ms']:9.1f} ms   = "
        f"{r['question_during_over_alone']:.2f} x alone (it waits for the chunk of 8 slices "
        "being asked)",
        f"the range alone          {r['range_alone_ms']:9.1f} ms   ({r['range_slices']} slices; "
        "before the engine's turns a question waited for all of the range left)",
        f"peak RSS                 {r['peak_rss_mb']:9.1f} MB",
    ]
    if "gpu_peak_mb" in r:
        lines.append(f"GPU memory peak          {r['gpu_peak_mb']:9.1f} MB")
    return "\n".join(lines)


def format_finetune_memory(r: dict) -> str:
    where = "GPU allocated" if r.get("device", "").startswith("cuda") else "resident set"
    return "\n".join([
        f"fine-tune steps ({r['finetune_steps']}, {where}); the MLLM's weights: "
        f"{r['mllm_weights_mb']:.1f} MB",
        f"MLLM copy kept           {r['finetune_kept_mb']:9.1f} MB",
        f"MLLM copy released       {r['finetune_released_mb']:9.1f} MB   = "
        f"{100 * r['finetune_released_over_kept']:.1f}% of kept",
    ])


SHAPES = {"8b": real_8b_engine, "tiny-sam2l": tiny_llm_sam2_l_engine, "wide-llm": wide_llm_engine}


def load_engine(model: str | None, shape: str | None, device: str, dtype) -> Engine:
    """The checkpoint in `model`, or a random-init model of `shape` (SHAPES)."""
    if shape:
        return SHAPES[shape](device, dtype)
    return Engine.load(Path(model), device=device, dtype=dtype)


def bench_cli(model: str | None, shape: str | None, device: str, dtype, size: int,
              new_tokens: int, repeats: int, finetune_steps: int = 0) -> dict:
    if finetune_steps:  # the fine-tune figure alone: it loads the model in two processes
        result = finetune_memory(model, shape, device, dtype, steps=finetune_steps)
        print(format_finetune_memory(result))
        return result
    result = run_bench(load_engine(model, shape, device, dtype), size=size,
                       new_tokens=new_tokens, repeats=repeats)
    print(format_bench(result))
    return result
