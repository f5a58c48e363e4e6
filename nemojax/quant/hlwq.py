"""HLWQ ("PolarQuant", Hadamard-Lloyd Weight Quantization) weights, compatible with the ``polarquant`` package
(import name ``polarengine_vllm``, 0.6.0) and its checkpoints.

Each row of a weight ``W [out, in]`` is zero-padded to ``in_pad = ceil(in/128)*128`` and cut into blocks of 128
inputs. A block ``w`` is stored as its fp16 L2 norm ``r`` and one ``b``-bit code per input: the index of the
Lloyd-Max level ``c`` (for N(0, 1), :func:`lloyd_max_table`) nearest to ``z = sqrt(128) * H (w / r)``, where
``H[i, k] = (-1)^popcount(i & k) / sqrt(128)`` is the normalized Sylvester-Walsh-Hadamard matrix (no random
signs, no seed; ``H = H^T = H^-1``)::

    W_hat[o, 128j + i] = norm[o, j] * sum_k H[i, k] * c[code[o, j, k]] / sqrt(128)

Code selection: ``k = searchsorted(c, z)``, keep ``c[k]`` only when strictly nearer than ``c[k-1]`` (ties go to
the lower index) -- the same codes as the package's float32 argmin.

Packing (every ``b`` bits, 8 codes -> ``b`` bytes):

* LSB-first, per row (the package's ``pack_codes_q5``, "layout B"; what :class:`HLWQWeight` keeps in memory):
  8 consecutive codes of a row are the ``8b``-bit little-endian integer ``sum_i code_i * 2^(b*i)``.
* MSB-first, flat (the git-HEAD ``hlwq-q5`` format, "layout C"): the row-major code array flattened, zero codes
  appended to a multiple of 8, 8 codes = the big-endian integer ``sum_i code_i * 2^(b*(7-i))``.

The pack/unpack functions work on NumPy arrays (host, NumPy result -- what a loader wants) and on JAX arrays
(jittable, ``bits`` / sizes static). For ``b`` in {2, 4, 8} the two orders only permute codes inside a byte, so
a code histogram cannot tell them apart (:func:`detect_bit_order` returns None).

Inference (:class:`HLWQWeight`, ``path`` static): "dequant" rebuilds ``W_hat`` in the activation dtype and does
one matmul (bit-identical to the package's BF16 dequant for bf16 activations); "rotated" never applies ``H`` to
the weights: ``W x = (W H)(H x)`` blockwise, so it rotates ``x`` once per 128-block (:func:`fwht`) and contracts
with ``table[code] / sqrt(128) * norm`` -- one rotation can serve several matrices that read the same input
(:meth:`HLWQWeight.rotate` + :meth:`HLWQWeight.matmul_rotated`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .nvfp4 import QuantError

__all__ = ["HLWQWeight", "QuantError", "BLOCK", "PATHS", "lloyd_max_table", "bin_masses", "fwht", "hadamard",
           "quantize", "quantize_jit", "dequantize", "pack_lsb", "unpack_lsb", "pack_msb_flat", "unpack_msb_flat",
           "pack_half_block", "unpack_half_block",
           "detect_bit_order", "bit_order_kl", "padded_in", "check_quantizable"]

BLOCK = 128
_LOG2_BLOCK = 7
PATHS = ("dequant", "rotated")
_MIN_BITS, _MAX_BITS = 2, 8
_SQRT_BLOCK = np.float32(math.sqrt(BLOCK))


def padded_in(in_features: int) -> int:
    """Row length after zero padding to whole 128-blocks."""
    return -(-int(in_features) // BLOCK) * BLOCK


def _check_bits(bits) -> int:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise QuantError(f"HLWQ bits must be an integer in [{_MIN_BITS}, {_MAX_BITS}], got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------------------------------------------
# Lloyd-Max table
# ----------------------------------------------------------------------------------------------------------------
_SQRTH = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _ndtr(a: float) -> float:
    """Standard normal CDF, float64, with the branch structure of cephes/scipy ``ndtr``."""
    if a == math.inf:
        return 1.0
    if a == -math.inf:
        return 0.0
    x = a * _SQRTH
    z = abs(x)
    if z < _SQRTH:
        return 0.5 + 0.5 * math.erf(x)
    y = 0.5 * math.erfc(z)
    return 1.0 - y if x > 0 else y


def _npdf(a: float) -> float:
    return 0.0 if math.isinf(a) else math.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _lloyd_step(t: np.ndarray) -> np.ndarray:
    """Centroids (truncated-Gaussian means; bin midpoint when the mass is < 1e-10) of the bins ``t``."""
    cdf = np.array([_ndtr(v) for v in t])
    pdf = np.array([_npdf(v) for v in t])
    lo, hi = t[:-1], t[1:]
    mass = cdf[1:] - cdf[:-1]
    ok = mass > 1e-10
    with np.errstate(invalid="ignore"):
        return np.where(ok, (pdf[:-1] - pdf[1:]) / np.where(ok, mass, 1.0), (lo + hi) / 2)


@functools.lru_cache(maxsize=None)
def _table(bits: int, iterations: int | None) -> np.ndarray:
    n = 1 << bits
    t = np.linspace(-4.0, 4.0, n + 1)
    t[0], t[-1] = -np.inf, np.inf
    cap = iterations if iterations is not None else 1_000_000
    c = None
    for _ in range(cap):
        new = _lloyd_step(t)
        t = np.concatenate([[-np.inf], (new[:-1] + new[1:]) / 2, [np.inf]])
        done = iterations is None and c is not None and float(np.max(np.abs(new - c))) < 1e-12
        c = new
        if done:
            break
    out = c.astype(np.float32)
    out.setflags(write=False)
    return out


def lloyd_max_table(bits: int = 5, iterations: int | None = 100) -> np.ndarray:
    """Lloyd-Max levels for N(0, 1) with ``2^bits`` entries, float32, ascending (read-only, cached).

    ``iterations=100`` is the package's table (``utils.get_centroids``), bit for bit: float64, ``2^b + 1``
    uniform boundaries on [-4, 4] with the outer two replaced by +-inf, exactly 100 rounds of centroid /
    midpoint updates, cast to float32. It is *not* converged for ``b >= 4``; ``iterations=None`` iterates until
    no level moves by 1e-12 (cap 10^6 rounds; 5 bits: ~2.5k rounds, MSE 0.00251 instead of 0.00292; 7 and 8
    bits take seconds to minutes). Published checkpoints all use the 100-round table (or store theirs).
    """
    bits = _check_bits(bits)
    if iterations is not None and (not isinstance(iterations, (int, np.integer)) or iterations < 1):
        raise ValueError(f"iterations must be a positive integer or None, got {iterations!r}")
    return _table(bits, None if iterations is None else int(iterations))


def bin_masses(table) -> np.ndarray:
    """N(0, 1) probability of each level's bin (boundaries at midpoints), float64 -- the expected code
    histogram of Gaussian-like weights."""
    c = np.asarray(table, np.float64)
    t = np.concatenate([[-np.inf], (c[:-1] + c[1:]) / 2, [np.inf]])
    return np.diff([_ndtr(v) for v in t])


# ----------------------------------------------------------------------------------------------------------------
# Walsh-Hadamard transform
# ----------------------------------------------------------------------------------------------------------------
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


def _hmul(x: jax.Array) -> jax.Array:
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


# ----------------------------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------------------------
def _div(a, b):
    """IEEE ``a / b`` also under jit (XLA may turn ``x / broadcast(d)`` into ``x * (1/d)``, an ulp off)."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))))


