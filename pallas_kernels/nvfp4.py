"""NVFP4 W4A16 matmul: ``y = x @ W^T`` with W decoded from packed E2M1 codes and E4M3 block scales inside the
kernel (fp32 accumulation; on Hopper FP4 is a storage format).

Kernel layout ("planar"): the ModelOpt bytes (``packed[n, j]`` = codes k=2j low nibble, k=2j+1 high nibble) are
repacked once by :func:`to_planar` so that, per block of ``BK`` = 64 inputs, byte ``j`` holds input ``j`` in the
low nibble and input ``j + 32`` in the high nibble. The kernel then multiplies two contiguous 32-column halves
of x by the two nibble planes — no interleave, no gather, only ops the Triton lowering has. Same bytes, same
scales. ``nvfp4_matmul_reference`` has the same signature and is the pure-jnp definition.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import poisoned_call

__all__ = ["BK", "to_planar", "nvfp4_matmul", "nvfp4_matmul_reference", "decode_e2m1"]

BK = 64  # inputs per kernel K step (4 scale groups); 2688, 1856, 4096 and 10304 are multiples
HALF = BK // 2
GH = HALF // 16  # scale groups per half


def decode_e2m1(c):
    """E2M1 code (0..15, any int dtype) -> float32 value, by bit arithmetic (lowerable: no table gather)."""
    c = c.astype(jnp.int32)
    e = (c >> 1) & 3
    m = (c & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * jnp.exp2((e - 1).astype(jnp.float32)))
    return jnp.where((c & 8) != 0, -mag, mag)


def to_planar(packed: jax.Array) -> jax.Array:
    """ModelOpt packing ``[..., N, K/2]`` -> kernel packing (per 64 inputs: low nibble k, high nibble k + 32)."""
    *lead, n, kh = packed.shape
    k = kh * 2
    if k % BK:
        raise ValueError(f"NVFP4 kernel: K={k} must be a multiple of {BK}")
    lo, hi = packed & 0xF, packed >> 4
    codes = jnp.stack([lo, hi], -1).reshape(*lead, n, k // BK, 2, HALF)  # [.., blocks, (first|second half), 32]
    return (codes[..., 0, :] | (codes[..., 1, :] << 4)).reshape(*lead, n, kh).astype(jnp.uint8)


def nvfp4_matmul_reference(x, planar, scale, scale_2):
    """x [M, K]; planar [N, K/2] (see :func:`to_planar`); scale [N, K/16] e4m3; scale_2 [] f32 -> [M, N] x.dtype."""
    n, kh = planar.shape
    k = kh * 2
    p = planar.reshape(n, k // BK, HALF)
    codes = jnp.stack([p & 0xF, p >> 4], -2).reshape(n, k)
    w = decode_e2m1(codes) * (jnp.repeat(scale.astype(jnp.float32), 16, axis=1) * scale_2.astype(jnp.float32))
    y = jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _kernel(x_ref, p_ref, s_ref, s2_ref, o_ref, *, n_k: int):
    bn = p_ref.shape[0]
    first = jax.lax.broadcasted_iota(jnp.int32, (1, HALF), 1) < 16  # columns of the half's first scale group

    def step(kb, acc):
        p = p_ref[:, pl.ds(kb * HALF, HALF)].astype(jnp.int32)  # [bn, 32]
        for half, codes in ((0, p & 0xF), (1, p >> 4)):
            g = kb * 2 * GH + half * GH
            s0 = s_ref[:, pl.ds(g, 1)].astype(jnp.float32)  # [bn, 1]
            s1 = s_ref[:, pl.ds(g + 1, 1)].astype(jnp.float32)
            w = (decode_e2m1(codes) * jnp.where(first, s0, s1)).astype(x_ref.dtype)  # [bn, 32]
            xs = x_ref[:, pl.ds(kb * BK + half * HALF, HALF)]  # [bm, 32]
            acc = acc + jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, n_k, step, jnp.zeros((x_ref.shape[0], bn), jnp.float32))
    o_ref[...] = (acc * s2_ref[0, 0]).astype(o_ref.dtype)


def _blocks(m: int, n: int) -> tuple[int, int]:
    bm = 16
    while bm < min(m, 64):
        bm *= 2
    bn = 128 if n % 128 == 0 else (64 if n % 64 == 0 else (32 if n % 32 == 0 else 16))
    return bm, bn


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps", "num_stages", "block_n", "poison"))
def nvfp4_matmul(x, planar, scale, scale_2, *, interpret: bool = False, num_warps: int = 4, num_stages: int = 2,
                 block_n: int | None = None, poison: bool = False):
    """Pallas NVFP4 W4A16 matmul; same signature and result as :func:`nvfp4_matmul_reference`.

    Rows of x are padded to the M block (16..64); N must be a multiple of 16 and K of 256. GPU: Triton backend
    chosen explicitly (its default changed between JAX versions).
    """
    from jax.experimental.pallas import triton as pltriton

    m, k = x.shape
    n = planar.shape[0]
    if k % BK or planar.shape[1] * 2 != k or scale.shape != (n, k // 16) or n % 16:
        raise ValueError(f"nvfp4_matmul: x {x.shape}, planar {planar.shape}, scale {scale.shape}: need K % {BK} == 0, "
                         f"planar [N, K/2], scale [N, K/16], N % 16 == 0")
    bm, bn = _blocks(m, n)
    bn = block_n or bn
    mp = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    out = poisoned_call(poison,
        functools.partial(_kernel, n_k=k // BK),
        grid=(mp // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((bn, k // 2), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, k // 16), lambda i, j: (j, 0)), pl.BlockSpec((1, 1), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(xp, planar, scale, jnp.asarray(scale_2, jnp.float32).reshape(1, 1))
    return out[:m]
