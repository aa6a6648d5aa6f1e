"""Citrus-V Slicer library: everything that is not Qt. Never imports slicer, qt, ctk or vtk.

``headless`` and ``overlay`` (Pillow) are not imported here, so Slicer never needs Pillow.
"""

from .client import (
    CitrusVClient,
    InferResponse,
    NextSample,
    infer_params,
    parse_infer_response,
    task_name,
)
from .errors import CitrusVCancelled, CitrusVError
from .result import Box, CloserLook, ImageInfo, Mask, ReasoningStep, Result, step_text
from .rle import decode_rle, encode_rle

__all__ = [
    "Box",
    "CitrusVCancelled",
    "CitrusVClient",
    "CitrusVError",
    "CloserLook",
    "ImageInfo",
    "InferResponse",
    "Mask",
    "NextSample",
    "ReasoningStep",
    "Result",
    "decode_rle",
    "encode_rle",
    "infer_params",
    "parse_infer_response",
    "step_text",
    "task_name",
]
