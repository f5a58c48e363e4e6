"""NVFP4 (NVIDIA ModelOpt) weights: E2M1 codes packed two per byte, FP8-E4M3 scales per 16 inputs and an
FP32 per-tensor (per-expert) scale. Quantization is bit-exact with ModelOpt 0.47's export path.

    W[n, k] = E2M1(code[n, k]) * (float32(weight_scale[n, k // 16]) * weight_scale_2)

Packing: ``byte[n, j] = code[n, 2j] | code[n, 2j+1] << 4`` (low nibble first); sign bit = ``x < 0`` (so a
small negative value that rounds to zero is stored as -0, code 8, and an exact -0.0 as +0).

Checkpoint (ModelOpt): module ``M`` is ``M.weight`` (the packed codes, U8 [N, K/2]), ``M.weight_scale`` (F8_E4M3
[N, K/16]), ``M.weight_scale_2`` (F32 []) and optionally ``M.input_scale`` (F32 [], the static activation scale
of W4A4); experts one module each. ``hf_quant_config.json``: quant_algo ``NVFP4`` (with input scales) or
``W4A16_NVFP4``, group_size 16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import (BLOCK_LINEARS, NANO_SELECTIVE, QuantError, QuantFormat, check_scale, check_tensor, dot_rows,
                   ieee_div, per_tensor_spec, register, tile_rows)

__all__ = ["NVFP4Weight", "quantize", "dequantize", "rows_product", "fake_quant", "e2m1_code", "E2M1_VALUES",
           "pack_codes", "unpack_codes", "MODES", "SUFFIXES", "BLOCK"]

E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
E2M1_MAX, E4M3_MAX, BLOCK = 6.0, 448.0, 16
MODES = ("w4a16", "w4a4")
# checkpoint suffixes of one module, by leaf: packed codes, block scales, global scale, (optional) activation scale
SUFFIXES = {"packed": ".weight", "scale": ".weight_scale", "scale_2": ".weight_scale_2", "input_scale": ".input_scale"}


def e2m1_code(m: jax.Array) -> jax.Array:
    """Magnitude code 0..7 of |x| (round to nearest, ties to even, saturating at 6). m >= 0, float32."""
    c = ((m > 0.25).astype(jnp.uint8) + (m >= 0.75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5) + (m > 5.0))
    return c.astype(jnp.uint8)


def pack_codes(codes: jax.Array) -> jax.Array:
    """uint8 codes [..., K] (0..15) -> bytes [..., K/2], low nibble = even element."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """bytes [..., K/2] -> codes [..., K]."""
    return jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize(w: jax.Array, axis_amax: tuple[int, ...] = (-2, -1)):
    """ModelOpt NVFP4 export of a weight [..., N, K] (K % 16 == 0).

    The global amax is taken over ``axis_amax`` (the whole matrix; one scale per leading index, e.g. per
    expert). Returns (packed uint8 [..., N, K/2], weight_scale e4m3 [..., N, K/16], weight_scale_2 f32 [...]).
    """
    wf = w.astype(jnp.float32)
    *lead, N, K = wf.shape
    amax = jnp.max(jnp.abs(wf), axis=axis_amax)
    s2 = ieee_div(amax, jnp.float32(E2M1_MAX * E4M3_MAX))  # [...]
    blocks = wf.reshape(*lead, N, K // BLOCK, BLOCK)
    bm = jnp.max(jnp.abs(blocks), axis=-1)  # [..., N, K/16]
    s2b = s2[..., None, None]
    sb = ieee_div(bm, jnp.float32(E2M1_MAX) * s2b)
    sb = jnp.where(sb == 0, jnp.float32(1.0), sb)
    sb = jnp.clip(sb, jnp.float32(2.0 ** -9), jnp.float32(E4M3_MAX)).astype(jnp.float8_e4m3fn)
    y = ieee_div(blocks, (sb.astype(jnp.float32) * s2b)[..., None])
    codes = (e2m1_code(jnp.abs(y)) | ((y < 0).astype(jnp.uint8) << 3)).reshape(*lead, N, K)
    return pack_codes(codes), sb, s2


def dequantize(packed, scale, scale_2, dtype=jnp.float32) -> jax.Array:
    """(packed [..., N, K/2], scale [..., N, K/16], scale_2 [...]) -> W [..., N, K] in ``dtype``.

    The bytes are reinterpreted as pairs of ``float4_e2m1fn`` (low nibble first) and converted arithmetically
    by XLA (no table gather, which is several times slower on CPU).
    """
    *lead, N, K2 = packed.shape
    vals = jax.lax.bitcast_convert_type(packed, jnp.float4_e2m1fn).astype(jnp.float32)  # [..., N, K/2, 2]
    s = scale.astype(jnp.float32) * jnp.asarray(scale_2, jnp.float32)[..., None, None]
    return (vals.reshape(*lead, N, K2 * 2 // BLOCK, BLOCK) * s[..., None]).reshape(*lead, N, K2 * 2).astype(dtype)


def _e2m1_f16(bits: jax.Array) -> jax.Array:
    """uint16 holding an E2M1 code's sign at bit 15 and its exponent and mantissa at bits 10..9 -> 2^-14 x its
    value as float32: those are the bits of a float16 with the same exponent and mantissa, and the float16 -> float32
    conversion is exact for its subnormals too (the code 0.5), where a float32 bit trick would meet XLA:CPU's
    flush-to-zero."""
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def rows_product(x: jax.Array, packed, scale, scale_2) -> jax.Array:
    """``x [M, K] @ W^T -> [M, N]`` float32 for a 2-D weight (packed [N, K/2], scale [N, K/16], scale_2 []), reading
    only the packed bytes: the weight is decoded 64 rows at a time into a float32 tile that stays in cache.

    For the few rows of a decode step on a CPU. ``dequantize`` + one product writes the whole dequantized weight
    and reads it back, and XLA:CPU decodes at ~1 element per cycle into memory; here each tile's low and high
    nibbles are decoded separately (no interleave: the even and odd inputs multiply them), behind optimization
    barriers (else XLA rewrites the small products into fused multiply-reduce loops, or hoists the decode out of
    the loop and materializes it); a code is decoded by moving its bits into a float16 (``_e2m1_f16``), a few
    integer operations. The weight's values are exact in float32, so this is the fp32 product of the dequantized
    weight up to summation order.
    """
    N, K2 = packed.shape
    M = x.shape[0]
    T = tile_rows(N)
    pad = -N % T
    bits = jax.lax.bitcast_convert_type(scale, jnp.uint8)  # 8-bit float slices are slow on XLA:CPU; bytes are not
    if pad:
        packed, bits = jnp.pad(packed, ((0, pad), (0, 0))), jnp.pad(bits, ((0, pad), (0, 0)))
    nt = (N + pad) // T
    pt, st = packed.reshape(nt, T, K2), bits.reshape(nt, T, K2 // 8)
    xf = x.astype(jnp.float32)
    xe, xo = xf[:, 0::2], xf[:, 1::2]  # [M, K/2]: the inputs of the low and the high nibbles
    unit = jnp.asarray(scale_2, jnp.float32) * 2.0 ** 14  # _e2m1_f16's 2^-14 folded into the block scales

    def tile(i, acc):
        p, s, i = jax.lax.optimization_barrier((jax.lax.dynamic_index_in_dim(pt, i, keepdims=False),
                                                jax.lax.dynamic_index_in_dim(st, i, keepdims=False), i))
        sc = (jax.lax.bitcast_convert_type(s, jnp.float8_e4m3fn).astype(jnp.float32) * unit)[..., None]
        p = p.reshape(T, K2 // 8, 8).astype(jnp.uint16)
        lo = _e2m1_f16(((p & 0x07) << 9) | ((p & 0x08) << 12))
        hi = _e2m1_f16(((p & 0x70) << 5) | ((p & 0x80) << 8))
        lo, hi = jax.lax.optimization_barrier(((lo * sc).reshape(T, K2), (hi * sc).reshape(T, K2)))
        dims = (((1,), (1,)), ((), ()))
        y = (jax.lax.dot_general(lo, xe, dims, preferred_element_type=jnp.float32)
             + jax.lax.dot_general(hi, xo, dims, preferred_element_type=jnp.float32))  # [T, M]
        return jax.lax.dynamic_update_index_in_dim(acc, y, i, 0)

    acc = jax.lax.fori_loop(0, nt, tile, jnp.zeros((nt, T, M), jnp.float32))
    return acc.reshape(nt * T, M)[:N].T


def fake_quant(x: jax.Array, global_scale) -> jax.Array:
    """ModelOpt's NVFP4 fake quantization of activations along the last axis (blocks of 16), with a static
    global scale ``input_scale = amax / 2688``; per-block scales are dynamic. Result in x's dtype."""
    xf = x.astype(jnp.float32)
    shp = xf.shape
    xb = xf.reshape(*shp[:-1], shp[-1] // BLOCK, BLOCK)
    g = jnp.asarray(global_scale, jnp.float32)
    bm = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    s = jnp.minimum(ieee_div(bm, jnp.float32(E2M1_MAX) * g), E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32) * g
    s = jnp.where(s < 1e-5, jnp.float32(1.0), s)
    q = jnp.asarray(E2M1_VALUES)[e2m1_code(ieee_div(jnp.abs(xb), s)).astype(jnp.int32)] * s
    return jnp.where(xb >= 0, q, -q).reshape(shp).astype(x.dtype)


@register
@struct.dataclass
class NVFP4Weight(QuantFormat):
    """A quantized linear weight (or a stacked bank of experts) in ModelOpt's layout.

    packed uint8 [..., N, K/2]; scale float8_e4m3fn [..., N, K/16]; scale_2 float32 [...];
    input_scale float32 [...] or None (static activation scale for W4A4). ``mode`` (static): "w4a16"
    (dequantize into the matmul; what Hopper runs) or "w4a4" (activations fake-quantized per 16 with
    ``input_scale``; what Blackwell computes).
    """

    packed: jax.Array
    scale: jax.Array
    scale_2: jax.Array
    input_scale: jax.Array | None = None
    mode: str = struct.field(pytree_node=False, default="w4a16")
    backend: str = struct.field(pytree_node=False, default="xla")  # "xla" | "pallas" | "triton" (quant.set_backend)

    name = "nvfp4"
    quant_algos = ("NVFP4", "W4A16_NVFP4")
    group_size = BLOCK
    modes = MODES
    activation_modes = ("w4a4",)
    input_scale_divisor = E2M1_MAX * E4M3_MAX  # 2688
    recipes = {
        "nvfp4": {**NANO_SELECTIVE, "kv_cache": "fp8",
                  "about": "ModelOpt NVFP4, the published Nemotron-3-Nano selective layout (attention, router, "
                           "conv1d, lm_head and the Mamba layer before each attention layer kept BF16)"},
        "nvfp4-all": {**BLOCK_LINEARS, "kv_cache": "fp8",
                      "about": "ModelOpt NVFP4, every linear of the blocks (router and conv1d kept BF16)"},
    }

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.packed, self.scale, self.scale_2, dtype)

    def fake_quant_input(self, x: jax.Array) -> jax.Array:
        """``x`` as this weight's matmul reads it: fake-quantized per 16 with ``input_scale`` in W4A4 mode."""
        if self.mode != "w4a4":
            return x
        if self.input_scale is None:
            raise QuantError("w4a4 mode needs input_scale (calibrate, or load a checkpoint that has it)")
        return fake_quant(x, self.input_scale)

    def matmul(self, x: jax.Array) -> jax.Array:
        """``x [..., K] @ W^T -> [..., N]`` in x's dtype (fp32 accumulation)."""
        x = self.fake_quant_input(x)
        return dot_rows(x, self.dequantize(x.dtype)).astype(x.dtype)

    def take_rows(self, idx) -> "NVFP4Weight":
        return self.replace(packed=jnp.take(self.packed, idx, axis=0), scale=jnp.take(self.scale, idx, axis=0))

    @classmethod
    def from_float(cls, w, input_scale=None, mode: str = "w4a16", name: str = "weight") -> "NVFP4Weight":
        """Quantize a float weight [..., N, K] (one global scale per leading index)."""
        check_quantizable(w, name)
        packed, scale, s2 = _quantize_jit(jnp.asarray(w))
        return cls(packed, scale, s2, None if input_scale is None else jnp.asarray(input_scale, jnp.float32), mode)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def stored_in(cls, ck, mod: str) -> bool:
        return mod + SUFFIXES["scale_2"] in ck

    @classmethod
    def tensor_names(cls, ck, mod: str, shape: tuple[int, int]) -> list[str]:
        N, K = shape
        if K % BLOCK:
            raise QuantError(f"{ck.path}: {mod}: input dimension {K} is not divisible by 16 (NVFP4)")
        names = {k: mod + sfx for k, sfx in SUFFIXES.items()}
        for k in ("packed", "scale", "scale_2"):
            if names[k] not in ck:
                raise QuantError(f"{ck.path}: quantized tensor {mod!r} has weight_scale_2 but no {names[k]!r}")
        check_tensor(ck, names["packed"], (N, K // 2), lambda d: d == np.uint8, "packed NVFP4 codes (U8)")
        check_tensor(ck, names["scale"], (N, K // BLOCK), lambda d: d.name == "float8_e4m3fn", "F8_E4M3 block scales")
        used = [names["packed"], names["scale"]]
        check_scale(ck, names["scale_2"], used)
        check_scale(ck, names["input_scale"], used, optional=True)
        return used

    @classmethod
    def stored_fields(cls, ck, mods: list[str], shape: tuple[int, int]) -> dict[str, tuple[str, tuple]]:
        N, K = shape
        fields = {"packed": (SUFFIXES["packed"], (N, K // 2)), "scale": (SUFFIXES["scale"], (N, K // BLOCK)),
                  "scale_2": (SUFFIXES["scale_2"], ())}
        if all(m + SUFFIXES["input_scale"] in ck for m in mods):
            fields["input_scale"] = (SUFFIXES["input_scale"], ())
        return fields

    @classmethod
    def read(cls, ck, mods: list[str], shape: tuple[int, int], *, stacked: bool = False, configs: dict | None = None,
             **run_options) -> "NVFP4Weight":
        if run_options.get("nvfp4_mode") == "w4a4" and not all(m + SUFFIXES["input_scale"] in ck for m in mods):
            raise QuantError(f"{ck.path}: nvfp4_mode='w4a4' needs {mods[0] + SUFFIXES['input_scale']!r}")
        return super().read(ck, mods, shape, stacked=stacked, configs=configs, **run_options)

    def checkpoint_tensors(self, mod: str):
        yield mod + SUFFIXES["packed"], np.asarray(self.packed)
        yield mod + SUFFIXES["scale"], np.asarray(self.scale)
        yield mod + SUFFIXES["scale_2"], np.asarray(self.scale_2).astype(np.float32).reshape(())
        if self.input_scale is not None:
            yield mod + SUFFIXES["input_scale"], np.asarray(self.input_scale).astype(np.float32).reshape(())

    @classmethod
    def quant_config(cls, entries: dict[str, dict]) -> tuple[str, dict]:
        """ModelOpt: "NVFP4" when every module has its activation scale (W4A4), else "W4A16_NVFP4"."""
        w4a4 = all(e["input_scale"] for e in entries.values())
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}
        return "modelopt", {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "group_size": BLOCK,
                            "weights": dict(fp4), "input_activations": dict(fp4) if w4a4 else None}

    # ------------------------------------------------------------------------------------------------ sharding
    def partition_specs(self, logical: tuple, spec) -> "NVFP4Weight":
        """Codes and block scales follow the weight, its input dimension split only at whole 16-blocks; the
        per-tensor scales follow the bank axes."""
        lead, k_axis = len(logical) - 2, len(logical) - 1
        blocks = {k_axis: self.scale.shape[-1]}  # K / 16
        s = spec(self.packed.shape, logical, blocks)
        return self.replace(packed=s, scale=spec(self.scale.shape, logical, blocks),
                            scale_2=per_tensor_spec(self.scale_2, s, lead),
                            input_scale=per_tensor_spec(self.input_scale, s, lead))


_quantize_jit = jax.jit(quantize)


def check_quantizable(w, name: str) -> None:
    """Raise QuantError naming ``name`` for a shape or value NVFP4 cannot take."""
    shape = tuple(w.shape)
    if len(shape) < 2:
        raise QuantError(f"{name}: NVFP4 needs a matrix [out, in], got shape {list(shape)}")
    if shape[-1] % BLOCK:
        raise QuantError(f"{name}: input dimension {shape[-1]} is not divisible by the NVFP4 block size 16")
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(w, jnp.float32)))):
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
