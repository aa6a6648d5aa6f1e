"""Draw a result (JSON dict, as the server returns it) over the 8-bit slice: masks, labelled
boxes, numbered reasoning steps. Pure Pillow, so the Slicer headless client can reuse it."""

from __future__ import annotations

import re
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import rle

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def render_overlay(result: dict, image: np.ndarray, slice_index: int | None = None,
                   alpha: float = 0.4, panel_width: int = 360) -> Image.Image:
    """Result JSON + (H, W) or (H, W, 3) uint8 slice -> RGB image with a reasoning panel."""
    base = np.asarray(image)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=-1)
    base = base[..., :3].astype(np.float32)
    h, w = base.shape[:2]
    for m in result.get("masks", []):
        if slice_index is not None and m.get("slice") not in (None, slice_index):
            continue
        mask = rle.decode(m["rle"])
        if mask.shape != (h, w):
            continue
        colour = np.array(COLOURS[(int(m.get("label_index", 1)) - 1) % len(COLOURS)], np.float32)
        base[mask] = (1 - alpha) * base[mask] + alpha * colour
    scale = max(1.0, h / 512)  # keep text readable on large X-rays
    size = int(round(11 * scale))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    panel_width = int(panel_width * scale)
    line = int(round(14 * scale))
    steps = result.get("reasoning", [])
    answer = result.get("answer", "")
    wrap = max(20, int(panel_width / (7 * scale)))
    lines: list[str] = []
    for s in steps:
        cites = f" [{', '.join(s.get('box_ids', []))}]" if s.get("box_ids") else ""
        text = re.sub(r"\s*<bbox>.*?</bbox>", "", s.get("text", ""))  # cited as [b1] instead
        lines += textwrap.wrap(f"{s.get('step')}. {text}{cites}", wrap) or [""]
    if answer:
        lines += [""] + textwrap.wrap(f"Answer: {answer}", wrap)
    panel = panel_width if lines else 0
    canvas = Image.new("RGB", (w + panel, max(h, line * len(lines) + 10)), (20, 20, 20))
    canvas.paste(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, b in enumerate(result.get("boxes", [])):
        if slice_index is not None and b.get("slice") not in (None, slice_index):
            continue
        x1, y1, x2, y2 = b["xyxy"]
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour,
                       width=max(2, int(2 * scale)))
        draw.text((x1 + 2, max(0, y1 - line)), f"{b.get('id', '')} {b.get('label', '')}",
                  fill=colour, font=font)
    for i, text in enumerate(lines):
        draw.text((w + 8, 6 + line * i), text, fill=(235, 235, 235), font=font)
    return canvas
