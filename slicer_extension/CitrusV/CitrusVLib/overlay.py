"""Render a result on its slice as a PNG: masks, labelled boxes, numbered reasoning steps.

Pure Pillow + numpy so that the Slicer-less twin (``citrusv ask``) and the engine share it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colors import label_color
from .result import BOX_TAG, Result, step_text

MIN_SIDE = 512
PANEL_WIDTH = 360


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _rgb(image_uint8: np.ndarray) -> np.ndarray:
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"render_overlay needs a uint8 image, got {image.dtype}.")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[:, :, :3]
    raise ValueError(f"render_overlay needs an (H, W) or (H, W, 3) image, got {image.shape}.")


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _on_slice(s: int | None, slice_index: int | None) -> bool:
    """Whether a mask or box on slice ``s`` is drawn for ``slice_index`` (None: all)."""
    return slice_index is None or s is None or s == slice_index


def fullest_slice(result_json: Mapping[str, Any] | Result, default: int) -> int:
    """The slice of a slice-range answer to draw: the one where its masks cover the most
    pixels, else the first slice with a box, else ``default`` (nothing was marked)."""
    result = result_json if isinstance(result_json, Result) else Result.from_json(result_json)
    area: dict[int, int] = {}
    for m in result.masks:
        if m.slice is not None and m.area_px:
            area[m.slice] = area.get(m.slice, 0) + int(m.area_px)
    if area:
        return max(sorted(area), key=lambda k: area[k])
    boxed = sorted(b.slice for b in result.boxes if b.slice is not None)
    return boxed[0] if boxed else default


def render_overlay(
    image_uint8: np.ndarray,
    result_json: Mapping[str, Any] | Result,
    slice_index: int | None = None,
    alpha: float = 0.4,
    panel: bool = True,
) -> Image.Image:
    """The slice with the result drawn on it, plus a side panel with the answer and steps.

    ``slice_index`` filters masks/boxes to that slice (None: draw all that fit the image).
    Small images are upscaled (nearest) so labels stay legible.
    """
    result = result_json if isinstance(result_json, Result) else Result.from_json(result_json)
    base = _rgb(image_uint8)
    h, w = base.shape[:2]
    scale = max(1, math.ceil(MIN_SIDE / max(h, w)))
    # upscale first (nearest) so that mask outlines stay one pixel thin
    canvas = np.repeat(np.repeat(base, scale, axis=0), scale, axis=1).astype(np.float32)

    for m in result.masks:
        if not _on_slice(m.slice, slice_index) or m.rle is None:
            continue
        mask = m.array()
        if mask.shape != (h, w):
            continue
        if scale > 1:
            mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
        color = np.array(label_color(m.label, m.label_index), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        canvas[_edge(mask)] = color
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # text and markers grow with large images (X-rays) so they stay readable when shrunk
    k_text = max(1.0, max(img.width, img.height) / 900)
    font = _font(round(14 * k_text))
    small = _font(round(12 * k_text))
    line_h = round(17 * k_text)
    panel_width = round(PANEL_WIDTH * k_text)

    steps_for_box: dict[str, list[int]] = {}
    for s in result.reasoning:
        for box_id in s.box_ids:
            steps_for_box.setdefault(box_id, []).append(s.step)

    for n, b in enumerate(result.boxes):
        if not _on_slice(b.slice, slice_index):
            continue
        x1, y1, x2, y2 = (v * scale for v in b.xyxy)
        x1, x2 = sorted((min(max(x1, 0), w * scale - 1), min(max(x2, 0), w * scale - 1)))
        y1, y2 = sorted((min(max(y1, 0), h * scale - 1), min(max(y2, 0), h * scale - 1)))
        color = label_color(b.label, n + 1)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        tag = b.name
        tb = draw.textbbox((0, 0), tag, font=small)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y2 + 2
        ty = min(ty, h * scale - th - 4)
        tx = min(max(x1, 0), max(w * scale - tw - 4, 0))
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=(0, 0, 0))
        draw.text((tx + 2, ty + 2 - tb[1]), tag, fill=color, font=small)
        # numbered step markers along the box's top edge, inside it
        for k, step in enumerate(steps_for_box.get(b.id, [])):
            r = round(9 * k_text)
            cx, cy = x1 + r + 2 + k * (2 * r + 2), y1 + r + 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255), outline=color)
            label = str(step)
            lb = draw.textbbox((0, 0), label, font=small)
            draw.text(
                (cx - (lb[2] - lb[0]) / 2 - lb[0], cy - (lb[3] - lb[1]) / 2 - lb[1]),
                label,
                fill=(0, 0, 0),
                font=small,
            )

    if not panel:
        return img
    lines = panel_lines(result, slice_index)
    height = max(img.height, 12 + line_h * len(lines))
    out = Image.new("RGB", (img.width + panel_width, height), (24, 24, 24))
    out.paste(img, (0, 0))
    pd = ImageDraw.Draw(out)
    for n, (t, color) in enumerate(lines):
        pd.text((img.width + 10, 8 + n * line_h), t, fill=color, font=font)
    return out


WARNING_COLOR = (255, 170, 110)


def panel_lines(
    result: Result, slice_index: int | None = None
) -> list[tuple[str, tuple[int, int, int]]]:
    """The side panel's lines and their colours: the task and question, the answer, the
    numbered steps, each mask on the slice with its area in mm² and its long and short axis,
    each box on it with its size in mm, then the warnings (what the server says to check),
    wrapped to the panel."""

    lines: list[tuple[str, tuple[int, int, int]]] = []
    title = f"{result.task or 'result'}: {result.prompt}".strip()
    chars = max(20, PANEL_WIDTH // 7)  # characters per line, independent of the text scale
    for t in textwrap.wrap(title, chars):
        lines.append((t, (255, 255, 255)))
    if result.answer:
        lines.append(("", (0, 0, 0)))
        for t in textwrap.wrap(result.answer, chars):
            lines.append((t, (230, 230, 160)))
    if result.reasoning:
        lines.append(("", (0, 0, 0)))
        for s in result.reasoning:
            cited = BOX_TAG.search(s.text) is not None
            ids = f" [{', '.join(s.box_ids)}]" if s.box_ids and not cited else ""
            for k, t in enumerate(
                textwrap.wrap(f"{s.step}. {step_text(s.text, s.box_ids)}{ids}", chars)
            ):
                lines.append(((t if k == 0 else "   " + t), (200, 220, 255)))
    for m in result.masks:
        if _on_slice(m.slice, slice_index):
            area = f", {m.area_mm2:.0f} mm2" if m.area_mm2 is not None else ""
            if m.diameters_mm:
                area += f", {m.diameters_mm[0]:.0f} x {m.diameters_mm[1]:.0f} mm"
            lines.append((f"{m.label}{area}", label_color(m.label, m.label_index)))
    for n, b in enumerate(result.boxes):
        if _on_slice(b.slice, slice_index):
            size = f", {b.size_mm[0]:.0f} x {b.size_mm[1]:.0f} mm" if b.size_mm else ""
            lines.append((f"{b.id} {b.label}{size}".strip(), label_color(b.label, n + 1)))
    if result.warnings:
        lines.append(("", (0, 0, 0)))
        for w in result.warnings:
            for t in textwrap.wrap(f"! {w}", chars, subsequent_indent="  "):
                lines.append((t, WARNING_COLOR))
    return lines