def _pad_last(x, k_pad: int):
    k = x.shape[-1]
    if k == k_pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_pad - k)])


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
    bits = _check_bits(bits)
    ct = _as_table(table, bits)
    L = 1 << bits
    wf = jnp.asarray(w).astype(jnp.float32)
    *lead, N, K = wf.shape
    k_pad = padded_in(K)
    blocks = _pad_last(wf, k_pad).reshape(*lead, N, k_pad // BLOCK, BLOCK)
    r = jnp.maximum(jnp.sqrt(jnp.sum(blocks * blocks, axis=-1)), jnp.float32(1e-10))
    z = _hmul(_div(blocks, r[..., None])) * jnp.float32(_SQRT_BLOCK)
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


def _lookup(table: jax.Array, codes: jax.Array) -> jax.Array:
    """``table[..., codes]`` with the table's leading axes matching the codes' leading axes (float32)."""
    table = jnp.asarray(table, jnp.float32)
    idx = codes.astype(jnp.int32)
    if table.ndim == 1:
        return jnp.take(table, idx, axis=0, mode="clip")
    lead = table.shape[:-1]
    flat = idx.reshape(*lead, -1)
    return jnp.take_along_axis(table, flat, axis=-1, mode="clip").reshape(codes.shape)


def _scaled_table(table) -> jax.Array:
    """``table / sqrt(128)`` in float32 (IEEE division, as the package's ``ct_scaled``)."""
    return _div(jnp.asarray(table, jnp.float32), jnp.float32(_SQRT_BLOCK))


def dequantize(codes, norms, table, in_features: int, dtype=jnp.bfloat16) -> jax.Array:
    """``(codes [..., N, K_pad], norms [..., N, K_pad/128], table [2^b] or [..., 2^b])`` -> ``W_hat [..., N,
    in_features]`` in ``dtype``: ``(table[codes] / sqrt(128)) @ H * norm`` per block in float32 (a dense fp32
    matmul with H, the package's arithmetic: bf16 results bit-equal to polarquant-convert on CPU), trimmed, then
    cast (round to nearest even). Jittable."""
    return _dequantize_jit(codes, norms, table, int(in_features), jnp.dtype(dtype))


def _dequantize(codes, norms, table, in_features, dtype):
    codes = jnp.asarray(codes)
    *lead, N, k_pad = codes.shape
    v = _hmul(_lookup(_scaled_table(table), codes).reshape(*lead, N, k_pad // BLOCK, BLOCK))
    v = v * jnp.asarray(norms).astype(jnp.float32)[..., None]
    return v.reshape(*lead, N, k_pad)[..., :in_features].astype(dtype)


_dequantize_jit = jax.jit(_dequantize, static_argnums=(3, 4))


# ----------------------------------------------------------------------------------------------------------------
# bit packing (NumPy in -> NumPy on the host; JAX in -> a jitted JAX function; all usable inside jit)
# ----------------------------------------------------------------------------------------------------------------
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
    bits = _check_bits(bits)
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
    bits = _check_bits(bits)
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
    return _dispatch(_pack_msb_flat, codes, _check_bits(bits))


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
    bits = _check_bits(bits)
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
    (any shape, flattened; up to ``max_groups`` evenly spaced groups of ``bits`` bytes) decoded both ways. NumPy."""
    bits = _check_bits(bits)
    tab = lloyd_max_table(bits) if table is None else np.asarray(table, np.float32)
    p = bin_masses(tab)
    a = np.asarray(packed_bytes)
    if a.dtype.itemsize != 1:
        raise QuantError(f"bit order: packed codes must be bytes (uint8), got {a.dtype}")
    flat = a.reshape(-1).view(np.uint8)
    G = flat.size // bits
    if G == 0:
        raise QuantError(f"bit order: fewer than {bits} bytes to decode")
    sel = np.unique(np.linspace(0, G - 1, min(G, max_groups)).round().astype(np.int64))
    groups = flat[: G * bits].reshape(G, bits)[sel]
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
    bits = _check_bits(bits)
    if 8 % bits == 0:
        return None
    kl = bit_order_kl(packed_bytes, bits, table, max_groups)
    return "lsb" if kl["lsb"] <= kl["msb"] else "msb"


# ----------------------------------------------------------------------------------------------------------------
# the weight node
# ----------------------------------------------------------------------------------------------------------------
@struct.dataclass
class HLWQWeight:
    """An HLWQ-quantized linear weight (or a stacked bank, e.g. experts ``[E, N, K]``).

    Leaves: ``packed`` uint8 ``[..., N, K_pad*bits/8]`` (LSB-first codes, :func:`pack_lsb`), ``norms`` float16
    ``[..., N, K_pad/128]``, ``table`` float32 ``[..., 2^bits]``: the levels, *broadcast over the leading axes* so
    that every leaf has the bank axes first and ``jax.tree.map(lambda a: a[e], node)`` (or
    ``dynamic_index_in_dim``) gives expert ``e`` (a few hundred bytes per expert; it also lets a checkpoint's
    per-tensor ``.ct`` be kept as is). Static: ``bits``, ``in_features`` (K before padding), ``path``:
    "dequant" (rebuild W in x's dtype, one matmul) or "rotated" (rotate x by :func:`fwht`, contract with
    ``table[code] / sqrt(128) * norm``; no Hadamard on the weights).
    """

    packed: jax.Array
    norms: jax.Array
    table: jax.Array
    bits: int = struct.field(pytree_node=False, default=5)
    in_features: int = struct.field(pytree_node=False, default=0)
    path: str = struct.field(pytree_node=False, default="dequant")
    backend: str = struct.field(pytree_node=False, default="xla")  # "xla" | "pallas" | "triton" (quant.set_backend)

    @property
    def k_pad(self) -> int:
        return self.packed.shape[-1] * 8 // self.bits

    @property
    def n_blocks(self) -> int:
        return self.k_pad // BLOCK

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (self.packed, self.norms, self.table))

    def codes(self) -> jax.Array:
        """uint8 codes ``[..., N, K_pad]``."""
        return unpack_lsb(self.packed, self.bits, self.k_pad)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.codes(), self.norms, self.table, self.in_features, dtype)

    def rotate(self, x: jax.Array) -> jax.Array:
        """``x [..., in_features]`` -> ``H x`` per 128-block ``[..., K_pad]`` (zero padded), in x's dtype
        (computed in float32). Share it between matrices that read the same x via :meth:`matmul_rotated`."""
        self._check_in(x)
        return _rotate(x, self.k_pad)

    def rotated_weight(self, dtype=jnp.float32) -> jax.Array:
        """``W H`` per block: ``table[code] / sqrt(128) * norm``, ``[..., N, K_pad]`` in ``dtype``."""
        return _rotated_weight(self, jnp.dtype(dtype))

    def matmul_rotated(self, xr: jax.Array, dtype=None) -> jax.Array:
        """``xr = fwht(pad(x)) [..., K_pad]`` (e.g. from :meth:`rotate`) -> ``x @ W^T [..., N]`` (fp32
        accumulation; result in ``dtype``, default xr's). For a stacked node the bank axes come after x's."""
        if xr.shape[-1] != self.k_pad:
            raise QuantError(f"HLWQ matmul_rotated: input has {xr.shape[-1]} features, expected K_pad={self.k_pad}")
        if self.backend != "xla" and self.packed.ndim == 2:
            from pallas_kernels.dispatch import hlwq_linear_rotated

            return hlwq_linear_rotated(xr, self).astype(jnp.dtype(dtype or xr.dtype))
        return _matmul_rotated(self, xr, jnp.dtype(dtype or xr.dtype))

    def matmul(self, x: jax.Array) -> jax.Array:
        """``x [..., in_features] @ W^T -> [..., N]`` in x's dtype (fp32 accumulation). A stacked node
        ``[E, N, K]`` gives ``[..., E, N]``."""
        self._check_in(x)
        if self.backend != "xla" and self.packed.ndim == 2:
            from pallas_kernels.dispatch import hlwq_linear

            return hlwq_linear(x, self)
        if self.path == "rotated":
            return _matmul_rotated(self, _rotate(x, self.k_pad), jnp.dtype(x.dtype))
        if self.path != "dequant":
            raise QuantError(f"HLWQ path {self.path!r} is not one of {PATHS}")
        return _matmul_dequant(self, x)

    def _check_in(self, x):
        if x.shape[-1] != self.in_features:
            raise QuantError(f"HLWQ matmul: input has {x.shape[-1]} features, the weight expects {self.in_features}")

    @classmethod
    def from_float(cls, w, bits: int = 5, table=None, path: str = "dequant", name: str = "weight") -> "HLWQWeight":
        """Quantize a float weight ``[..., N, K]`` (any K; rows are zero padded to whole 128-blocks)."""
        bits = _check_bits(bits)
        _check_path(path, name)
        check_quantizable(w, name)
        tab = lloyd_max_table(bits) if table is None else np.asarray(table, np.float32)
        try:
            codes, norms = quantize_jit(jnp.asarray(w), bits, jnp.asarray(tab) if table is not None else None)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        lead = tuple(w.shape[:-2])
        return cls(pack_lsb(codes, bits), norms, jnp.broadcast_to(jnp.asarray(tab), (*lead, 1 << bits)),
                   bits, int(w.shape[-1]), path)

    @classmethod
    def from_arrays(cls, codes, norms, table, bits: int, in_features: int, name: str = "weight",
                    path: str = "dequant") -> "HLWQWeight":
        """Build a node from checkpoint arrays, validating them (QuantError names ``name``).

        ``codes``: one code per weight ``[..., N, K_pad]`` (uint8, or int8 as layout A stores it -- reinterpreted
        as uint8, so 8-bit codes >= 128 are fine) or LSB-first packed bytes ``[..., N, K_pad*bits/8]`` uint8.
        ``norms`` [..., N, K_pad/128] (cast to float16); ``table`` [2^bits] or [..., 2^bits] (the raw N(0,1)
        levels -- multiply a stored ``ct_scaled`` by sqrt(128) first).
        """
        _check_path(path, name)
        try:
            bits = _check_bits(bits)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        in_features = int(in_features)
        if in_features < 1:
            raise QuantError(f"{name}: in_features must be positive, got {in_features}")
        k_pad = padded_in(in_features)
        nbl, nbytes = k_pad // BLOCK, k_pad * bits // 8
        c = np.asarray(codes)
        if c.ndim < 2:
            raise QuantError(f"{name}: HLWQ codes need shape [..., out, in_pad], got {list(c.shape)}")
        if c.dtype.kind not in "iu":
            raise QuantError(f"{name}: HLWQ codes must be integers, got {c.dtype}")
        lead, N = c.shape[:-2], c.shape[-2]
        if c.shape[-1] == k_pad:  # one code per weight
            if c.dtype == np.int8:
                if bits < 8 and (c < 0).any():
                    raise QuantError(f"{name}: negative int8 HLWQ codes (min {int(c.min())}) for {bits} bits")
                c = c.view(np.uint8)
            if c.size and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
                raise QuantError(f"{name}: HLWQ codes out of range [0, {(1 << bits) - 1}] for {bits} bits "
                                 f"(min {int(c.min())}, max {int(c.max())})")
            c = c.astype(np.uint8)
            packed = pack_lsb(c, bits)
        elif c.shape[-1] == nbytes:  # LSB-first packed bytes
            if c.dtype.itemsize != 1:
                raise QuantError(f"{name}: packed HLWQ codes must be bytes (uint8), got {c.dtype}")
            packed = c.view(np.uint8)
        else:
            raise QuantError(f"{name}: HLWQ codes last dim {c.shape[-1]} is neither in_pad={k_pad} (one code per "
                             f"weight) nor {nbytes} (packed {bits}-bit) for in_features={in_features}")
        n = np.asarray(norms)
        if n.shape != (*lead, N, nbl):
            raise QuantError(f"{name}: HLWQ norms shape {list(n.shape)}, expected {[*lead, N, nbl]}")
        if n.dtype.kind != "f":
            raise QuantError(f"{name}: HLWQ norms must be floating point, got {n.dtype}")
        n = n.astype(np.float16)
        if not np.all(np.isfinite(n)) or (n < 0).any():
            raise QuantError(f"{name}: HLWQ norms contain NaN/Inf/negative values (after the float16 cast)")
        t = np.asarray(table, np.float32)
        if t.shape not in ((1 << bits,), (*lead, 1 << bits)):
            raise QuantError(f"{name}: HLWQ table shape {list(t.shape)}, expected [{1 << bits}] or "
                             f"{[*lead, 1 << bits]} for {bits} bits")
        if not np.all(np.isfinite(t)):
            raise QuantError(f"{name}: HLWQ table contains NaN or Inf")
        return cls(jnp.asarray(packed), jnp.asarray(n), jnp.asarray(np.broadcast_to(t, (*lead, 1 << bits))),
                   bits, in_features, path)


@functools.partial(jax.jit, static_argnums=1)
def _rotate(x, k_pad):
    return _fwht(_pad_last(x, k_pad), -1)


@functools.partial(jax.jit, static_argnums=1)
def _rotated_weight(node: HLWQWeight, dtype):
    *lead, N, k_pad = (*node.packed.shape[:-1], node.k_pad)
    v = _lookup(_scaled_table(node.table), _unpack_lsb(node.packed, node.bits))
    v = v.reshape(*lead, N, k_pad // BLOCK, BLOCK) * node.norms.astype(jnp.float32)[..., None]
    return v.reshape(*lead, N, k_pad).astype(dtype)


def _dot(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=2)
def _matmul_rotated(node: HLWQWeight, xr, dtype):
    return _dot(xr, _rotated_weight(node, jnp.dtype(xr.dtype))).astype(dtype)


@jax.jit
def _matmul_dequant(node: HLWQWeight, x):
    w = _dequantize(_unpack_lsb(node.packed, node.bits), node.norms, node.table, node.in_features, x.dtype)
    return _dot(x, w).astype(x.dtype)


def _check_path(path, name):
    if path not in PATHS:
        raise QuantError(f"{name}: HLWQ path {path!r} is not one of {PATHS}")


def check_quantizable(w, name: str) -> None:
    """Raise QuantError naming ``name`` for a shape or value HLWQ cannot take."""
    shape = tuple(w.shape)
    if len(shape) < 2 or 0 in shape:
        raise QuantError(f"{name}: HLWQ needs a non-empty matrix [out, in], got shape {list(shape)}")
    finite = (np.isfinite(w).all() if isinstance(w, np.ndarray) and w.dtype.kind == "f"
              else _all_finite(jnp.asarray(w)))
    if not bool(finite):
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")


@jax.jit
def _all_finite(w):
    return jnp.all(jnp.isfinite(w.astype(jnp.float32)))
