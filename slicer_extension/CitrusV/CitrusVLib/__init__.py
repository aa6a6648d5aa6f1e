"""Citrus-V Slicer library: everything that is not Qt. Never imports slicer, qt, ctk or vtk."""

from .client import CitrusVClient, InferResponse, NextSample, parse_infer_response, task_name
from .errors import CitrusVCancelled, CitrusVError
from .result import Box, CloserLook, ImageInfo, Mask, ReasoningStep, Result
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
    "parse_infer_response",
    "task_name",
]
