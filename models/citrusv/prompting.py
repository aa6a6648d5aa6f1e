"""Qwen2.5-VL chat prompt for one slice + one question, tokenised with the checkpoint's processor."""

from __future__ import annotations

import torch
from PIL import Image

IMAGE_PAD = "<|image_pad|>"


def chat_text(system: str, prompt: str, n_image_tokens: int) -> str:
    """The Qwen2.5-VL chat format with one image before the question, ending at the answer."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD * n_image_tokens}<|vision_end|>"
            f"{prompt}<|im_end|>\n<|im_start|>assistant\n")


def stop_token_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: <|im_end|> (end of the chat turn) and <|endoftext|>."""
    ids = tokenizer.convert_tokens_to_ids
    return {i for i in (ids("<|im_end|>"), ids("<|endoftext|>")) if i is not None}


def pixel_inputs(image_processor, frame: Image.Image) -> dict[str, torch.Tensor]:
    """Patchify an image already resized to the Qwen frame (no second resize, exact geometry)."""
    out = image_processor(images=[frame], do_resize=False, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def text_inputs(tokenizer, system: str, prompt: str, image_grid_thw: torch.Tensor,
                merge_size: int) -> torch.Tensor:
    """input_ids (1, L) for the chat with as many <|image_pad|> as the merged vision tokens."""
    n = int(image_grid_thw[0].prod().item()) // (merge_size ** 2)
    ids = tokenizer(chat_text(system, prompt, n), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)
