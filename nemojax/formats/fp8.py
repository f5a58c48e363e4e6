"""FP8 (E4M3) weights as NVIDIA ModelOpt exports them (``quant_algo: FP8``): per linear a ``float8_e4m3fn``
``weight`` [N, K], a float32 per-tensor ``weight_scale`` (one per expert for routed experts) and, for W8A8, a
float32 static ``input_scale``. Quantization is bit-exact with ModelOpt 0.47's export path:

    weight_scale = float32(amax) / 448                 amax = max|W| of the matrix (of the expert)
    weight       = e4m3(dtype(float32(W) / weight_scale))
    W           ~= float32(weight) * weight_scale

``dtype`` is the export dtype (bf16 in practice): ModelOpt divides the bf16 tensor by a 0-d float32 scale, which
torch evaluates in float32 and rounds to **bf16**, and only then casts to e4m3 -- two round-to-nearest-even
steps. Rounding the float32 quotient straight to e4m3 differs in ~3% of the elements. No clamp is needed:
``|W| / weight_scale <= 448`` up to an ulp.

Activations (W8A8) are fake-quantized per tensor with the static scale as ModelOpt's own FP8 fake quant
(``tensor_quant._fp8_eager``) does it: ``m = 448 * (1 / amax)`` (torch's ``448.0 / amax`` is a reciprocal
times 448), ``x_hat = e4m3(clip(x * m, +-448)) * (1 / m)``. The calibrated amax is recovered from
``input_scale = amax / 448`` exactly: ModelOpt keeps amax in the model dtype (bf16), and ``input_scale * 448``
rounded to bf16 is that amax (``calib_dtype``).

Checkpoint (ModelOpt, ``hf_quant_config.json`` quant_algo ``FP8``, no group size): module ``M`` is ``M.weight``
(F8_E4M3 [N, K]), ``M.weight_scale`` (F32 []) and, when calibrated, ``M.input_scale`` (F32 []); experts one module
each (every expert of a bank carries the bank's one input_scale). The node's leaves are these tensors as stored,
stacked over the experts of a bank. A checkpoint written without calibration (``nemojax convert --to fp8``) is
weight-only: no input_scale, config.json's ``quantization_config`` without ``input_activations``; it runs W8A16.
Execution mode (run option ``fp8_mode``, ``nemojax.quant.set_mode``): "w8a16" (default) or "w8a8".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import (BLOCK_LINEARS, NANO_SELECTIVE, QuantError, QuantFormat, check_scale, check_tensor, dot_rows,
                   expert_index, ieee_div, per_tensor_spec, register, tile_rows)

__all__ = ["FP8Weight", "quantize", "dequantize", "fake_quant", "activation_multiplier", "check_quantizable",
           "check_arrays", "rows_product", "E4M3_MAX", "MODES", "SUFFIXES"]

E4M3_MAX = 448.0
MODES = ("w8a16", "w8a8")
FP8 = jnp.dtype(jnp.float8_e4m3fn)
# checkpoint suffixes of one module, by leaf: e4m3 codes, per-tensor weight scale, (optional) activation scale
SUFFIXES = {"weight": ".weight", "weight_scale": ".weight_scale", "input_scale": ".input_scale"}
_FP8_TYPE = {"dynamic": False, "num_bits": 8, "type": "float"}


def _rounded(x, dtype):
    """``x.astype(dtype)`` that stays a rounding: behind a barrier no convert-chain simplification (XLA may drop
    an ``f32 -> bf16 -> f32`` pair when excess precision is allowed) can skip it."""
    return jax.lax.optimization_barrier(x.astype(dtype))


def quantize(w: jax.Array, amax=None, export_dtype=None):
    """ModelOpt FP8 export of a weight [..., N, K]: one scale per matrix (per leading index, e.g. per expert).

    ``amax`` (float, [...]) defaults to max|w| per matrix; ``export_dtype`` (default: w's dtype) is the dtype
    ModelOpt exports in -- the weight is cast to it and the quotient rounded to it before the e4m3 cast. An
    all-zero matrix gets weight_scale 1.0 and zero codes (ModelOpt would write scale 0 and NaN codes).
    Returns (weight float8_e4m3fn [..., N, K], weight_scale float32 [...]).
    """
    dtype = jnp.dtype(export_dtype or w.dtype)
    if amax is None:
        amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=(-2, -1))
    amax = jnp.asarray(amax, jnp.float32)
    s = ieee_div(amax, jnp.float32(E4M3_MAX))
    s = jnp.where(amax > 0, s, jnp.float32(1.0))
    q = ieee_div(w.astype(dtype).astype(jnp.float32), s[..., None, None])
    if dtype.itemsize < 4:  # bf16 / f16 export: the quotient is a tensor of that dtype
        q = _rounded(q, dtype)
    return q.astype(FP8), s


def dequantize(weight, weight_scale, dtype=jnp.float32) -> jax.Array:
    """(weight e4m3 [..., N, K], weight_scale f32 [...]) -> W [..., N, K] in ``dtype`` (one float32 product)."""
    s = jnp.asarray(weight_scale, jnp.float32)[..., None, None]
    return (weight.astype(jnp.float32) * s).astype(dtype)


def _e4m3_f16(codes: jax.Array) -> jax.Array:
    """uint8 E4M3 codes -> 2^-8 x their values as float32 (NaN codes excepted): an E4M3 code's exponent and
    mantissa moved to bits 13..7 of a float16 are a float16 of the same mantissa whose exponent is biased by 15
    instead of 7, subnormals included; the float16 -> float32 conversion is exact."""
    b = codes.astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(((b & 0x7F) << 7) | ((b & 0x80) << 8), jnp.float16).astype(jnp.float32)


def rows_product(x: jax.Array, weight, weight_scale) -> jax.Array:
    """``x [M, K] @ W^T -> [M, N]`` float32 for a 2-D weight (e4m3 [N, K], weight_scale []), reading only the
    one-byte codes: the weight is decoded 64 rows at a time into a float32 tile that stays in cache.

    For the few rows of a decode step on a CPU, where ``dequantize`` + one product writes the whole dequantized
    weight and reads it back. The codes are sliced as bytes (8-bit float slices are slow on XLA:CPU), decoded by
    moving their bits into a float16 (``_e4m3_f16``), behind optimization barriers (else XLA hoists the byte view
    or the decode out of the loop and materializes it); the scale (and the decode's 2^8) multiplies the [M, N]
    result. The codes' values are exact in float32, so this is the fp32 product of ``codes x scale`` up to rounding
    order.
    """
    N, K = weight.shape
    M = x.shape[0]
    T = tile_rows(N)
    pad = -N % T
    if pad:
        weight = jnp.pad(weight, ((0, pad), (0, 0)))
    nt = (N + pad) // T
    wt = weight.reshape(nt, T, K)
    xf = x.astype(jnp.float32)

    def tile(i, acc):
        # the weight passes the barrier with the tile index, so its byte view fuses with the tile's slice; a view
        # taken outside the loop is a copy of the whole weight on XLA:CPU (3.5x slower at [10304, 2688])
        w8, i = jax.lax.optimization_barrier((wt, i))
        c = jax.lax.optimization_barrier(
            jax.lax.dynamic_index_in_dim(jax.lax.bitcast_convert_type(w8, jnp.uint8), i, keepdims=False))
        w = jax.lax.optimization_barrier(_e4m3_f16(c))
        y = jax.lax.dot_general(w, xf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [T, M]
        return jax.lax.dynamic_update_index_in_dim(acc, y, i, 0)

    acc = jax.lax.fori_loop(0, nt, tile, jnp.zeros((nt, T, M), jnp.float32))
    unit = jnp.asarray(weight_scale, jnp.float32).reshape(()) * 2.0 ** 8
    return acc.reshape(nt * T, M)[:N].T * unit


def activation_multiplier(input_scale, calib_dtype=jnp.bfloat16) -> jax.Array:
    """ModelOpt's fake-quant multiplier ``448 * (1 / amax)`` from a checkpoint's ``input_scale = amax / 448``.

    amax = input_scale * 448 rounded to ``calib_dtype``, the dtype ModelOpt calibrated in (its amax buffer has
    the model's dtype; exact for bf16); ``None`` keeps the float32 product. amax <= 2^-24 counts as 1, as in
    ModelOpt."""
    amax = jnp.asarray(input_scale, jnp.float32) * jnp.float32(E4M3_MAX)
    if calib_dtype is not None:
        amax = _rounded(amax, calib_dtype).astype(jnp.float32)
    amax = jnp.where(amax <= jnp.float32(2.0 ** -24), jnp.float32(1.0), amax)
    inv = jax.lax.optimization_barrier(jnp.float32(1.0) / amax)
    return jnp.float32(E4M3_MAX) * inv


def fake_quant(x: jax.Array, input_scale, calib_dtype=jnp.bfloat16) -> jax.Array:
    """ModelOpt's FP8 fake quantization of activations with a static per-tensor ``input_scale``:
    ``e4m3(clip(float32(x) * m, +-448)) * (1 / m)`` with ``m = activation_multiplier(input_scale)``, in x's dtype.
    """
    m = activation_multiplier(input_scale, calib_dtype)
    m_inv = jax.lax.optimization_barrier(jnp.float32(1.0) / m)
    q = _rounded(jnp.clip(x.astype(jnp.float32) * m, -E4M3_MAX, E4M3_MAX), FP8)
    return (q.astype(jnp.float32) * m_inv).astype(x.dtype)


@register
@struct.dataclass
class FP8Weight(QuantFormat):
    """A quantized linear weight (or a stacked bank of experts) in ModelOpt's FP8 layout.

    weight float8_e4m3fn [..., N, K]; weight_scale float32 [...]; input_scale float32 [...] or None (static
    activation scale for W8A8). ``mode`` (static): "w8a16" (dequantize into the matmul) or "w8a8" (activations
    fake-quantized to e4m3 with ``input_scale`` first, as ModelOpt simulates an FP8 GEMM).
    """

    weight: jax.Array
    weight_scale: jax.Array
    input_scale: jax.Array | None = None
    mode: str = struct.field(pytree_node=False, default="w8a16")
    backend: str = struct.field(pytree_node=False, default="xla")  # kernels: "cpu" only (``nemojax.kernels``)

    name = "fp8"
    quant_algos = ("FP8",)
    group_size = None
    modes = MODES
    activation_modes = ("w8a8",)
    input_scale_divisor = E4M3_MAX
    recipes = {
        "fp8": {**NANO_SELECTIVE, "kv_cache": "fp8",
                "about": "ModelOpt FP8 (per-tensor E4M3), the Nemotron-3-Nano selective layout as for NVFP4 "
                         "(attention, router, conv1d, lm_head and the Mamba layer before each attention layer kept "
                         "BF16)"},
        "fp8-all": {**BLOCK_LINEARS, "kv_cache": "fp8",
                    "about": "ModelOpt FP8, every linear of the blocks (router and conv1d kept BF16), the layout "
                             "of ModelOpt's FP8_DEFAULT_CFG on Nemotron-H"},
    }

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.weight, self.weight_scale, dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """``x [..., K] @ W^T -> [..., N]`` in x's dtype (fp32 accumulation); a stacked bank ``[E, N, K]`` gives
        ``[..., E, N]`` (in W8A8 each expert fake-quantizes x with its own input_scale)."""
        if self.weight.ndim not in (2, 3):
            raise QuantError(f"FP8 matmul needs a matrix [N, K] or a bank [E, N, K], got {list(self.shape)}")
        if x.shape[-1] != self.weight.shape[-1]:
            raise QuantError(f"FP8 matmul: input [..., {x.shape[-1]}] does not match weight {list(self.shape)}")
        if self.mode not in MODES:
            raise QuantError(f"FP8 mode {self.mode!r} is not one of {MODES}")
        w = self.dequantize(x.dtype)
        if self.mode == "w8a8":
            if self.input_scale is None:
                raise QuantError("w8a8 mode needs input_scale (calibrate, or load a checkpoint that has it)")
            if w.ndim == 3:  # x [..., K] -> one fake-quantized copy per expert [..., E, K]
                xq = fake_quant(x[..., None, :], jnp.asarray(self.input_scale)[:, None])
                return jnp.einsum("...ek,enk->...en", xq, w, preferred_element_type=jnp.float32).astype(x.dtype)
            x = fake_quant(x, self.input_scale)
        return dot_rows(x, w).astype(x.dtype)

    def take_rows(self, idx) -> "FP8Weight":
        return self.replace(weight=jnp.take(self.weight, idx, axis=0))

    @classmethod
    def from_float(cls, w, input_scale=None, mode: str = "w8a16", name: str = "weight") -> "FP8Weight":
        """Quantize a float weight [..., N, K] (one scale per leading index), as ModelOpt exports it in w's dtype;
        ``input_scale`` (a number or [...]) is broadcast to one per leading index."""
        check_quantizable(w, name)
        if mode not in MODES:
            raise QuantError(f"{name}: FP8 mode {mode!r} is not one of {MODES}")
        weight, scale = _quantize_jit(jnp.asarray(w))
        ins = None if input_scale is None else jnp.broadcast_to(jnp.asarray(input_scale, jnp.float32), scale.shape)
        return cls(weight, scale, ins, mode)

    @classmethod
    def from_arrays(cls, weight, weight_scale, input_scale=None, mode: str = "w8a16",
                    name: str = "weight") -> "FP8Weight":
        """A node from checkpoint arrays (NumPy or jax), checked (:func:`check_arrays`)."""
        if mode not in MODES:
            raise QuantError(f"{name}: FP8 mode {mode!r} is not one of {MODES}")
        return cls(*(None if a is None else jnp.asarray(a)
                     for a in check_arrays(weight, weight_scale, input_scale, name)), mode)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def stored_in(cls, ck, mod: str) -> bool:
        return mod + SUFFIXES["weight_scale"] in ck and mod + ".weight_scale_2" not in ck  # NVFP4 has a _2

    @classmethod
    def tensor_names(cls, ck, mod: str, shape: tuple[int, int]) -> list[str]:
        names = {k: mod + sfx for k, sfx in SUFFIXES.items()}
        if names["weight"] not in ck:
            raise QuantError(f"{ck.path}: quantized tensor {mod!r} has weight_scale but no {names['weight']!r}")
        check_tensor(ck, names["weight"], tuple(shape), lambda d: d.name == "float8_e4m3fn", "F8_E4M3 codes")
        used = [names["weight"]]
        check_scale(ck, names["weight_scale"], used)
        check_scale(ck, names["input_scale"], used, optional=True)
        return used

    @classmethod
    def stored_fields(cls, ck, mods: list[str], shape: tuple[int, int]) -> dict[str, tuple[str, tuple]]:
        fields = {"weight": (SUFFIXES["weight"], tuple(shape)), "weight_scale": (SUFFIXES["weight_scale"], ())}
        if all(m + SUFFIXES["input_scale"] in ck for m in mods):
            fields["input_scale"] = (SUFFIXES["input_scale"], ())
        return fields

    @classmethod
    def read(cls, ck, mods: list[str], shape: tuple[int, int], *, stacked: bool = False, configs: dict | None = None,
             copy: bool = True, **run_options) -> "FP8Weight":
        """The stored tensors, each module's values checked (no NaN codes, finite positive scales). A mapped routed
        expert (``copy=False``) keeps its codes on disk until a product reads them, so its codes are not scanned
        (that would read every expert at load: 29 GB at the real shapes); its dtype, shape and scale are, and
        ``nemojax verify`` (a plain load) scans every code."""
        for m in mods:
            ins = m + SUFFIXES["input_scale"]
            try:
                check_arrays(ck.get(m + SUFFIXES["weight"]), ck.get(m + SUFFIXES["weight_scale"]),
                             ck.get(ins) if ins in ck else None, m,
                             scan_codes=copy or expert_index(m) is None)
            except QuantError as e:
                raise QuantError(f"{ck.file_of(m + SUFFIXES['weight'])}: {e}") from None
        return super().read(ck, mods, shape, stacked=stacked, configs=configs, copy=copy, **run_options)

    def checkpoint_tensors(self, mod: str):
        yield mod + SUFFIXES["weight"], np.asarray(self.weight)
        yield mod + SUFFIXES["weight_scale"], np.asarray(self.weight_scale).astype(np.float32).reshape(())
        if self.input_scale is not None:
            yield mod + SUFFIXES["input_scale"], np.asarray(self.input_scale).astype(np.float32).reshape(())

    @classmethod
    def quant_config(cls, entries: dict[str, dict]) -> tuple[str, dict]:
        """ModelOpt "FP8" (static per-tensor scales); ``input_activations`` only when every module has its
        activation scale (W8A8), else the checkpoint is weight-only."""
        w8a8 = all(e["input_scale"] for e in entries.values())
        return "modelopt", {"quant_algo": "FP8", "group_size": None, "weights": dict(_FP8_TYPE),
                            "input_activations": dict(_FP8_TYPE) if w8a8 else None}

    # ------------------------------------------------------------------------------------------------ sharding
    def partition_specs(self, logical: tuple, spec) -> "FP8Weight":
        """The codes follow the weight; the per-tensor scales follow the bank axes."""
        lead = len(logical) - 2
        s = spec(self.weight.shape, logical)
        return self.replace(weight=s, weight_scale=per_tensor_spec(self.weight_scale, s, lead),
                            input_scale=per_tensor_spec(self.input_scale, s, lead))


_quantize_jit = jax.jit(quantize, static_argnames=("export_dtype",))


def check_arrays(weight, weight_scale, input_scale=None, name: str = "weight", scan_codes: bool = True):
    """Checkpoint arrays of a node, checked (QuantError naming ``name``): e4m3 (or its uint8 bytes) weight
    [..., N, K] without NaN codes (``scan_codes=False``: not scanned, which reads no code), finite positive scales
    of shape [...] (a size-1 scale of a matrix is accepted).
    Returns NumPy ``(weight e4m3, weight_scale f32 [...], input_scale f32 [...] or None)``."""
    weight = np.asarray(weight)
    if weight.dtype == np.uint8:
        weight = weight.view(FP8)
    if weight.dtype != FP8 or weight.ndim < 2:
        raise QuantError(f"{name}.weight: FP8 needs float8_e4m3fn [..., out, in], got {weight.dtype} "
                         f"{list(weight.shape)}")
    if scan_codes and np.any((weight.view(np.uint8) & 0x7F) == 0x7F):
        raise QuantError(f"{name}.weight: contains NaN codes (an all-zero tensor exported with scale 0?)")
    lead = weight.shape[:-2]

    def scale(a, what):
        a = np.asarray(a, np.float32)
        if a.shape != lead and not (a.size == 1 and not lead):
            raise QuantError(f"{name}.{what}: shape {list(a.shape)} does not match weight {list(weight.shape)}")
        if not np.all(np.isfinite(a) & (a > 0)):
            raise QuantError(f"{name}.{what}: scales must be finite and positive")
        return a.reshape(lead)

    ins = None if input_scale is None else scale(input_scale, "input_scale")
    return weight, scale(weight_scale, "weight_scale"), ins


def check_quantizable(w, name: str) -> None:
    """Raise QuantError naming ``name`` for a shape or value FP8 cannot take."""
    shape = tuple(w.shape)
    if len(shape) < 2:
        raise QuantError(f"{name}: FP8 needs a matrix [out, in], got shape {list(shape)}")
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(w, jnp.float32)))):
        raise QuantError(f"{name}: contains NaN or Inf values; cannot quantize")
