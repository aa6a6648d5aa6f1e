"""Citrus-V engine: Qwen2.5-VL + [SEG] token -> projector -> SAM2, as a small library."""

from .engine import Engine
from .errors import InputError
from .result import Box, Mask, Result, Step

__version__ = "0.1.0"
__all__ = ["Engine", "InputError", "Result", "Mask", "Box", "Step"]
