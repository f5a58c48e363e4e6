"""HLWQ ("PolarQuant", Hadamard-Lloyd Weight Quantization) weights, compatible with the ``polarquant`` package
(import name ``polarengine_vllm``, 0.6.0) and its checkpoints: ``codebook`` (Lloyd-Max levels), ``hadamard``
(the per-128-block Walsh-Hadamard transform), ``codes`` (quantize a weight to codes and norms, and back),
``packing`` (LSB-first, MSB-first and half-block packings, bit-order detection), ``checkpoint`` (the polarengine
layouts of a module), ``weight`` (the node, :class:`HLWQWeight`)."""
from .codebook import bin_masses, lloyd_max_table
from .codes import dequantize, quantize, quantize_jit
from .hadamard import BLOCK, fwht, hadamard, padded_in
from .packing import (bit_order_kl, detect_bit_order, pack_half_block, pack_lsb, pack_msb_flat, unpack_half_block,
                      unpack_lsb, unpack_msb_flat)
from .weight import PATHS, HLWQWeight, check_quantizable

__all__ = ["HLWQWeight", "BLOCK", "PATHS", "lloyd_max_table", "bin_masses", "fwht", "hadamard", "quantize",
           "quantize_jit", "dequantize", "pack_lsb", "unpack_lsb", "pack_msb_flat", "unpack_msb_flat",
           "pack_half_block", "unpack_half_block", "detect_bit_order", "bit_order_kl", "padded_in",
           "check_quantizable"]
