"""Quantized-weight formats (one module per format)."""
