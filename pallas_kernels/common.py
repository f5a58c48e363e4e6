"""Shared kernel plumbing: NaN-poisoned outputs, the visit plan of a (grouped) matmul, and the one driver every
quantized matmul kernel runs through.

A *visit* is one (expert, row tile) pair: ``plan[v] = (expert, tile, lo, hi)`` says that rows ``tile * bm + lo``
to ``tile * bm + hi`` of the (sorted) activations belong to ``expert``. A dense matmul is the plan of one expert
over every row tile; a grouped (ragged, per-expert) matmul visits only the tiles each non-empty expert touches
(a tile that straddles two experts is visited twice, each visit keeping its own rows), so the work is
O(rows + experts * bm), never O(rows * experts). Program ``(v, j, s)`` computes output rows of visit ``v``,
columns ``j * bn ...``, over the ``s``-th of ``splits`` K ranges (split-K: partial sums added afterwards).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["poisoned_call", "dense_plan", "group_plan", "grouped_rows", "gather_rows", "quant_matmul", "pow2_at_least",
           "block_n", "split_k", "gemv_splits", "gemv_call", "le_words", "mma_precision", "KernelError",
           "GROUPED_GEMV_ROWS"]

GROUPED_GEMV_ROWS = 64  # grouped calls with up to this many rows (MoE decode: tokens x top-k) take the GEMV path


class KernelError(ValueError):
    """Arguments a kernel cannot take (shapes, dtypes); the message names the argument."""


def poisoned_call(poison: bool, kernel, *, in_specs, out_specs, out_shape, **kw):
    """``pl.pallas_call(kernel, ...)``; with ``poison`` the output buffer starts as NaN (an extra input aliased to
    the output), so a tile the kernel never writes shows up in tests instead of reading as stale memory."""
    if not poison:
        return pl.pallas_call(kernel, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kw)
    n_in = len(in_specs)

    def body(*refs):
        return kernel(*refs[:n_in], refs[-1])  # drop the aliased poison input

    call = pl.pallas_call(body, in_specs=[*in_specs, out_specs], out_specs=out_specs, out_shape=out_shape,
                          input_output_aliases={n_in: 0}, **kw)
    return lambda *args: call(*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))


def mma_precision(dtype):
    """Tensor-core dot precision for ``dtype`` inputs: float32 activations get full fp32 products (Triton's
    default for float32 is TF32, 10-bit mantissas, which would make the kernels disagree with an fp32 reference
    and flip W4A4 activation codes); bf16 / fp16 inputs are exact in the MMA anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def pow2_at_least(m: int, lo: int = 1, hi: int = 64) -> int:
    b = lo
    while b < min(m, hi):
        b *= 2
    return b


