"""HLWQ products of a few rows on a CPU that read only the packed codes (the "cpu" backend's HLWQ kernel).

``x W^T = (H x)(W H)^T`` blockwise (``weight``'s "rotated" identity): the activation is rotated once, and ``W H``
is ``table[code] / sqrt(128) * norm``, a table lookup with no Hadamard on the weights. Here that is decoded 64
weight rows at a time into float32 tiles that stay in cache, so a decode step reads the packed codes and never
writes a dequantized copy of the weight.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..base import tile_rows
from .codebook import check_bits
from .codes import scaled_table
from .hadamard import BLOCK

__all__ = ["rows_product"]

GROUP = 8  # codes per group of ``bits`` bytes in the LSB-first packing (``packing.pack_lsb``)


def _word(p: jax.Array, lo: int, hi: int) -> jax.Array:
    """Bytes ``lo:hi`` (at most 4) of every group ``p [..., G, bits]`` uint8 -> their little-endian uint32 [..., G]."""
    if hi - lo == 4:  # a contiguous copy behind a barrier, then a free bitcast (XLA:CPU vectorizes it, not strides)
        return jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(p[..., lo:hi]), jnp.uint32)
    w = p[..., lo].astype(jnp.uint32)
    for k in range(lo + 1, hi):
        w = w | (p[..., k].astype(jnp.uint32) << (8 * (k - lo)))
    return w


def _codes(p: jax.Array, bits: int) -> list[jax.Array]:
    """``p [..., G, bits]`` (the packed bytes, uint8) -> the 8 codes of every group, each ``[..., G]`` int32. The
    group's bits are read as at most two uint32 words (bits 0..31 and 32..); code i is bits ``bits*i ..``."""
    words = [_word(p, 0, min(bits, 4))] + ([_word(p, 4, bits)] if bits > 4 else [])
    mask = (1 << bits) - 1
    out = []
    for i in range(GROUP):
        s = bits * i
        if s + bits <= 32:
            v = words[0] >> s
        elif s >= 32:
            v = words[1] >> (s - 32)
        else:  # straddles the two words
            v = (words[0] >> s) | (words[1] << (32 - s))
        out.append((v & mask).astype(jnp.int32))
    return out


def rows_product(xr: jax.Array, packed, norms, table, bits: int) -> jax.Array:
    """``xr [M, K_pad]`` (the rotated input, ``hadamard.rotate``) ``@ (W H)^T -> [M, N]`` float32 for a 2-D node's
    arrays: packed ``[N, K_pad*bits/8]`` uint8, norms ``[N, K_pad/128]``, table ``[2^bits]``.

    Per 64-row tile, code ``i`` of every group of 8 is decoded into its own ``[64, K_pad/8]`` array (no
    interleave: the inputs ``xr[:, i::8]`` multiply it; the group's bytes read as uint32 words, ``_codes``), looked
    up in the table scaled by the block's norm, and the eight small products summed, behind optimization barriers
    (else XLA hoists the decode out of the loop, or turns the products into slow multiply-reduce loops). Equal to
    the fp32 product of the rotated-path weight up to summation order.
    """
    bits = check_bits(bits)
    N, nbytes = packed.shape
    M, K = xr.shape
    G, nb = K // GROUP, K // BLOCK
    if nbytes != G * bits or K % BLOCK or norms.shape != (N, nb):
        raise ValueError(f"HLWQ rows_product: packed {packed.shape}, norms {norms.shape} and input {xr.shape} "
                         f"do not describe one {bits}-bit weight")
    T = tile_rows(N)
    pad = -N % T
    if pad:
        packed, norms = jnp.pad(packed, ((0, pad), (0, 0))), jnp.pad(norms, ((0, pad), (0, 0)))
    nt = (N + pad) // T
    pt, nt_ = packed.reshape(nt, T, G, bits), norms.reshape(nt, T, nb)
    levels = scaled_table(table).reshape(-1)
    xf = xr.astype(jnp.float32)
    xs = [xf[:, i::GROUP] for i in range(GROUP)]  # [M, G]: the inputs of code i of each group
    dims = (((1,), (1,)), ((), ()))

    def tile(t, acc):
        p, r, t = jax.lax.optimization_barrier((jax.lax.dynamic_index_in_dim(pt, t, keepdims=False),
                                                jax.lax.dynamic_index_in_dim(nt_, t, keepdims=False), t))
        r = r.astype(jnp.float32)[:, :, None]
        vs = jax.lax.optimization_barrier([
            (jnp.take(levels, c, mode="fill").reshape(T, nb, BLOCK // GROUP) * r).reshape(T, G)
            for c in _codes(p, bits)])
        y = sum(jax.lax.dot_general(v, x, dims, preferred_element_type=jnp.float32) for v, x in zip(vs, xs))
        return jax.lax.dynamic_update_index_in_dim(acc, y, t, 0)

    acc = jax.lax.fori_loop(0, nt, tile, jnp.zeros((nt, T, M), jnp.float32))
    return acc.reshape(nt * T, M)[:N].T
