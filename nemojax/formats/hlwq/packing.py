"""HLWQ bit packing (every ``b`` bits, 8 codes -> ``b`` bytes) and bit-order detection.

* LSB-first, per row (the ``polarquant`` package's ``pack_codes_q5``, "layout B"; what ``HLWQWeight`` keeps in
  memory): 8 consecutive codes of a row are the ``8b``-bit little-endian integer ``sum_i code_i * 2^(b*i)``.
* MSB-first, flat (the git-HEAD ``hlwq-q5`` format, "layout C"): the row-major code array flattened, zero codes
  appended to a multiple of 8, 8 codes = the big-endian integer ``sum_i code_i * 2^(b*(7-i))``.
* Half-block nibbles (the package's ``pack_codes_half_block``, mixed-bit Q2-Q4 checkpoints).

The functions work on NumPy arrays (host, NumPy result -- what a loader wants) and on JAX arrays (jittable,
``bits`` / sizes static). For ``b`` in {2, 4, 8} the two orders only permute codes inside a byte, so a code
histogram cannot tell them apart (:func:`detect_bit_order` returns None).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..base import QuantError
from .codebook import bin_masses, check_bits, lloyd_max_table
from .hadamard import BLOCK

__all__ = ["pack_lsb", "unpack_lsb", "pack_msb_flat", "unpack_msb_flat", "pack_half_block", "unpack_half_block",
           "bit_order_kl", "detect_bit_order"]


def _xp(a):
    return np if isinstance(a, (np.ndarray, np.generic)) else jnp


@functools.lru_cache(maxsize=None)
def _jitted(impl, n_static: int):
    return jax.jit(impl, static_argnums=tuple(range(1, 1 + n_static)))


def _dispatch(impl, a, *static):
    """NumPy input: run ``impl`` in NumPy on the host; anything else: its jitted version (statics hashed)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return impl(a, *static)
    return _jitted(impl, len(static))(a, *static)


def _pack_groups(c, bits: int):
    """c [..., G, 8] (uint16, < 2^bits) -> bytes [..., G, bits] uint8, LSB-first."""
    xp = _xp(c)
    out = []
    for m in range(bits):
        acc = None
        for i in range(8):
            sh = bits * i - 8 * m  # position of code i's bit 0 relative to byte m's bit 0
            if sh >= 8 or sh + bits <= 0:
                continue
            part = (c[..., i] << sh) if sh >= 0 else (c[..., i] >> -sh)
            acc = part if acc is None else acc | part
        out.append((acc & 0xFF).astype(np.uint8))
    return xp.stack(out, axis=-1)


def _unpack_groups(p, bits: int):
    """bytes [..., G, bits] -> codes [..., G, 8] uint8, LSB-first."""
    xp = _xp(p)
    p = p.astype(np.uint16)
    mask = (1 << bits) - 1
    out = []
    for i in range(8):
        s = bits * i
        j, o = divmod(s, 8)
        v = p[..., j] >> o
        if o + bits > 8:
            v = v | (p[..., j + 1] << (8 - o))
        out.append((v & mask).astype(np.uint8))
    return xp.stack(out, axis=-1)


def pack_lsb(codes, bits: int):
    """Codes ``[..., K]`` (K % 8 == 0, values < 2^bits) -> bytes ``[..., K*bits/8]``: every 8 consecutive codes
    form the little-endian integer ``sum_i code_i * 2^(bits*i)`` (layout B for 5 bits; 8 bits is the identity)."""
    bits = check_bits(bits)
    *lead, K = codes.shape
    if K % 8:
        raise QuantError(f"pack_lsb: last axis {K} is not a multiple of 8")
    return _dispatch(_pack_lsb, codes, bits)