def split_k(steps: int, programs: int, target: int = 264) -> int:
    """K splits so that ``programs`` x splits reaches ~``target`` (2 programs per H100 SM), at most ``steps``."""
    return max(1, min(steps, -(-target // max(programs, 1))))


def gemv_splits(steps: int, blocks: int, splits: int | None = None, target: int = 528) -> tuple[int, int]:
    """(steps per program, K splits) of a decode GEMV with ``blocks`` (visit x column) blocks: ~``target`` programs
    (4 per H100 SM), each at least 2 steps so its loads two steps ahead overlap something (an explicit
    ``splits`` is taken as asked, down to 1 step per program)."""
    want = splits or -(-target // max(blocks, 1))
    per = min(steps, max(2 if splits is None else 1, steps // max(1, want)))
    return per, -(-steps // per)


def block_n(n: int, prefer: int = 64) -> int:
    """Largest power-of-two column block <= ``prefer`` dividing ``n`` (n % 16 == 0)."""
    b = prefer
    while n % b:
        b //= 2
    return b


def dense_plan(rows: int, bm: int) -> jax.Array:
    """Plan of a dense matmul: expert 0 over every row tile, all rows kept. int32 [tiles, 4]."""
    t = jnp.arange(-(-rows // bm), dtype=jnp.int32)
    return jnp.stack([jnp.zeros_like(t), t, jnp.zeros_like(t), jnp.full_like(t, bm)], 1)


def group_plan(group_sizes: jax.Array, rows: int, bm: int):
    """Plan of a grouped matmul over ``rows`` sorted rows, ``group_sizes [E]`` (rows ``sum(group_sizes)`` and
    beyond belong to no group and give zeros). Returns ``(plan int32 [V, 4], src int32 [rows])``: ``V = tiles +
    min(E, rows) - 1`` visits, ``rows`` when ``bm == 1`` (a static bound: at most ``min(E, rows)`` groups are
    non-empty, and only a tile of several rows can straddle two; unused visits have
    ``lo == hi`` and write nothing) and, per row, its output row in the kernel's visit-major output (``-1``: no
    group)."""
    gs = group_sizes.astype(jnp.int32)
    E = gs.shape[0]
    ends = jnp.cumsum(gs)
    starts = ends - gs
    first = starts // bm
    ntiles = jnp.where(gs > 0, (ends - 1) // bm - first + 1, 0)
    cum = jnp.cumsum(ntiles)
    before = cum - ntiles
    V = max(1, -(-rows // bm) + (min(E, rows) - 1 if bm > 1 else 0))  # one-row tiles never straddle experts
    v = jnp.arange(V, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, v, side="right").astype(jnp.int32), E - 1)
    t = first[g] + v - before[g]
    valid = v < cum[-1]
    lo = jnp.where(valid, jnp.clip(starts[g] - t * bm, 0, bm), 0)
    hi = jnp.where(valid, jnp.clip(ends[g] - t * bm, 0, bm), 0)
    plan = jnp.stack([jnp.where(valid, g, 0), jnp.where(valid, t, 0), lo, hi], 1).astype(jnp.int32)
    r = jnp.arange(rows, dtype=jnp.int32)
    er = jnp.minimum(jnp.searchsorted(ends, r, side="right").astype(jnp.int32), E - 1)
    src = (before[er] + r // bm - first[er]) * bm + r % bm
    return plan, jnp.where(r < ends[-1], src, -1)


def grouped_rows(x, group_sizes, n_experts: int, block_m: int | None, what: str):
    """Checks ``group_sizes``, picks the row tile (16..64, near the mean rows per expert), pads ``x`` to whole
    tiles and builds the plan: ``(x_padded, plan, src, bm)``."""
    if group_sizes.shape != (n_experts,):
        raise KernelError(f"{what}: group_sizes must be [E={n_experts}], got {list(group_sizes.shape)}")
    r = x.shape[0]
    bm = block_m or pow2_at_least(r // max(n_experts, 1), 16, 64)
    rp = -(-r // bm) * bm
    plan, src = group_plan(group_sizes, r, bm)
    return (jnp.pad(x, ((0, rp - r), (0, 0))) if rp != r else x), plan, src, bm


def gather_rows(out: jax.Array, src: jax.Array) -> jax.Array:
    """Rows ``src`` of the visit-major kernel output (zeros where ``src < 0``)."""
    y = jnp.take(out, jnp.maximum(src, 0), axis=0)
    return jnp.where((src >= 0)[:, None], y, jnp.zeros((), y.dtype))


def le_words(b):
    """Bytes ``[..., 4]`` (uint8, as loaded) -> the little-endian int32 words ``[...]``. The kernels take the
    checkpoint's uint8 arrays and form words here: outside, ``bitcast_convert_type`` to a wider type is not a
    view on the GPU (XLA expands it into a fusion that writes a copy of the whole bank on every call). Applied to
    freshly loaded bytes, the compiled loop is the same as for int32 loads (``tools/kernel_sass.py``): the shifts
    and sum fold into the registers the 16-byte loads fill. (Carried through the loop as bytes instead, the tile
    costs ~35% more instructions in byte moves.)"""
    return jnp.sum(b.astype(jnp.int32) << (jax.lax.broadcasted_iota(jnp.int32, b.shape, b.ndim - 1) * 8), axis=-1)


def gemv_call(load, step, finish, operands: tuple, plan: jax.Array, geo: dict, *, n: int, acc_cols: int,
              interpret: bool, poison: bool, num_warps: int = 4) -> jax.Array:
    """The driver of the decode GEMVs (``nvfp4._gemv``, ``hlwq._gemv``). Program ``(v, j, s)`` computes the
    ``bm`` rows of visit ``v`` (``plan[v] = (expert, tile, lo, hi)``; ``lo == hi``: nothing), columns
    ``j * bn ...``, over the ``s``-th of ``geo["splits"]`` K ranges of ``geo["per"]`` steps, each step's weights
    loaded two steps ahead (ptxas issues a load late in the step that requests it: one step ahead would leave its
    latency exposed).

    load(refs, e, n0, kk) -> tile (a tuple of arrays: step ``kk``'s weights of expert ``e``, rows ``n0...``);
    step(refs, e, row0, kk, tile, acc) -> acc (a tuple of ``bm`` fp32 ``[bn, acc_cols]``, activation rows
    ``row0...``); finish(refs, e, acc_row) -> the fp32 ``[bn]`` output row. ``operands`` are passed whole.
    Returns fp32 partials ``[splits, V * bm, n]``."""
    bm, bn, per, steps = geo["bm"], geo["bn"], geo["per"], geo["steps"]
    V = plan.shape[0]

    def kernel(plan_ref, *refs):
        refs, o_ref = refs[:-1], refs[-1]
        e, t, lo, hi = plan_ref[0, 0], plan_ref[0, 1], plan_ref[0, 2], plan_ref[0, 3]
        n0 = pl.program_id(1) * bn
        lo_step = pl.program_id(2) * per
        hi_step = jnp.minimum(lo_step + per, steps)

        def fetch(kk):  # past the split's last step: reload it (in bounds, unused)
            return load(refs, e, n0, jnp.minimum(kk, hi_step - 1))

        def body(kk, carry):
            acc, tile, ahead = carry
            nxt = fetch(kk + 2)
            return step(refs, e, t * bm, kk, tile, acc), ahead, nxt

        @pl.when(hi > lo)
        def _():
            acc0 = tuple(jnp.zeros((bn, acc_cols), jnp.float32) for _ in range(bm))
            acc, _, _ = jax.lax.fori_loop(lo_step, hi_step, body, (acc0, fetch(lo_step), fetch(lo_step + 1)))
            for i in range(bm):
                o_ref[0, pl.ds(i, 1), :] = finish(refs, e, acc[i])[None, :]

    from jax.experimental.pallas import triton as pltriton  # GPU backend chosen explicitly: Triton

    whole = lambda a: pl.BlockSpec(a.shape, lambda v, j, sp, nd=a.ndim: (0,) * nd)  # noqa: E731
    return poisoned_call(
        poison, kernel, grid=(V, n // bn, geo["splits"]),
        in_specs=[pl.BlockSpec((1, 4), lambda v, j, sp: (v, 0)), *(whole(a) for a in operands)],
        out_specs=pl.BlockSpec((1, bm, bn), lambda v, j, sp: (sp, v, j)),
        out_shape=jax.ShapeDtypeStruct((geo["splits"], V * bm, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(plan, *operands)


def quant_matmul(step, post, x, weights: tuple, plan: jax.Array, *, n: int, bm: int, bn: int, steps: int,
                 splits: int = 1, out_dtype, interpret: bool, poison: bool, num_warps: int = 4,
                 num_stages: int = 2) -> jax.Array:
    """The driver of the tensor-core ("mma") quantized matmul kernels (the decode GEMVs have their own:
    ``nvfp4._gemv``, ``hlwq._gemv``).

    step(x_ref, w_refs, e, row0, n0, kk, acc, bm, bn) -> acc: one K step of the format (decode the codes of
    expert ``e``, rows ``n0:n0+bn``, step ``kk``; multiply with activation rows ``row0:row0+bm`` into the fp32
    ``[bm, bn]`` acc on the tensor cores). post(acc, w_refs, e) -> acc: per-expert epilogue.
    x and weights are passed whole (the kernel indexes them); plan int32 [V, 4] (see :func:`group_plan`).
    Returns the visit-major output ``[V * bm, n]`` (split-K partials summed, in fp32 when ``splits > 1``).
    """
    V = plan.shape[0]
    per = -(-steps // splits)
    splits = -(-steps // per)  # no empty K range
    odt = jnp.float32 if splits > 1 else out_dtype
    nw = len(weights)

    def kernel(plan_ref, x_ref, *refs):
        w_refs, o_ref = refs[:nw], refs[nw]
        e, t, lo, hi = plan_ref[0, 0], plan_ref[0, 1], plan_ref[0, 2], plan_ref[0, 3]
        n0 = pl.program_id(1) * bn
        k_lo = pl.program_id(2) * per
        k_hi = jnp.minimum(k_lo + per, steps)
        body = functools.partial(step, x_ref, w_refs, e, t * bm, n0, bm=bm, bn=bn)

        @pl.when(hi > lo)  # an unused visit of a grouped plan writes nothing: its rows are never gathered
        def _():
            acc = jax.lax.fori_loop(k_lo, k_hi, lambda kk, a: body(kk, a), jnp.zeros((bm, bn), jnp.float32))
            row = jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
            acc = jnp.where((row >= lo) & (row < hi), post(acc, w_refs, e), 0.0)
            o_ref[...] = acc.astype(o_ref.dtype)

    from jax.experimental.pallas import triton as pltriton  # GPU backend chosen explicitly: Triton

    whole = lambda a: pl.BlockSpec(a.shape, lambda v, j, s, nd=a.ndim: (0,) * nd)  # noqa: E731
    out = poisoned_call(
        poison, kernel, grid=(V, n // bn, splits),
        in_specs=[pl.BlockSpec((1, 4), lambda v, j, s: (v, 0)), whole(x), *(whole(w) for w in weights)],
        out_specs=pl.BlockSpec((bm, bn), lambda v, j, s: (s * V + v, j)),
        out_shape=jax.ShapeDtypeStruct((splits * V * bm, n), odt),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(plan, x, *weights)
    if splits > 1:
        out = out.reshape(splits, V * bm, n).sum(0).astype(out_dtype)
    return out
