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

from .common import (GROUPED_GEMV_ROWS, KernelError, block_n, dense_plan, gather_rows, gemv_call, gemv_splits,
                     grouped_rows, le_words, mma_precision, pow2_at_least, quant_matmul, split_k)

__all__ = ["nvfp4_matmul", "nvfp4_matmul_reference", "nvfp4_grouped_matmul", "nvfp4_grouped_matmul_reference",
           "decode_e2m1", "dequantize_reference", "supported", "gemv_launch"]

_E2M1_F16 = 16384.0  # 2^14: the float16 reading of an E2M1 code is its value / 2^14


def decode_e2m1(c):
    """E2M1 codes (0..15, any int dtype) -> float32 values: the 3 magnitude bits moved to float16's exponent /
    mantissa boundary and the sign to its sign bit, read as float16, times 2^14 (subnormal 0.5 included)."""
    return _f16_e2m1(c.astype(jnp.int32)) * _E2M1_F16


def dequantize_reference(packed, scale, scale_2, dtype):
    """The ModelOpt bytes decoded: packed [..., N, K/2] (low nibble = even input), scale e4m3 [..., N, K/16],
    scale_2 [...] -> W [..., N, K] in ``dtype`` (each E2M1 value times its block scale times scale_2, in fp32)."""
    *lead, n, k2 = packed.shape
    p = packed.astype(jnp.int32)
    codes = jnp.stack([p & 15, p >> 4], axis=-1).reshape(*lead, n, 2 * k2)
    s = scale.astype(jnp.float32) * jnp.asarray(scale_2, jnp.float32)[..., None, None]
    w = decode_e2m1(codes).reshape(*lead, n, 2 * k2 // 16, 16) * s[..., None]
    return w.reshape(*lead, n, 2 * k2).astype(dtype)


def supported(n: int, k: int) -> bool:
    """Shapes the kernels take: N % 16 == 0 and K % 32 == 0 (two scale groups per step at least)."""
    return n % 16 == 0 and k % 32 == 0 and n > 0


def _groups_per_step(k: int) -> int:
    g = 8
    while (k // 16) % g:
        g //= 2
    return g


def _step(x_ref, w_refs, e, row0, n0, kk, acc, *, bm, bn, G):
    p_ref, s_ref, _ = w_refs
    g0 = kk * G
    p = p_ref[e, pl.ds(n0, bn), pl.ds(g0, G), :].astype(jnp.int32)  # [bn, G, 8] bytes
    s = s_ref[e, pl.ds(n0, bn), pl.ds(g0, G)].astype(jnp.float32)[:, :, None] * _E2M1_F16  # [bn, G, 1]
    lo = _f16_e2m1(p & 15) * s  # inputs 16g + 2i
    hi = _f16_e2m1(p >> 4) * s  # inputs 16g + 2i + 1
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


def _e2m1_pair(w, j: int):
    """Nibbles ``j`` and ``j + 4`` of int32 words ``w`` (inputs ``8 w + j`` and ``8 w + j + 4``) -> two fp32
    arrays, each the E2M1 value / 2^14: both nibbles moved at once into the two float16 halves of a word (three
    magnitude bits to the exponent / mantissa boundary, the sign to the sign bit), then each half read as
    float16. About 3 integer instructions per code instead of ~5 byte by byte."""
    mag = (w << (9 - 4 * j)) if j < 3 else (w >> 3)
    sgn = (w << (12 - 4 * j)) if j < 3 else w
    h = (mag & 0x0E000E00) | (sgn & jnp.int32(-2147450880))  # 0x80008000
    half = lambda b: jax.lax.bitcast_convert_type(b.astype(jnp.uint16), jnp.float16).astype(jnp.float32)  # noqa
    return half(h & 0xFFFF), half((h >> 16) & 0xFFFF)


def gemv_launch(n: int, k: int, m: int = 1, block_n_: int | None = None, words: int | None = None,
                splits: int | None = None, visits: int = 1) -> dict:
    """Geometry of the decode GEMV: ``bm`` rows per visit, a step reads ``bn`` weight rows x ``bw`` int32 words
    (8 codes each; bw divides K/8, no tail), loads run two steps ahead, and K splits bring the ``visits x N/bn``
    column blocks to ~4 programs per H100 SM with at least 2 steps each (``tools/kernel_sass.py`` reads the
    loop)."""
    kw = k // 8
    bw = words or next(b for b in (16, 8, 4) if kw % b == 0)  # K % 32 == 0: 4 always divides
    bn = block_n_ or (128 if bw < 16 and n % 128 == 0 else block_n(n, 64))
    steps = kw // bw
    per, splits = gemv_splits(steps, visits * (n // bn), splits)
    return {"bm": pow2_at_least(m, 1, 8), "bn": bn, "bw": bw, "per": per, "splits": splits, "steps": steps}


def _gemv(x, packed, scale, scale_2, plan, geo: dict, *, interpret, poison, num_warps):
    """The decode GEMV over a visit plan (:func:`pallas_kernels.common.group_plan`; dense: one visit): x [R, K]
    (R a multiple of bm), packed [E, N, K/2], scale [E, N, K/16], scale_2 [E] -> fp32 partials
    ``[splits, V * bm, N]`` (see :func:`pallas_kernels.common.gemv_call`). A step loads ``4 bw`` bytes per row
    (16-byte loads) and reads them as ``bw`` int32 words (:func:`pallas_kernels.common.le_words`)."""
    r, k = x.shape
    E, n, kw = packed.shape[0], packed.shape[1], k // 8
    bm, bn, bw = geo["bm"], geo["bn"], geo["bw"]
    x8 = x.reshape(r, kw, 8).transpose(0, 2, 1)  # input 8 w + j at [j, w]: a few KB, fused into x's producer

    def load(refs, e, n0, kk):
        _, p_ref, s_ref, _ = refs
        return (le_words(p_ref[e, pl.ds(n0, bn), pl.ds(kk * 4 * bw, 4 * bw)].reshape(bn, bw, 4)),
                s_ref[e, pl.ds(n0, bn), pl.ds(kk * (bw // 2), bw // 2)].astype(jnp.float32))

    def step(refs, e, row0, kk, tile, acc):
        x_ref = refs[0]
        w, s = tile
        out = []
        for i in range(bm):
            part = jnp.zeros((bn, bw), jnp.float32)
            for j in range(4):
                wl, wh = _e2m1_pair(w, j)
                xl = x_ref[row0 + i, j, pl.ds(kk * bw, bw)].astype(jnp.float32)
                xh = x_ref[row0 + i, j + 4, pl.ds(kk * bw, bw)].astype(jnp.float32)
                part = part + wl * xl[None, :] + wh * xh[None, :]
            out.append(acc[i] + jnp.sum(part.reshape(bn, bw // 2, 2), axis=2) * s)  # a scale per 2 words
        return tuple(out)

    def finish(refs, e, acc_row):
        return jnp.sum(acc_row, axis=1) * (refs[3][e] * _E2M1_F16)  # the pairs are E2M1 values / 2^14

    s2 = jnp.asarray(scale_2, jnp.float32).reshape(E)
    return gemv_call(load, step, finish, (x8, packed, scale, s2), plan, geo, n=n, acc_cols=bw // 2,
                     interpret=interpret, poison=poison, num_warps=num_warps)


def check_operands(x, packed, scale, scale_2, lead: tuple[int, ...], what: str):
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
    w = dequantize_reference(packed, scale, scale_2, x.dtype)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "path", "splits", "block_m", "block_n_", "num_warps",
                                             "num_stages", "poison"))
def nvfp4_matmul(x, packed, scale, scale_2, *, interpret: bool = False, path: str | None = None,
                 splits: int | None = None, block_m: int | None = None, block_n_: int | None = None,
                 num_warps: int = 4, num_stages: int = 2, poison: bool = False):
    """Pallas NVFP4 W4A16 matmul; same signature and result as :func:`nvfp4_matmul_reference`.

    path "mma" (tensor-core dots over 16..64-row tiles) or "gemv" (decode: up to 8 rows, the codes read as int32
    words and decoded two at a time, multiply-add, the next step's loads in flight, split-K; see
    :func:`gemv_launch`); default "gemv" for M <= 8. N % 16, K % 32.
    """
    n, k = check_operands(x, packed, scale, scale_2, (), "nvfp4_matmul")
    m = x.shape[0]
    path = path or ("gemv" if m <= 8 else "mma")
    if path == "gemv":
        if m > 8:
            raise KernelError(f"nvfp4_matmul: path='gemv' takes at most 8 rows, x has {m}")
        geo = gemv_launch(n, k, m, block_n_, None, splits)
        xp = jnp.pad(x, ((0, geo["bm"] - m), (0, 0)))
        out = _gemv(xp, packed[None], scale[None], scale_2, dense_plan(geo["bm"], geo["bm"]), geo,
                    interpret=interpret, poison=poison, num_warps=num_warps)
        return out.sum(0)[:m].astype(x.dtype)
    G = _groups_per_step(k)
    steps = k // (16 * G)
    bm = block_m or pow2_at_least(m, 16, 64)
    bn = block_n_ or block_n(n, 64)
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    weights = (packed.reshape(1, n, k // 16, 8), scale.reshape(1, n, k // 16),
               jnp.asarray(scale_2, jnp.float32).reshape(1, 1))
    out = quant_matmul(functools.partial(_step, G=G), _post, xp.reshape(mp, k // 16, 16), weights,
                       dense_plan(mp, bm), n=n, bm=bm, bn=bn, steps=steps, splits=splits or 1,
                       out_dtype=x.dtype, interpret=interpret, poison=poison, num_warps=num_warps,
                       num_stages=num_stages)
    return out[:m]


def nvfp4_grouped_matmul_reference(x, packed, scale, scale_2, group_sizes):
    """x [R, K] rows sorted by expert; packed [E, N, K/2]; scale [E, N, K/16]; scale_2 [E]; group_sizes int [E]
    (rows ``sum(group_sizes)`` and beyond: zeros) -> ``y[r] = x[r] @ W_{e(r)}^T`` [R, N] in x's dtype."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    er = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")

    def one(e, y):
        w = dequantize_reference(packed[e], scale[e], scale_2[e], x.dtype)
        ye = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return jnp.where((er == e)[:, None], ye, y)

    y = jax.lax.fori_loop(0, packed.shape[0], one, jnp.zeros((x.shape[0], packed.shape[1]), jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_m", "num_warps", "num_stages", "poison", "path"))
def nvfp4_grouped_matmul(x, packed, scale, scale_2, group_sizes, *, interpret: bool = False,
                         block_m: int | None = None, num_warps: int = 4, num_stages: int = 2, poison: bool = False,
                         path: str | None = None):
    """Pallas grouped (ragged, per-expert) NVFP4 matmul; same signature and result as
    :func:`nvfp4_grouped_matmul_reference`. Visits only the row tiles of non-empty experts (see
    :func:`pallas_kernels.common.group_plan`), each reading that expert's bytes. path "gemv" (default for at most
    ``GROUPED_GEMV_ROWS`` rows, the MoE's decode: one visit per row through the decode GEMV, so a token's
    experts cost their bytes and no padded rows) or "mma" (row tiles of 16..64 on the tensor cores)."""
    E = packed.shape[0] if packed.ndim == 3 else 0
    n, k = check_operands(x, packed, scale, scale_2, (E,), "nvfp4_grouped_matmul")
    path = path or ("gemv" if x.shape[0] <= GROUPED_GEMV_ROWS else "mma")
    if path == "gemv":
        xp, plan, src, _ = grouped_rows(x, group_sizes, E, 1, "nvfp4_grouped_matmul")
        geo = gemv_launch(n, k, 1, visits=x.shape[0])
        out = _gemv(xp, packed, scale, scale_2, plan, geo, interpret=interpret, poison=poison, num_warps=num_warps)
        return gather_rows(out.sum(0).astype(x.dtype), src)
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