def _pack_lsb(codes, bits):
    *lead, K = codes.shape
    c = codes.astype(np.uint16).reshape(*lead, K // 8, 8)
    return _pack_groups(c, bits).reshape(*lead, K // 8 * bits)


def unpack_lsb(packed, bits: int, k_pad: int | None = None):
    """Inverse of :func:`pack_lsb`: bytes ``[..., K*bits/8]`` -> uint8 codes ``[..., K]`` (``k_pad``, if given,
    is checked against the byte count)."""
    bits = check_bits(bits)
    *lead, nb = packed.shape
    if nb % bits:
        raise QuantError(f"unpack_lsb: {nb} bytes per row is not a multiple of {bits} ({bits}-bit codes)")
    K = nb // bits * 8
    if k_pad is not None and int(k_pad) != K:
        raise QuantError(f"unpack_lsb: {nb} bytes hold {K} {bits}-bit codes, expected {k_pad}")
    return _dispatch(_unpack_lsb, packed, bits)


def _unpack_lsb(packed, bits):
    *lead, nb = packed.shape
    return _unpack_groups(packed.reshape(*lead, nb // bits, bits), bits).reshape(*lead, nb // bits * 8)


def pack_msb_flat(codes, bits: int):
    """Layout C: the row-major code array flattened, zero codes appended to a multiple of 8, every 8 codes the
    big-endian integer ``sum_i code_i * 2^(bits*(7-i))`` -> flat bytes ``[ceil(n/8)*bits]``."""
    return _dispatch(_pack_msb_flat, codes, check_bits(bits))


def _pack_msb_flat(codes, bits):
    xp = _xp(codes)
    flat = codes.reshape(-1).astype(np.uint16)
    n = flat.shape[0]
    g = -(-n // 8)
    if g * 8 != n:
        flat = xp.concatenate([flat, xp.zeros(g * 8 - n, np.uint16)])
    # MSB-first == LSB-first on the groups with code order and byte order reversed
    return _pack_groups(flat.reshape(g, 8)[:, ::-1], bits)[:, ::-1].reshape(-1)


def unpack_msb_flat(packed, bits: int, shape):
    """Inverse of :func:`pack_msb_flat`: flat bytes -> uint8 codes of ``shape`` (an int or a tuple, e.g.
    ``(out, in_pad)``); the trailing pad codes are dropped."""
    bits = check_bits(bits)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    n = math.prod(shape)
    g = -(-n // 8)
    if math.prod(packed.shape) != g * bits:
        raise QuantError(f"unpack_msb_flat: {math.prod(packed.shape)} bytes, expected {g * bits} for {n} "
                         f"{bits}-bit codes")
    return _dispatch(_unpack_msb_flat, packed, bits, shape)


def _unpack_msb_flat(packed, bits, shape):
    flat = packed.reshape(-1)
    g = flat.shape[0] // bits
    codes = _unpack_groups(flat.reshape(g, bits)[:, ::-1], bits)[:, ::-1].reshape(-1)
    return codes[: math.prod(shape)].reshape(shape)


def pack_half_block(codes):
    """Q2-Q4 "half-block" nibbles (the package's ``pack_codes_half_block``, mixed-bit checkpoints): codes
    ``[..., K_pad]`` -> bytes ``[..., K_pad/2]`` with byte ``i`` of each 128-block = ``code[i] | code[64+i] << 4``."""
    *lead, K = codes.shape
    if K % BLOCK:
        raise QuantError(f"pack_half_block: last axis {K} is not a multiple of {BLOCK}")
    return _dispatch(_pack_half_block, codes)


def _pack_half_block(codes):
    *lead, K = codes.shape
    b = codes.astype(np.uint8).reshape(*lead, K // BLOCK, 2, BLOCK // 2)
    return (b[..., 0, :] | (b[..., 1, :] << 4)).reshape(*lead, K // 2)


def unpack_half_block(packed):
    """Inverse of :func:`pack_half_block`: bytes ``[..., K_pad/2]`` -> uint8 codes ``[..., K_pad]``."""
    if (2 * packed.shape[-1]) % BLOCK:
        raise QuantError(f"unpack_half_block: {packed.shape[-1]} bytes per row is not a whole number of "
                         f"{BLOCK}-blocks")
    return _dispatch(_unpack_half_block, packed)


def _unpack_half_block(packed):
    xp = _xp(packed)
    *lead, K2 = packed.shape
    b = packed.astype(np.uint8).reshape(*lead, 2 * K2 // BLOCK, BLOCK // 2)
    return xp.stack([b & 0xF, b >> 4], axis=-2).reshape(*lead, 2 * K2)


def bit_order_kl(packed_bytes, bits: int, table=None, max_groups: int = 8192) -> dict:
    """``{"lsb": KL, "msb": KL}``: KL(code histogram || Lloyd-Max bin masses) of a sample of ``packed_bytes``
    (any shape, flattened; its first ``max_groups`` groups of ``bits`` bytes) decoded both ways. NumPy.

    The sample is contiguous: of a memory-mapped tensor it reads a few pages (40 KB at 5 bits), where evenly
    spaced groups would fault in every page of the file (a whole 30B checkpoint at load)."""
    bits = check_bits(bits)
    tab = lloyd_max_table(bits) if table is None else np.asarray(table, np.float32)
    p = bin_masses(tab)
    a = np.asarray(packed_bytes)
    if a.dtype.itemsize != 1:
        raise QuantError(f"bit order: packed codes must be bytes (uint8), got {a.dtype}")
    flat = a.reshape(-1).view(np.uint8)
    G = flat.size // bits
    if G == 0:
        raise QuantError(f"bit order: fewer than {bits} bytes to decode")
    n = min(G, max_groups)
    groups = np.array(flat[: n * bits]).reshape(n, bits)
    out = {}
    for order, g in (("lsb", groups), ("msb", groups[:, ::-1])):
        codes = _unpack_groups(np.ascontiguousarray(g), bits)
        if order == "msb":
            codes = codes[:, ::-1]
        h = np.bincount(codes.reshape(-1), minlength=1 << bits)[: 1 << bits] / codes.size
        m = h > 0
        out[order] = float(np.sum(h[m] * np.log(h[m] / np.maximum(p[m], 1e-300))))
    return out


def detect_bit_order(packed_bytes, bits: int, table=None, max_groups: int = 8192) -> str | None:
    """"lsb" or "msb": the decoding whose code histogram is closer (KL) to the Lloyd-Max bin masses (hlwq.md
    section 3, step 2; right order ~1e-3 or less, wrong ~0.46 at 5 bits). None for 2, 4 and 8 bits, where the
    two orders only permute codes inside a byte and no histogram can tell them apart. NumPy (host)."""
    bits = check_bits(bits)
    if 8 % bits == 0:
        return None
    kl = bit_order_kl(packed_bytes, bits, table, max_groups)
    return "lsb" if kl["lsb"] <= kl["msb"] else "msb"

