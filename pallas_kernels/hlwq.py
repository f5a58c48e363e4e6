"""HLWQ (Hadamard + Lloyd-Max) kernels: the per-128-block Walsh-Hadamard transform, and the rotated matmuls,
dense and grouped (per expert): ``y = fwht(x) @ (table[code] / sqrt(128) * norm)^T`` with the codes unpacked and
looked up inside the kernel.

The kernels read the checkpoint's LSB-first packing as it is: every 8 codes are ``bits`` bytes (the little-endian
integer ``sum_i code_i 2^(bits i)``), viewed for free as ``[N, K_pad/8, bits]``. Per 128-block the kernel loads
the ``bits`` byte planes ``[bn, 16]`` (one strided load each), shifts code ``i`` of every group out of them, looks
it up with a gather load from the (tiny, cached) table ref, scales by the block norm and multiplies with inputs
``8q + i`` (a strided load of x). Every kernel has a pure-jnp ``*_reference`` with the same signature.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .common import (GROUPED_GEMV_ROWS, KernelError, block_n, dense_plan, gather_rows, gemv_call, gemv_splits,
                     grouped_rows, le_words, mma_precision, poisoned_call, pow2_at_least, quant_matmul, split_k)

__all__ = ["hlwq_matmul", "hlwq_matmul_reference", "hlwq_grouped_matmul", "hlwq_grouped_matmul_reference", "fwht",
           "fwht_reference", "scaled_table", "unpack_lsb", "hadamard_matrix", "pair_tables", "gemv_launch",
           "GEMV_MAX_BITS"]

BLOCK = 128
Q = BLOCK // 8  # groups of 8 codes per block
_SQRT_BLOCK = np.float32(math.sqrt(BLOCK))


def scaled_table(table):
    """The levels / sqrt(128) in float32, by IEEE division (the divisor behind a barrier, so XLA does not turn it
    into a multiplication by the rounded reciprocal): what the codes index inside the kernels."""
    t = jnp.asarray(table, jnp.float32)
    return t / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.float32(_SQRT_BLOCK), t.shape))


def unpack_lsb(packed, bits: int):
    """LSB-first codes as stored: bytes ``[..., K*bits/8]`` (every ``bits`` bytes the little-endian integer
    ``sum_i code_i 2^(bits i)`` of 8 codes) -> int32 codes ``[..., K]``, read off the rows' little-endian bit
    streams."""
    *lead, nb = packed.shape
    stream = (packed.astype(jnp.int32)[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1  # [..., nb, 8]
    return jnp.sum(stream.reshape(*lead, nb * 8 // bits, bits) << jnp.arange(bits, dtype=jnp.int32), axis=-1)


@functools.lru_cache(maxsize=None)
def hadamard_matrix() -> np.ndarray:
    """The normalized 128 x 128 Sylvester-Walsh-Hadamard matrix ``(-1)^popcount(i & k) / sqrt(128)``, float32
    (Kronecker powers of ``[[1, 1], [1, -1]]``), read-only."""
    h = np.ones((1, 1))
    while h.shape[0] < BLOCK:
        h = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]]))
    h = (h / math.sqrt(BLOCK)).astype(np.float32)
    h.setflags(write=False)
    return h


def _step(x_ref, w_refs, e, row0, n0, kb, acc, *, bm, bn, bits):
    p_ref, nrm_ref, t_ref = w_refs
    q0 = kb * Q
    planes = [p_ref[e, pl.ds(n0, bn), pl.ds(q0, Q), b].astype(jnp.int32) for b in range(bits)]  # [bn, 16]
    norm = nrm_ref[e, pl.ds(n0, bn), pl.ds(kb, 1)].astype(jnp.float32)  # [bn, 1]
    mask = (1 << bits) - 1
    dims = (((1,), (1,)), ((), ()))
    for i in range(8):  # code i of each group: bits [bits*i, bits*i + bits) of the group's bytes
        j, o = divmod(bits * i, 8)
        v = planes[j] >> o
        if o + bits > 8:
            v = v | (planes[j + 1] << (8 - o))
        w = t_ref[e, v & mask] * norm  # [bn, 16]: inputs 128 kb + 8 q + i
        xs = x_ref[pl.ds(row0, bm), pl.ds(q0, Q), i]  # [bm, 16]
        acc = acc + jax.lax.dot_general(xs, w.astype(x_ref.dtype), dims, preferred_element_type=jnp.float32,
                                        precision=mma_precision(x_ref.dtype))
    return acc


GEMV_MAX_BITS = 6  # the GEMV's pair tables have 4^bits entries (16 K at 7 bits: the tensor-core path instead)


def pair_tables(table, bits: int):
    """table [..., 2^bits] -> (t0, t1) [rows, 4^bits]: for a ``2 bits``-bit field ``p`` holding two codes, the
    scaled level (/ sqrt(128)) of the first (``p & mask``) and of the second (``p >> bits``)."""
    tab = scaled_table(table).reshape(-1, 1 << bits)
    pair = jnp.arange(1 << (2 * bits))
    return tab[:, pair & ((1 << bits) - 1)], tab[:, pair >> bits]


def gemv_launch(n: int, kp: int, bits: int, m: int = 1, block_n_: int | None = None, groups: int | None = None,
                splits: int | None = None, visits: int = 1) -> dict:
    """Geometry of the HLWQ decode GEMV: ``bm`` rows per visit; a step reads ``bn`` weight rows x ``G`` groups of
    32 codes (``bits`` int32 words each) and their block norms, two steps ahead; K splits as for NVFP4
    (:func:`pallas_kernels.common.gemv_splits`)."""
    ng = kp // 32
    G = groups or next(g for g in (8, 4) if ng % g == 0)  # K_pad % 128 == 0: 4 always divides
    bn = block_n_ or block_n(n, 64)
    steps = ng // G
    per, splits = gemv_splits(steps, visits * (n // bn), splits)
    return {"bm": pow2_at_least(m, 1, 8), "bn": bn, "G": G, "per": per, "splits": splits, "steps": steps}


def _gemv(xr, packed, norms, table, bits: int, plan, geo: dict, *, interpret, poison, num_warps):
    """The HLWQ decode GEMV over a visit plan (dense: one visit): xr [R, K_pad] rotated (R a multiple of bm),
    packed [E, N, K_pad*bits/8], norms [E, N, K_pad/128], table [E or 1, 2^bits] -> fp32 partials
    ``[splits, V * bm, N]``.

    The bytes are read as int32 words, ``bits`` per group of 32 codes (the LSB-first stream: code ``i`` of a
    group is bits ``[bits i, bits i + bits)`` of its words), formed from the loaded bytes in the kernel
    (:func:`pallas_kernels.common.le_words`: a bitcast outside would copy the bank on the GPU). Codes are taken
    two at a time: one ``2 bits``-bit field, shifted out of one or two words, indexes two pair tables
    (``4^bits`` entries: the level of the first / second code), so a code costs half a field extraction and one
    table load. Activations are passed as ``[R, 32, K_pad/32]`` (input ``32 g + i`` at ``[i, g]``), so every
    activation load is contiguous."""
    r, kp = xr.shape
    E, n = packed.shape[0], packed.shape[1]
    ng = kp // 32
    bm, bn, G = geo["bm"], geo["bn"], geo["G"]
    x32 = xr.reshape(r, ng, 32).transpose(0, 2, 1)  # a few KB, fused into xr's producer
    t0, t1 = pair_tables(table, bits)  # [E or 1, 4^bits]
    te = (lambda e: 0) if t0.shape[0] == 1 else (lambda e: e)  # one table for every expert, or one each

    def load(refs, e, n0, kk):
        _, p_ref, n_ref, _, _ = refs
        return (tuple(le_words(p_ref[e, pl.ds(n0, bn), pl.ds(kk * G, G), b, :]) for b in range(bits)),  # [bn, G] each
                n_ref[e, pl.ds(n0, bn), pl.ds(kk * (G // 4), G // 4)].astype(jnp.float32))

    def step(refs, e, row0, kk, tile, acc):
        x_ref, _, _, t0_ref, t1_ref = refs
        planes, nrm = tile
        parts = [jnp.zeros((bn, G), jnp.float32) for _ in range(bm)]
        for i in range(0, 32, 2):  # codes i, i + 1 of every group: one field, one index into both tables
            a, sh = divmod(bits * i, 32)
            v = jax.lax.shift_right_logical(planes[a], jnp.int32(sh)) if sh else planes[a]
            if sh + 2 * bits > 32:
                v = v | (planes[a + 1] << (32 - sh))
            idx = v & ((1 << (2 * bits)) - 1)
            w0, w1 = t0_ref[te(e), idx], t1_ref[te(e), idx]  # [bn, G]
            for q in range(bm):
                x0 = x_ref[row0 + q, i, pl.ds(kk * G, G)].astype(jnp.float32)
                x1 = x_ref[row0 + q, i + 1, pl.ds(kk * G, G)].astype(jnp.float32)
                parts[q] = parts[q] + w0 * x0[None, :] + w1 * x1[None, :]
        return tuple(acc[q] + jnp.sum(parts[q].reshape(bn, G // 4, 4), axis=2) * nrm  # a norm per 4 groups
                     for q in range(bm))

    def finish(refs, e, acc_row):
        return jnp.sum(acc_row, axis=1)

    return gemv_call(load, step, finish, (x32, packed.reshape(E, n, ng, bits, 4), norms, t0, t1), plan, geo, n=n,
                     acc_cols=G // 4, interpret=interpret, poison=poison, num_warps=num_warps)


def _post(acc, w_refs, e):
    return acc


def check_operands(xr, packed, norms, table, bits, lead, what):
    if not 2 <= bits <= 8:
        raise KernelError(f"{what}: bits must be 2..8, got {bits}")
    if xr.ndim != 2 or xr.shape[1] % BLOCK:
        raise KernelError(f"{what}: xr must be [M, K_pad] with K_pad % 128 == 0, got {list(xr.shape)}")
    kp = xr.shape[1]
    if packed.dtype != jnp.uint8 or packed.ndim != 2 + len(lead) or packed.shape[:-2] != lead \
            or packed.shape[-1] != kp * bits // 8:
        raise KernelError(f"{what}: packed must be uint8 [{', '.join(map(str, lead + ('N',)))}, K_pad*bits/8="
                          f"{kp * bits // 8}], got {packed.dtype} {list(packed.shape)}")
    n = packed.shape[-2]
    if n % 16 or n == 0:
        raise KernelError(f"{what}: N={n} must be a positive multiple of 16")
    if norms.shape != (*lead, n, kp // BLOCK):
        raise KernelError(f"{what}: norms must be {[*lead, n, kp // BLOCK]}, got {list(norms.shape)}")
    if jnp.shape(table) not in ((*lead, 1 << bits), (1 << bits,)):
        raise KernelError(f"{what}: table must be [{', '.join(map(str, lead + (1 << bits,)))}], got "
                          f"{list(jnp.shape(table))}")
    return n, kp


def hlwq_matmul_reference(xr, packed, norms, table, bits: int):
    """xr [M, K_pad] (rotated activations, :func:`fwht` of the zero-padded input); packed uint8 [N, K_pad*bits/8]
    (LSB-first codes); norms [N, K_pad/128] f16; table [2^bits] f32 (N(0,1) levels) -> [M, N] in xr's dtype
    (``W = table[code] / sqrt(128) * norm`` in xr's dtype, fp32 accumulation)."""
    n, kp = packed.shape[0], xr.shape[1]
    w = jnp.take(scaled_table(table).reshape(-1), unpack_lsb(packed, bits), axis=0)
    w = (w.reshape(n, kp // BLOCK, BLOCK) * norms.astype(jnp.float32)[..., None]).reshape(n, kp)
    y = jax.lax.dot_general(xr, w.astype(xr.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(xr.dtype)


def _run(xr, packed, norms, table, bits, plan, e, n, bm, bn, splits, interpret, poison, num_warps, num_stages):
    r, kp = xr.shape
    weights = (packed.reshape(e, n, kp // 8, bits), norms.reshape(e, n, kp // BLOCK),
               jnp.broadcast_to(scaled_table(table), (e, 1 << bits)))
    return quant_matmul(functools.partial(_step, bits=bits), _post, xr.reshape(r, kp // 8, 8), weights, plan, n=n,
                        bm=bm, bn=bn, steps=kp // BLOCK, splits=splits, out_dtype=xr.dtype,
                        interpret=interpret, poison=poison, num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("bits", "interpret", "path", "splits", "block_n_", "num_warps",
                                             "num_stages", "poison"))
def hlwq_matmul(xr, packed, norms, table, bits: int, *, interpret: bool = False, path: str | None = None,
                splits: int | None = None, block_n_: int | None = None, num_warps: int = 4, num_stages: int = 2,
                poison: bool = False):
    """Pallas HLWQ rotated matmul; same signature and result as :func:`hlwq_matmul_reference` (N % 16 == 0).
    path "mma" (tensor-core dots) or "gemv" (decode, <= 8 rows, bits <= 6: see :func:`_gemv`); default "gemv"
    where it applies."""
    n, kp = check_operands(xr, packed, norms, table, bits, (), "hlwq_matmul")
    m = xr.shape[0]
    path = path or ("gemv" if m <= 8 and bits <= GEMV_MAX_BITS else "mma")
    if path == "gemv":
        if m > 8 or bits > GEMV_MAX_BITS:
            raise KernelError(f"hlwq_matmul: path='gemv' takes at most 8 rows and {GEMV_MAX_BITS} bits, got {m} "
                              f"rows of {bits}-bit codes")
        geo = gemv_launch(n, kp, bits, m, block_n_, None, splits)
        xp = jnp.pad(xr, ((0, geo["bm"] - m), (0, 0)))
        out = _gemv(xp, packed[None], norms[None], table, bits, dense_plan(geo["bm"], geo["bm"]), geo,
                    interpret=interpret, poison=poison, num_warps=num_warps)
        return out.sum(0)[:m].astype(xr.dtype)
    bm = pow2_at_least(m, 16, 64)
    bn = block_n_ or block_n(n, 64)
    mp = -(-m // bm) * bm
    xp = jnp.pad(xr, ((0, mp - m), (0, 0))) if mp != m else xr
    out = _run(xp, packed, norms, table, bits, dense_plan(mp, bm), 1, n, bm, bn, splits or 1, interpret, poison,
               num_warps, num_stages)
    return out[:m]


def hlwq_grouped_matmul_reference(xr, packed, norms, table, group_sizes, bits: int):
    """xr [R, K_pad] rotated rows sorted by expert; packed [E, N, K_pad*bits/8]; norms [E, N, K_pad/128]; table
    [E, 2^bits]; group_sizes int [E] (rows past ``sum(group_sizes)``: zeros) -> [R, N] in xr's dtype."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    er = jnp.searchsorted(ends, jnp.arange(xr.shape[0]), side="right")
    tab = jnp.broadcast_to(table, (packed.shape[0], 1 << bits))

    def one(e, y):
        return jnp.where((er == e)[:, None], hlwq_matmul_reference(xr, packed[e], norms[e], tab[e], bits), y)

    return jax.lax.fori_loop(0, packed.shape[0], one, jnp.zeros((xr.shape[0], packed.shape[1]), xr.dtype))


@functools.partial(jax.jit, static_argnames=("bits", "interpret", "block_m", "num_warps", "num_stages", "poison",
                                             "path"))
def hlwq_grouped_matmul(xr, packed, norms, table, group_sizes, bits: int, *, interpret: bool = False,
                        block_m: int | None = None, num_warps: int = 4, num_stages: int = 2, poison: bool = False,
                        path: str | None = None):
    """Pallas grouped (ragged, per-expert) HLWQ rotated matmul; same signature and result as
    :func:`hlwq_grouped_matmul_reference`. path "gemv" (default for at most ``GROUPED_GEMV_ROWS`` rows and
    bits <= 6, the MoE's decode: one visit per row through the decode GEMV) or "mma" (row tiles)."""
    E = packed.shape[0] if packed.ndim == 3 else 0
    n, kp = check_operands(xr, packed, norms, table, bits, (E,), "hlwq_grouped_matmul")
    path = path or ("gemv" if xr.shape[0] <= GROUPED_GEMV_ROWS and bits <= GEMV_MAX_BITS else "mma")
    if path == "gemv":
        xp, plan, src, _ = grouped_rows(xr, group_sizes, E, 1, "hlwq_grouped_matmul")
        out = _gemv(xp, packed, norms, table, bits, plan, gemv_launch(n, kp, bits, 1, visits=xr.shape[0]),
                    interpret=interpret, poison=poison, num_warps=num_warps)
        return gather_rows(out.sum(0).astype(xr.dtype), src)
    xp, plan, src, bm = grouped_rows(xr, group_sizes, E, block_m, "hlwq_grouped_matmul")
    bn = block_n(n, 64)
    out = _run(xp, packed, norms, table, bits, plan, E, n, bm, bn, split_k(kp // BLOCK, plan.shape[0] * (n // bn)),
               interpret, poison, num_warps, num_stages)
    return gather_rows(out, src)


# ------------------------------------------------------------------------------------------------ FWHT
def fwht_reference(x):
    """x [M, K] (K % 128 == 0) -> orthonormal Walsh-Hadamard transform of every 128-block, x's dtype (float32
    arithmetic): a block viewed as 7 binary axes, ``[[1, 1], [1, -1]]`` applied along each (least significant
    first), times 1 / sqrt(128)."""
    m, k = x.shape
    y = x.astype(jnp.float32).reshape(m, k // BLOCK, *([2] * 7))
    for ax in range(8, 1, -1):
        a, b = jnp.take(y, 0, axis=ax), jnp.take(y, 1, axis=ax)
        y = jnp.stack([a + b, a - b], axis=ax)
    return (y.reshape(m, k) * jnp.float32(1.0 / math.sqrt(BLOCK))).astype(x.dtype)


def _fwht_kernel(x_ref, h_ref, o_ref):
    y = jnp.dot(x_ref[...].astype(jnp.float32), h_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "poison"))
def fwht(x, *, interpret: bool = False, poison: bool = False):
    """Pallas FWHT: each program multiplies one [bm, 128] block by the normalized 128x128 Hadamard matrix
    (tensor cores on GPU); same signature and result (fp32 rounding aside) as :func:`fwht_reference`."""
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    if k % BLOCK:
        raise KernelError(f"fwht: x must be [M, K] with K % {BLOCK} == 0, got {list(x.shape)}")
    bm = pow2_at_least(m, 16, 64)
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    h = jnp.asarray(hadamard_matrix())
    out = poisoned_call(poison,
        _fwht_kernel, grid=(mp // bm, k // BLOCK),
        in_specs=[pl.BlockSpec((bm, BLOCK), lambda i, j: (i, j)), pl.BlockSpec((BLOCK, BLOCK), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((bm, BLOCK), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, k), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(xp, h)
    return out[:m]
