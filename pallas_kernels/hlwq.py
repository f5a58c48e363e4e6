"""HLWQ (Hadamard + Lloyd-Max) kernels: the per-128-block Walsh-Hadamard transform, and the rotated matmul
``y = fwht(x) @ (table[code] / sqrt(128) * norm)^T`` with codes unpacked and looked up inside the kernel.

Kernel layout ("planar", 5 bits per weight as the checkpoint): per row and 128-block, ``bits`` bit-planes of
16 bytes; byte ``j`` of plane ``b`` holds bit ``b`` of codes ``j + 16 i`` in its bit ``i`` (i = 0..7). A code
sub-block of 16 is then ``sum_b ((plane_b >> i) & 1) << b`` — shifts and masks only — and the Lloyd-Max lookup
is a select chain (a gather does not lower to Triton). :func:`to_planar` repacks the LSB-first checkpoint bytes
once. Every kernel has a pure-jnp ``*_reference`` with the same signature.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .common import poisoned_call

__all__ = ["to_planar", "hlwq_matmul", "hlwq_matmul_reference", "fwht", "fwht_reference"]

BLOCK = 128
SUB = 16  # codes per sub-block (one byte column of each plane)


def to_planar(codes: jax.Array, bits: int) -> jax.Array:
    """codes uint8 ``[N, K_pad]`` -> planar bytes ``[N, K_pad / 128 * 16 * bits]``."""
    n, kp = codes.shape
    c = codes.astype(jnp.uint8).reshape(n, kp // BLOCK, 8, SUB)  # [n, blk, i, j]: code j + 16 i
    planes = []
    for b in range(bits):
        bit = (c >> b) & 1  # [n, blk, i, j]
        planes.append(jnp.sum(bit.astype(jnp.uint32) << jnp.arange(8, dtype=jnp.uint32)[None, None, :, None],
                              axis=2).astype(jnp.uint8))  # [n, blk, j]
    return jnp.stack(planes, 2).reshape(n, kp // BLOCK * bits * SUB)


def _codes_from_planar(planar, bits: int):
    n, nb = planar.shape
    blocks = nb // (bits * SUB)
    p = planar.reshape(n, blocks, bits, 1, SUB).astype(jnp.int32)
    i = jnp.arange(8)[None, None, :, None]
    code = sum(((p[:, :, b] >> i) & 1) << b for b in range(bits))  # [n, blk, 8, 16]
    return code.reshape(n, blocks * BLOCK)


def hlwq_matmul_reference(xr, planar, norms, table, bits: int):
    """xr [M, K_pad] (rotated activations); planar codes; norms [N, K_pad/128] f16; table [2^bits] f32 (N(0,1)
    levels) -> [M, N] in xr's dtype (fp32 accumulation)."""
    codes = _codes_from_planar(planar, bits)
    w = jnp.take(table.astype(jnp.float32) / jnp.float32(math.sqrt(BLOCK)), codes, axis=0)
    n, kp = codes.shape
    w = (w.reshape(n, kp // BLOCK, BLOCK) * norms.astype(jnp.float32)[..., None]).reshape(n, kp)
    y = jax.lax.dot_general(xr, w.astype(xr.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(xr.dtype)


def _hlwq_kernel(x_ref, p_ref, n_ref, t_ref, o_ref, *, n_blocks: int, bits: int):
    bn = p_ref.shape[0]
    levels = [t_ref[0, t] for t in range(1 << bits)]

    def step(kb, acc):
        planes = [p_ref[:, pl.ds((kb * bits + b) * SUB, SUB)].astype(jnp.int32) for b in range(bits)]
        norm = n_ref[:, pl.ds(kb, 1)].astype(jnp.float32)  # [bn, 1]
        for i in range(8):
            code = planes[0] >> i & 1
            for b in range(1, bits):
                code = code | ((planes[b] >> i & 1) << b)
            val = jnp.zeros(code.shape, jnp.float32)
            for t, lv in enumerate(levels):
                val = jnp.where(code == t, lv, val)
            w = (val * norm).astype(x_ref.dtype)  # [bn, 16]
            xs = x_ref[:, pl.ds(kb * BLOCK + i * SUB, SUB)]
            acc = acc + jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, n_blocks, step, jnp.zeros((x_ref.shape[0], bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _bm(m: int) -> int:
    bm = 16
    while bm < min(m, 64):
        bm *= 2
    return bm


@functools.partial(jax.jit, static_argnames=("bits", "interpret", "num_warps", "num_stages", "poison"))
def hlwq_matmul(xr, planar, norms, table, bits: int, *, interpret: bool = False, num_warps: int = 4,
                num_stages: int = 2, poison: bool = False):
    """Pallas HLWQ rotated matmul; same signature and result as :func:`hlwq_matmul_reference` (N % 16 == 0)."""
    from jax.experimental.pallas import triton as pltriton

    m, kp = xr.shape
    n = planar.shape[0]
    if kp % BLOCK or planar.shape[1] != kp // BLOCK * bits * SUB or norms.shape != (n, kp // BLOCK) or n % 16:
        raise ValueError(f"hlwq_matmul: xr {xr.shape}, planar {planar.shape}, norms {norms.shape} do not match "
                         f"{bits}-bit planar codes of [N % 16 == 0, K_pad % 128 == 0]")
    bm = _bm(m)
    bn = 64 if n % 64 == 0 else (32 if n % 32 == 0 else 16)
    mp = -(-m // bm) * bm
    xp = jnp.pad(xr, ((0, mp - m), (0, 0))) if mp != m else xr
    scaled = (table.astype(jnp.float32) / jnp.float32(math.sqrt(BLOCK))).reshape(1, -1)
    out = poisoned_call(poison,
        functools.partial(_hlwq_kernel, n_blocks=kp // BLOCK, bits=bits),
        grid=(mp // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, planar.shape[1]), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, kp // BLOCK), lambda i, j: (j, 0)),
                  pl.BlockSpec((1, 1 << bits), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), xr.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(xp, planar, norms, scaled)
    return out[:m]


# ------------------------------------------------------------------------------------------------ FWHT
def fwht_reference(x):
    """x [M, K] (K % 128 == 0) -> orthonormal Walsh-Hadamard transform of every 128-block, x's dtype."""
    from nemojax.quant.hlwq import fwht as _fwht

    return _fwht(x)


def _fwht_kernel(x_ref, h_ref, o_ref):
    y = jnp.dot(x_ref[...].astype(jnp.float32), h_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "poison"))
def fwht(x, *, interpret: bool = False, poison: bool = False):
    """Pallas FWHT: each program multiplies one [bm, 128] block by the normalized 128x128 Hadamard matrix
    (tensor cores on GPU); same signature and result (fp32 rounding aside) as :func:`fwht_reference`."""
    from jax.experimental.pallas import triton as pltriton

    from nemojax.quant.hlwq import hadamard

    m, k = x.shape
    if k % BLOCK:
        raise ValueError(f"fwht: last dimension {k} is not a multiple of {BLOCK}")
    bm = _bm(m)
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    h = jnp.asarray(np.asarray(hadamard(BLOCK), np.float32))
    out = poisoned_call(poison,
        _fwht_kernel, grid=(mp // bm, k // BLOCK),
        in_specs=[pl.BlockSpec((bm, BLOCK), lambda i, j: (i, j)), pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((bm, BLOCK), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, k), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(xp, h)
    return out[:m]
