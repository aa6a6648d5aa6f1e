"""Scanner values -> the 8-bit RGB the models saw in training, and the resize maths of both models.

Frames: the *input slice* (H, W) is what the caller passed; the *Qwen frame* is the slice resized
by `smart_resize` (boxes in model text live there); the *SAM2 frame* is image_size x image_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

# CT windows as (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 350.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 4096 * 4096


def window_key(window: str | tuple | list | None) -> str:
    """A hashable, printable name for a window setting (part of the slice-cache key)."""
    if window is None or window == "auto":
        return "auto"
    if isinstance(window, str):
        return window
    level, width = resolve_window(window)
    return f"L{level:g}W{width:g}"


def resolve_window(window: str | tuple | list) -> tuple[float, float]:
    """Preset name or [level, width] -> (level, width); anything else is an InputError."""
    if isinstance(window, str):
        if window not in WINDOWS:
            names = ", ".join(sorted(WINDOWS))
            raise InputError("window", f"window '{window}' is unknown; use one of {names} "
                             "or [level, width].")
        return WINDOWS[window]
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError("window", "window must be a preset name or [level, width] numbers.")
    if not width > 0:
        raise InputError("window", "window width must be a positive number of HU.")
    return level, width


def check_slice(image: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Validate a 2D slice (or H x W x 3 RGB) and return it as a numpy array."""
    if image is None:
        raise InputError("image", "image is missing; send a 2D slice or an RGB image.")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise InputError("image", f"image has shape {tuple(arr.shape)}; send one 2D slice "
                         "(H, W) or an RGB image (H, W, 3).")
    h, w = arr.shape[:2]
    if h < 2 or w < 2:
        raise InputError("image", f"image is {h}x{w} pixels; send a slice of at least 2x2.")
    if h * w > max_pixels:
        raise InputError("image", f"image has {h * w} pixels, over the limit of {max_pixels}; "
                         "send a smaller slice or crop it.")
    if arr.dtype.kind not in "biuf":
        raise InputError("image", f"image values have type {arr.dtype}; send numbers.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).any():
        raise InputError("image", "image has no finite values (all NaN); send a real slice.")
    return arr


def to_rgb_uint8(
    image: np.ndarray,
    window: str | tuple | list | None = None,
    photometric: str | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Scanner values -> (H, W, 3) uint8. A window for CT; with none given, "abdomen" when the
    values look like HU (below -500), else 0.5-99.5 percentiles (MR, X-ray)."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = _scale(rgb.astype(np.float64), *_percentile_range(rgb, percentiles))
        return np.ascontiguousarray(rgb)
    values = arr.astype(np.float64)
    if (window is None or window == "auto") and arr.dtype != np.uint8 and looks_like_ct(values):
        window = "abdomen"
    if window is not None and window != "auto":
        level, width = resolve_window(window)
        grey = _scale(values, level - width / 2.0, level + width / 2.0)
    elif arr.dtype == np.uint8:
        grey = arr.copy()
    else:
        grey = _scale(values, *_percentile_range(values, percentiles))
    if is_monochrome1(photometric):
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def is_monochrome1(photometric: str | None) -> bool:
    """DICOM PhotometricInterpretation MONOCHROME1: low values are shown white."""
    return photometric is not None and str(photometric).strip().upper() == "MONOCHROME1"


def bone_bright(pixels: np.ndarray, photometric: str | None) -> np.ndarray:
    """Pixels of a MONOCHROME1 DICOM (low values shown white) mirrored within their range, so
    they read as MONOCHROME2 (bone bright), as every reader of this product shows them: the
    engine's `citrusv.io` and the server's `monailabel_app/lib/images.py`. The whole array is
    mirrored at once, so a series keeps one scale across its slices. Other images unchanged."""
    if not is_monochrome1(photometric):
        return pixels
    return pixels.max() + pixels.min() - pixels


def looks_like_ct(values: np.ndarray) -> bool:
    """Hounsfield units: air is about -1000, so values below -500 mean CT (docs/api.md)."""
    finite = values[np.isfinite(values)]
    return bool(finite.size) and float(finite.min()) < -500.0


def _percentile_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, percentiles)
    return float(lo), float(hi)


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    out = (values - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: both sides multiples of `factor`, pixels within [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise InputError("image", f"image aspect ratio {height}x{width} is over 200:1; "
                         "send a squarer slice.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class FrameMap:
    """Exact scale between the input slice (in_h, in_w) and a resized frame (out_h, out_w)."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int

    def to_input(self, xyxy: list[float] | tuple[float, ...]) -> list[float]:
        """Frame box -> input-slice box, clipped to [0, W] x [0, H]."""
        sx, sy = self.in_w / self.out_w, self.in_h / self.out_h
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        box = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        return [min(max(box[0], 0.0), self.in_w), min(max(box[1], 0.0), self.in_h),
                min(max(box[2], 0.0), self.in_w), min(max(box[3], 0.0), self.in_h)]

    def to_frame(self, xyxy: list[float] | tuple[float, ...]) -> list[float]:
        """Input-slice box -> frame box (floats)."""
        sx, sy = self.out_w / self.in_w, self.out_h / self.in_h
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def qwen_frame(rgb: np.ndarray, factor: int, min_pixels: int, max_pixels: int
               ) -> tuple[Image.Image, FrameMap]:
    """Resize the slice the way the Qwen processor would (bicubic) and return the exact map."""
    h, w = rgb.shape[:2]
    out_h, out_w = smart_resize(h, w, factor, min_pixels, max_pixels)
    img = Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.BICUBIC)
    return img, FrameMap(h, w, out_h, out_w)


def sam2_input(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, S, S) float tensor, resized and ImageNet-normalised like SAM2."""
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                      antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
