"""The normalized Sylvester-Walsh-Hadamard transform of HLWQ's 128-input blocks: the dense matrix (for references),
the fp32 matmul with it that reproduces the ``polarquant`` package's rounding, the butterfly FWHT, and the
rotation of zero-padded activations the rotated inference path applies."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BLOCK", "padded_in", "pad_last", "hadamard", "hmul", "fwht", "rotate"]

BLOCK = 128
_LOG2_BLOCK = 7


def padded_in(in_features: int) -> int:
    """Row length after zero padding to whole 128-blocks."""
    return -(-int(in_features) // BLOCK) * BLOCK


def pad_last(x, k_pad: int):
    """``x`` zero-padded along the last axis to ``k_pad``."""
    k = x.shape[-1]
    if k == k_pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_pad - k)])


def hadamard(n: int = BLOCK) -> np.ndarray:
    """Dense normalized Sylvester-Walsh-Hadamard matrix ``H[i, k] = (-1)^popcount(i & k) / sqrt(n)``, float64
    (for tests and references; the library uses :func:`fwht`)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    i = np.arange(n)
    b = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(b)
    while b.any():
        parity ^= b & 1
        b >>= 1
    return (1 - 2 * parity) / math.sqrt(n)


def _fwht_unnormalized(x: jax.Array) -> jax.Array:
    """``sum_k (-1)^popcount(i & k) x[..., 128j + k]`` per 128-block of the last axis: 7 butterfly stages."""
    shp = x.shape
    y = x.reshape(*shp[:-1], shp[-1] // BLOCK, BLOCK)
    lead = y.shape[:-1]
    for s in range(_LOG2_BLOCK):
        h = 1 << s  # pairs (i, i + h) inside groups of 2h
        v = y.reshape(*lead, BLOCK // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, BLOCK)
    return y.reshape(shp)


@functools.lru_cache(maxsize=None)
def _h32() -> np.ndarray:
    h = hadamard(BLOCK).astype(np.float32)  # entries +-fl32(1/sqrt(128)), as the package's H
    h.setflags(write=False)
    return h


def hmul(x: jax.Array) -> jax.Array:
    """``x [..., 128] @ H`` in float32 as the package computes it (a dense fp32 matmul, full precision): used
    where its rounding must be reproduced (quantize's rotated values, the BF16 dequant). XLA's CPU dot gives the
    package's BF16 dequant bit for bit; the butterfly's different rounding flips ~1e-4 of the bf16 values whose
    exact value is ~0 (pure rounding noise either way)."""
    return jax.lax.dot_general(x, jnp.asarray(_h32()), (((x.ndim - 1,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def fwht(x: jax.Array, axis: int = -1) -> jax.Array:
    """Orthonormal fast Walsh-Hadamard transform of every 128-block along ``axis`` (natural/Sylvester order;
    ``fwht(x) = H x`` per block, its own inverse): 7 butterfly stages, no matmul. ``x.shape[axis]`` must be a
    multiple of 128. Computed in float32 (float64 stays float64), returned in x's dtype; jitted (``axis``
    static), usable inside jit."""
    shape = jnp.shape(x)
    if len(shape) == 0 or shape[axis] % BLOCK:
        raise ValueError(f"fwht: axis {axis} of shape {tuple(shape)} is not a multiple of {BLOCK}")
    return _fwht_jit(x, int(axis))


def _fwht(x, axis):
    x = jnp.asarray(x)
    dt = x.dtype
    ct = jnp.float64 if dt == jnp.float64 else jnp.float32
    xm = jnp.moveaxis(x.astype(ct), axis, -1)
    y = _fwht_unnormalized(xm) * jnp.asarray(1.0 / math.sqrt(BLOCK), ct)
    return jnp.moveaxis(y, -1, axis).astype(dt)


_fwht_jit = jax.jit(_fwht, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def rotate(x, k_pad: int):
    """``x [..., K]`` zero-padded to ``k_pad`` and rotated per 128-block (:func:`fwht`), in x's dtype."""
    return _fwht(pad_last(x, k_pad), -1)
