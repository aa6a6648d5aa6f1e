"""Citrus-V engine: Qwen2.5-VL + [SEG] token -> projector -> SAM2, as a small library."""

__version__ = "0.1.0"
