"""NVFP4 W4A16 matmuls, dense and grouped: ``y = x @ W^T`` with W decoded from the ModelOpt bytes inside the
kernel (E2M1 codes, E4M3 block scales, fp32 per-tensor scale; fp32 accumulation — on Hopper FP4 is a storage
format).

The kernels read the checkpoint layout as it is (``packed[n, j]`` = code of input ``2j`` in the low nibble,
``2j + 1`` in the high nibble), viewed for free as ``[N, K/16, 8]`` so a scale group is an axis: per K step the
kernel loads ``[bn, G, 8]`` bytes and ``[bn, G]`` scales, decodes both nibble planes and multiplies them with the
even and odd inputs (strided loads of x). E2M1 decode is a bit move into float16 (``(c & 7) << 9 | sign << 15``
is the E2M1 value times ``2^-14``); no table, no gather. Each kernel has a pure-jnp ``*_reference`` with the same
signature.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import (KernelError, block_n, dense_plan, gather_rows, grouped_rows, mma_precision, pow2_at_least,
                     quant_matmul, split_k)

__all__ = ["nvfp4_matmul", "nvfp4_matmul_reference", "nvfp4_grouped_matmul", "nvfp4_grouped_matmul_reference",
           "decode_e2m1", "supported"]

_E2M1_F16 = 16384.0  # 2^14: the float16 reading of an E2M1 code is its value / 2^14


def decode_e2m1(c):
    """E2M1 codes (0..15, any int dtype) -> float32 values: the 3 magnitude bits moved to float16's exponent /
    mantissa boundary and the sign to its sign bit, read as float16, times 2^14 (subnormal 0.5 included)."""
    return _f16_e2m1(c.astype(jnp.int32)) * _E2M1_F16


def supported(n: int, k: int) -> bool:
    """Shapes the kernels take: N % 16 == 0 and K % 32 == 0 (two scale groups per step at least)."""
    return n % 16 == 0 and k % 32 == 0 and n > 0


def _groups_per_step(k: int) -> int:
    g = 8
    while (k // 16) % g:
        g //= 2
    return g


def _step(x_ref, w_refs, e, row0, n0, kk, acc, *, fma, bm, bn, G):
    p_ref, s_ref, _ = w_refs
    g0 = kk * G
    p = p_ref[e, pl.ds(n0, bn), pl.ds(g0, G), :].astype(jnp.int32)  # [bn, G, 8] bytes
    s = s_ref[e, pl.ds(n0, bn), pl.ds(g0, G)].astype(jnp.float32)[:, :, None] * _E2M1_F16  # [bn, G, 1]
    lo = _f16_e2m1(p & 15) * s  # inputs 16g + 2i
    hi = _f16_e2m1(p >> 4) * s  # inputs 16g + 2i + 1
    if fma:
        out = []
        for m in range(bm):
            xe = x_ref[pl.ds(row0 + m, 1), pl.ds(g0, G), pl.ds(0, 8, stride=2)].astype(jnp.float32)  # [1, G, 8]
            xo = x_ref[pl.ds(row0 + m, 1), pl.ds(g0, G), pl.ds(1, 8, stride=2)].astype(jnp.float32)
            out.append(acc[m] + jnp.sum(lo * xe + hi * xo, axis=2))  # [bn, G]
        return tuple(out)
    dt = x_ref.dtype
    xe = x_ref[pl.ds(row0, bm), pl.ds(g0, G), pl.ds(0, 8, stride=2)].reshape(bm, G * 8)
    xo = x_ref[pl.ds(row0, bm), pl.ds(g0, G), pl.ds(1, 8, stride=2)].reshape(bm, G * 8)
    dims = (((1,), (1,)), ((), ()))
    kw = dict(preferred_element_type=jnp.float32, precision=mma_precision(dt))
    acc = acc + jax.lax.dot_general(xe, lo.reshape(bn, G * 8).astype(dt), dims, **kw)
    return acc + jax.lax.dot_general(xo, hi.reshape(bn, G * 8).astype(dt), dims, **kw)


def _post(acc, w_refs, e):
    return acc * w_refs[2][e, 0]


def _f16_e2m1(c):
    """E2M1 code -> value / 2^14 (the 2^14 is folded into the scale)."""
    bits = (((c & 7) << 9) | ((c & 8) << 12)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _check(x, packed, scale, scale_2, lead: tuple[int, ...], what: str):
    if x.ndim != 2:
        raise KernelError(f"{what}: x must be [M, K], got shape {list(x.shape)}")
    k = x.shape[1]
    if packed.dtype != jnp.uint8 or packed.shape[:-2] != lead or packed.ndim != 2 + len(lead):
        raise KernelError(f"{what}: packed must be uint8 [{', '.join(map(str, lead + ('N', 'K/2')))}], got "
                          f"{packed.dtype} {list(packed.shape)}")
    n = packed.shape[-2]
    if packed.shape[-1] * 2 != k:
        raise KernelError(f"{what}: packed holds K={packed.shape[-1] * 2} inputs per row, x has K={k}")
    if not supported(n, k):
        raise KernelError(f"{what}: needs N % 16 == 0 and K % 32 == 0, got N={n}, K={k}")
    if scale.shape != (*lead, n, k // 16):
        raise KernelError(f"{what}: scale must be [{', '.join(map(str, lead))}{', ' if lead else ''}N, K/16] = "
                          f"{[*lead, n, k // 16]}, got {list(scale.shape)}")
    if jnp.shape(scale_2) not in (lead, ()):
        raise KernelError(f"{what}: scale_2 must have shape {list(lead)}, got {list(jnp.shape(scale_2))}")
    return n, k


def nvfp4_matmul_reference(x, packed, scale, scale_2):
    """x [M, K]; packed uint8 [N, K/2] (ModelOpt: low nibble = even input); scale e4m3 [N, K/16]; scale_2 []
    -> ``x @ W^T`` [M, N] in x's dtype (W in x's dtype, fp32 accumulation)."""
    from nemojax.quant.nvfp4 import dequantize

    w = dequantize(packed, scale, scale_2, x.dtype)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "path", "splits", "block_m", "block_n_", "num_warps",
                                             "num_stages", "poison"))
def nvfp4_matmul(x, packed, scale, scale_2, *, interpret: bool = False, path: str | None = None,
                 splits: int | None = None, block_m: int | None = None, block_n_: int | None = None,
                 num_warps: int = 4, num_stages: int = 2, poison: bool = False):
    """Pallas NVFP4 W4A16 matmul; same signature and result as :func:`nvfp4_matmul_reference`.

    path "mma" (tensor-core dots over 16..64-row tiles) or "gemv" (decode: up to 8 rows, multiply-add and
    reduce, split-K so N/bn x splits programs fill the GPU); default "gemv" for M <= 8. N % 16, K % 32.
    """
    n, k = _check(x, packed, scale, scale_2, (), "nvfp4_matmul")
    m = x.shape[0]
    path = path or ("gemv" if m <= 8 else "mma")
    G = _groups_per_step(k)
    steps = k // (16 * G)
    fma = G if path == "gemv" else 0
    if fma:
        if m > 8:
            raise KernelError(f"nvfp4_matmul: path='gemv' takes at most 8 rows, x has {m}")
        bm = block_m or pow2_at_least(m, 1, 8)
        bn = block_n_ or block_n(n, 64)
        splits = splits or split_k(steps, n // bn)
    else:
        bm = block_m or pow2_at_least(m, 16, 64)
        bn = block_n_ or block_n(n, 64)
        splits = splits or 1
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    weights = (packed.reshape(1, n, k // 16, 8), scale.reshape(1, n, k // 16),
               jnp.asarray(scale_2, jnp.float32).reshape(1, 1))
    out = quant_matmul(functools.partial(_step, G=G), _post, xp.reshape(mp, k // 16, 16), weights,
                       dense_plan(mp, bm), n=n, bm=bm, bn=bn, steps=steps, splits=splits, fma=fma,
                       out_dtype=x.dtype, interpret=interpret, poison=poison, num_warps=num_warps,
                       num_stages=num_stages)
    return out[:m]


def nvfp4_grouped_matmul_reference(x, packed, scale, scale_2, group_sizes):
    """x [R, K] rows sorted by expert; packed [E, N, K/2]; scale [E, N, K/16]; scale_2 [E]; group_sizes int [E]
    (rows ``sum(group_sizes)`` and beyond: zeros) -> ``y[r] = x[r] @ W_{e(r)}^T`` [R, N] in x's dtype."""
    from nemojax.quant.nvfp4 import dequantize

    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    er = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")

    def one(e, y):
        w = dequantize(packed[e], scale[e], scale_2[e], x.dtype)
        ye = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return jnp.where((er == e)[:, None], ye, y)

    y = jax.lax.fori_loop(0, packed.shape[0], one, jnp.zeros((x.shape[0], packed.shape[1]), jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_m", "num_warps", "num_stages", "poison"))
def nvfp4_grouped_matmul(x, packed, scale, scale_2, group_sizes, *, interpret: bool = False,
                         block_m: int | None = None, num_warps: int = 4, num_stages: int = 2, poison: bool = False):
    """Pallas grouped (ragged, per-expert) NVFP4 matmul; same signature and result as
    :func:`nvfp4_grouped_matmul_reference`. Visits only the row tiles of non-empty experts (see
    :func:`pallas_kernels.common.group_plan`), each reading that expert's bytes."""
    E = packed.shape[0] if packed.ndim == 3 else 0
    n, k = _check(x, packed, scale, scale_2, (E,), "nvfp4_grouped_matmul")
    xp, plan, src, bm = grouped_rows(x, group_sizes, E, block_m, "nvfp4_grouped_matmul")
    G = _groups_per_step(k)
    weights = (packed.reshape(E, n, k // 16, 8), scale.reshape(E, n, k // 16),
               jnp.asarray(scale_2, jnp.float32).reshape(E, 1))
    bn, steps = block_n(n, 64), k // (16 * G)
    out = quant_matmul(functools.partial(_step, G=G), _post, xp.reshape(-1, k // 16, 16), weights, plan, n=n,
                       bm=bm, bn=bn, steps=steps, splits=split_k(steps, plan.shape[0] * (n // bn)),
                       out_dtype=x.dtype, interpret=interpret, poison=poison, num_warps=num_warps,
                       num_stages=num_stages)
    return gather_rows(out, src)
