"""Quantized-weight formats (``base``: the interface, the registry ``FORMATS``, ``is_quantized``, ``format_of``)
and the FP8 KV-cache math (``kv``)."""
from . import nvfp4, hlwq, fp8  # noqa: F401  (the registered formats, in checkpoint-detection order)
from .base import FORMATS, QuantError, QuantFormat, format_of, is_quantized

__all__ = ["FORMATS", "QuantError", "QuantFormat", "format_of", "is_quantized"]
