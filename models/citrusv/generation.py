"""One greedy generation pass that keeps the last-layer hidden state at every [SEG] token.

The released reference generates, then re-runs the model to find [SEG] states; here the states
are read off the same KV-cached decode loop (or off one teacher-forced pass for given text).
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .parsing import _NUM


@dataclass
class Generation:
    token_ids: list[int]
    seg_hidden: torch.Tensor  # (n_seg, hidden), last layer, in generation order
    prefill_tokens: int
    decode_tokens: int
    prefill_ms: float
    decode_ms: float
    prefix: PromptPrefix | None = None  # a fresh KV prefix snapshot, when one was asked for
    prefill_reused: int = 0  # prompt tokens served from a cached prefix
    # the model's probability of each token in token_ids (greedy: its top probability)
    token_probs: list[float] = field(default_factory=list)


def image_embeddings(mllm, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                     ) -> torch.Tensor:
    """Vision tower + merger output for one image (cacheable per slice)."""
    core = mllm.model
    return torch.cat(core.get_image_features(pixel_values, image_grid_thw), dim=0)


def _embed_prompt(mllm, input_ids, image_grid_thw, image_embeds):
    core = mllm.model
    emb = core.get_input_embeddings()(input_ids)
    mask = (input_ids == mllm.config.image_token_id)[..., None].expand_as(emb)
    emb = emb.masked_scatter(mask, image_embeds.to(emb.device, emb.dtype))
    position_ids, rope_deltas = core.get_rope_index(input_ids, image_grid_thw, None,
                                                    attention_mask=torch.ones_like(input_ids))
    return emb, position_ids, rope_deltas


def _seg_states(hidden: torch.Tensor, ids: torch.Tensor, seg_id: int, offset: int,
                first: int) -> list[torch.Tensor]:
    """Hidden rows at (or `offset` from) each [SEG] among positions >= first."""
    pos = (ids[0] == seg_id).nonzero().flatten().tolist()
    return [hidden[0, p + offset] for p in pos if p >= first and 0 <= p + offset < hidden.shape[1]]


@dataclass
class PromptPrefix:
    """KV cache of the prompt up to the end of the image (system + image tokens), reusable for
    any later question about the same slice with the same system prompt."""

    input_ids: torch.Tensor  # (1, L)
    cache: DynamicCache

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def prefix_length(input_ids: torch.Tensor, vision_end_id: int) -> int:
    """Tokens up to and including the last <|vision_end|> (0 when there is no image)."""
    hits = (input_ids[0] == vision_end_id).nonzero().flatten()
    return int(hits[-1]) + 1 if len(hits) else 0


@torch.no_grad()
def generate_capturing(mllm, input_ids, image_grid_thw, image_embeds, seg_id: int,
                       eos_ids: set[int], max_new_tokens: int = 512, offset: int = 0,
                       vocab_limit: int | None = None, prefix: PromptPrefix | None = None,
                       keep_prefix: int = 0) -> Generation:
    """Greedy decode with KV cache; collect the hidden state at each generated [SEG].

    `prefix`: a cached KV prefix to start from (its tokens must open `input_ids`).
    `keep_prefix`: when > 0, snapshot the KV of the first `keep_prefix` tokens into
    `Generation.prefix` for the next question on this slice.
    """
    core, device = mllm.model, input_ids.device
    t0 = time.perf_counter()
    emb, position_ids, rope_deltas = _embed_prompt(mllm, input_ids, image_grid_thw, image_embeds)
    n = input_ids.shape[1]
    start, snapshot = 0, None
    if prefix is not None:
        k = prefix.input_ids.shape[1]
        if k < n and torch.equal(prefix.input_ids.to(device), input_ids[:, :k]):
            cache, start = copy.deepcopy(prefix.cache), k
    if start == 0:
        cache = DynamicCache(config=mllm.config.text_config)
        if 0 < keep_prefix < n:
            core.language_model(inputs_embeds=emb[:, :keep_prefix],
                                position_ids=position_ids[:, :, :keep_prefix],
                                past_key_values=cache, use_cache=True,
                                cache_position=torch.arange(keep_prefix, device=device))
            snapshot = PromptPrefix(input_ids[:, :keep_prefix].clone(), copy.deepcopy(cache))
            start = keep_prefix
    out = core.language_model(inputs_embeds=emb[:, start:], position_ids=position_ids[:, :, start:],
                              past_key_values=cache, use_cache=True,
                              cache_position=torch.arange(start, n, device=device))
    last = out.last_hidden_state[:, -1]
    t1 = time.perf_counter()
    tokens: list[int] = []
    probs: list[float] = []
    seg: list[torch.Tensor] = []
    embed = core.get_input_embeddings()
    pending_seg = False
    prev = last
    while True:
        if pending_seg:  # `last` is the state AT the [SEG] fed in the previous step
            seg.append(last[0] if offset == 0 else prev[0])
            pending_seg = False
        if len(tokens) >= max_new_tokens:
            break
        p = torch.softmax(mllm.lm_head(last)[0, :vocab_limit].float(), -1)
        token = int(p.argmax())
        if token in eos_ids:
            break
        tokens.append(token)
        probs.append(float(p[token]))
        if token == seg_id:
            pending_seg = True  # feed it even at the token limit: its state is the prompt
        elif len(tokens) >= max_new_tokens:
            break
        prev = last
        pos = n + len(tokens) - 1
        pids = (rope_deltas.to(device) + pos).view(1, 1, 1).expand(3, 1, 1)
        out = core.language_model(inputs_embeds=embed(torch.tensor([[token]], device=device)),
                                  position_ids=pids, past_key_values=cache, use_cache=True,
                                  cache_position=torch.tensor([pos], device=device))
        last = out.last_hidden_state[:, -1]
    t2 = time.perf_counter()
    hidden = torch.stack(seg) if seg else last.new_zeros((0, last.shape[-1]))
    return Generation(tokens, hidden, n, len(tokens), (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                      snapshot, start if snapshot is None else 0, probs)


@torch.no_grad()
def teacher_force(mllm, input_ids, image_grid_thw, image_embeds, answer_ids: list[int],
                  seg_id: int, offset: int = 0) -> Generation:
    """Run given answer tokens through the real model in one pass; [SEG] states as in decode."""
    t0 = time.perf_counter()
    n = input_ids.shape[1]
    full = torch.cat([input_ids, torch.tensor([answer_ids], device=input_ids.device)], dim=1)
    emb, position_ids, _ = _embed_prompt(mllm, full, image_grid_thw, image_embeds)
    out = mllm.model.language_model(inputs_embeds=emb, position_ids=position_ids, use_cache=False)
    states = _seg_states(out.last_hidden_state, full, seg_id, offset, first=n)
    hidden = torch.stack(states) if states else out.last_hidden_state.new_zeros(
        (0, out.last_hidden_state.shape[-1]))
    # the state before each answer token predicts it
    logits = mllm.lm_head(out.last_hidden_state[0, n - 1:full.shape[1] - 1]).float()
    probs = torch.softmax(logits, -1).gather(1, full[0, n:, None]).flatten().tolist()
    ms = (time.perf_counter() - t0) * 1e3
    return Generation(list(answer_ids), hidden, n, len(answer_ids), ms, 0.0, token_probs=probs)


@torch.no_grad()
def generate_capturing_batch(mllm, input_ids, image_grid_thw, image_embeds, seg_id: int,
                             eos_ids: set[int], max_new_tokens: int = 512, offset: int = 0,
                             vocab_limit: int | None = None) -> list[Generation]:
    """Greedy decode of B prompts of identical layout (same length, same image grid: the
    slices of one volume) in one batch; rows that finish early idle until all are done."""
    core, device = mllm.model, input_ids.device
    b, n = input_ids.shape
    t0 = time.perf_counter()
    emb, position_ids, rope_deltas = _embed_prompt(mllm, input_ids, image_grid_thw, image_embeds)
    cache = DynamicCache(config=mllm.config.text_config)
    out = core.language_model(inputs_embeds=emb, position_ids=position_ids,
                              past_key_values=cache, use_cache=True,
                              cache_position=torch.arange(n, device=device))
    last = out.last_hidden_state[:, -1]
    t1 = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in range(b)]
    probs: list[list[float]] = [[] for _ in range(b)]
    seg: list[list[torch.Tensor]] = [[] for _ in range(b)]
    done = [False] * b
    pending = [False] * b
    prev = last
    embed = core.get_input_embeddings()
    deltas = rope_deltas.to(device).view(1, b, 1)
    step = 0
    while True:
        for i in range(b):
            if pending[i]:
                seg[i].append(last[i] if offset == 0 else prev[i])
                pending[i] = False
        if all(done) or step >= max_new_tokens:
            break
        p = torch.softmax(mllm.lm_head(last)[..., :vocab_limit].float(), -1)
        top, best = p.max(-1)
        next_ids, top = best.tolist(), top.tolist()
        feed = []
        for i, token in enumerate(next_ids):
            if done[i] or token in eos_ids:
                done[i] = True
                feed.append(tokens[i][-1] if tokens[i] else token)
                continue
            tokens[i].append(token)
            probs[i].append(top[i])
            pending[i] = token == seg_id
            if len(tokens[i]) >= max_new_tokens and not pending[i]:
                done[i] = True
            feed.append(token)
        step += 1
        if all(done) and not any(pending):
            break
        prev = last
        pos = n + step - 1
        pids = (deltas + pos).expand(3, b, 1)
        out = core.language_model(inputs_embeds=embed(torch.tensor([feed], device=device).T),
                                  position_ids=pids, past_key_values=cache, use_cache=True,
                                  cache_position=torch.tensor([pos], device=device))
        last = out.last_hidden_state[:, -1]
    t2 = time.perf_counter()
    gens = []
    for i in range(b):
        hidden = torch.stack(seg[i]) if seg[i] else last.new_zeros((0, last.shape[-1]))
        gens.append(Generation(tokens[i], hidden, n, len(tokens[i]), (t1 - t0) * 1e3 / b,
                               (t2 - t1) * 1e3 / b, token_probs=probs[i]))
    return gens


def token_char_ends(tokenizer, token_ids: list[int], text: str) -> list[int]:
    """End offset in `text` (= decode(token_ids)) of each token."""
    pieces = tokenizer.batch_decode([[t] for t in token_ids], skip_special_tokens=False)
    if "".join(pieces) == text:
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        return ends
    # a piece that is part of a multi-byte character decodes alone to U+FFFD: use prefixes
    return [len(tokenizer.decode(token_ids[:i + 1], skip_special_tokens=False))
            for i in range(len(token_ids))]


def span_score(text: str, ends: list[int], probs: list[float], start: int, end: int
               ) -> float | None:
    """Geometric-mean probability of the tokens that write the numbers inside
    text[start:end] (not digits inside words, such as bbox_2d): how sure the model was of a
    box's coordinates. None when there is no such token."""
    spans = [(start + m.start(), start + m.end()) for m in _NUMBER.finditer(text[start:end])]
    logs, begin = [], 0
    for stop, p in zip(ends, probs):
        if any(max(begin, a) < min(stop, b) for a, b in spans):
            logs.append(math.log(max(p, 1e-12)))
        begin = stop
    return float(math.exp(sum(logs) / len(logs))) if logs else None


# the parser's number pattern, not inside a word (bbox_2d) or after a decimal point
_NUMBER = re.compile(r"(?<![\w.])" + _NUM)
