"""HLWQ quantization of a weight to codes and norms, and back.

Each row of a weight ``W [out, in]`` is zero-padded to ``in_pad = ceil(in/128)*128`` and cut into blocks of 128
inputs. A block ``w`` is stored as its fp16 L2 norm ``r`` and one ``b``-bit code per input: the index of the
Lloyd-Max level ``c`` (for N(0, 1), ``codebook.lloyd_max_table``) nearest to ``z = sqrt(128) * H (w / r)``, where
``H[i, k] = (-1)^popcount(i & k) / sqrt(128)`` is the normalized Sylvester-Walsh-Hadamard matrix (no random
signs, no seed; ``H = H^T = H^-1``)::

    W_hat[o, 128j + i] = norm[o, j] * sum_k H[i, k] * c[code[o, j, k]] / sqrt(128)

Code selection: ``k = searchsorted(c, z)``, keep ``c[k]`` only when strictly nearer than ``c[k-1]`` (ties go to
the lower index) -- the same codes as the package's float32 argmin.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..base import QuantError, ieee_div
from .codebook import check_bits, lloyd_max_table
from .hadamard import BLOCK, hmul, pad_last, padded_in

__all__ = ["quantize", "quantize_jit", "dequantize", "lookup", "scaled_table"]

SQRT_BLOCK = np.float32(math.sqrt(BLOCK))


def _as_table(table, bits: int):
    if table is None:
        return jnp.asarray(lloyd_max_table(bits))
    if tuple(jnp.shape(table)) != (1 << bits,):
        raise QuantError(f"HLWQ table for {bits} bits must have shape [{1 << bits}], got {list(jnp.shape(table))}")
    try:
        t = np.asarray(table, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        t = None  # traced under jit: the caller vouches for it
    if t is not None and not (np.all(np.isfinite(t)) and np.all(np.diff(t) > 0)):
        raise QuantError("HLWQ table must be finite and strictly ascending to quantize")
    return jnp.asarray(table, jnp.float32)


def quantize(w: jax.Array, bits: int = 5, table=None):
    """HLWQ-quantize a weight ``[..., N, K]`` (leading axes: e.g. experts).

    Returns ``(codes uint8 [..., N, K_pad], norms float16 [..., N, K_pad/128])`` with ``K_pad`` = K rounded up
    to a multiple of 128 (zero padding). All arithmetic in float32: block L2 norm (clamped >= 1e-10), unit
    vector by IEEE division, ``z = (u @ H) * sqrt(128)`` (a dense fp32 matmul, as the package computes it; the
    :func:`fwht` butterfly rounds differently and would flip ~1e-6 of the codes), nearest level by
    ``searchsorted`` + nearer-of-two (ties -> lower index). ``table``: the levels (ascending, ``2^bits``),
    default :func:`lloyd_max_table`. Jittable with ``bits`` static (:data:`quantize_jit`).
    """
    bits = check_bits(bits)
    ct = _as_table(table, bits)
    L = 1 << bits
    wf = jnp.asarray(w).astype(jnp.float32)
    *lead, N, K = wf.shape
    k_pad = padded_in(K)
    blocks = pad_last(wf, k_pad).reshape(*lead, N, k_pad // BLOCK, BLOCK)
    r = jnp.maximum(jnp.sqrt(jnp.sum(blocks * blocks, axis=-1)), jnp.float32(1e-10))
    z = hmul(ieee_div(blocks, r[..., None])) * jnp.float32(SQRT_BLOCK)
    # pos = clip(searchsorted(c, z, 'left'), 1, L-1) - 1 = #{l in 1..L-2 : c_l < z}; then the nearer of c[pos],
    # c[pos+1] (strictly nearer upper level wins; ties -> lower index)
    if L <= 32:  # all compares, one fused reduction
        pos = jnp.sum(z[..., None] > ct[1:-1], axis=-1, dtype=jnp.int32)
    else:  # branchless bisection (the compare-all reduction stops fusing at 64 levels)
        step = L // 2
        pos = jnp.where(ct[step] < z, step, 0).astype(jnp.int32)  # first step on a scalar: no constant gather
        step //= 2
        while step:
            cand = pos + step
            pos = jnp.where((cand <= L - 2) & (jnp.take(ct, jnp.minimum(cand, L - 1)) < z), cand, pos)
            step //= 2
    lo, hi = jnp.take(ct, pos), jnp.take(ct, pos + 1)
    up = jnp.abs(z - hi) < jnp.abs(z - lo)
    codes = (pos + up.astype(jnp.int32)).astype(jnp.uint8)
    return codes.reshape(*lead, N, k_pad), r.astype(jnp.float16)


quantize_jit = jax.jit(quantize, static_argnames=("bits",))


def lookup(table: jax.Array, codes: jax.Array) -> jax.Array:
    """``table[..., codes]`` with the table's leading axes matching the codes' leading axes (float32)."""
    table = jnp.asarray(table, jnp.float32)
    idx = codes.astype(jnp.int32)
    if table.ndim == 1:
        return jnp.take(table, idx, axis=0, mode="clip")
    lead = table.shape[:-1]
    flat = idx.reshape(*lead, -1)
    return jnp.take_along_axis(table, flat, axis=-1, mode="clip").reshape(codes.shape)


def scaled_table(table) -> jax.Array:
    """``table / sqrt(128)`` in float32 (IEEE division, as the package's ``ct_scaled``)."""
    return ieee_div(jnp.asarray(table, jnp.float32), jnp.float32(SQRT_BLOCK))


def dequantize(codes, norms, table, in_features: int, dtype=jnp.bfloat16) -> jax.Array:
    """``(codes [..., N, K_pad], norms [..., N, K_pad/128], table [2^b] or [..., 2^b])`` -> ``W_hat [..., N,
    in_features]`` in ``dtype``: ``(table[codes] / sqrt(128)) @ H * norm`` per block in float32 (a dense fp32
    matmul with H, the package's arithmetic: bf16 results bit-equal to polarquant-convert on CPU), trimmed, then
    cast (round to nearest even). Jittable."""
    return _dequantize_jit(codes, norms, table, int(in_features), jnp.dtype(dtype))


def _dequantize(codes, norms, table, in_features, dtype):
    codes = jnp.asarray(codes)
    *lead, N, k_pad = codes.shape
    v = hmul(lookup(scaled_table(table), codes).reshape(*lead, N, k_pad // BLOCK, BLOCK))
    v = v * jnp.asarray(norms).astype(jnp.float32)[..., None]
    return v.reshape(*lead, N, k_pad)[..., :in_features].astype(dtype)


_dequantize_jit = jax.jit(_dequantize, static_argnums=(3, 4))

