"""The HLWQ weight node (:class:`HLWQWeight`): both inference paths, stacked banks, validation of checkpoint
arrays, and the format interface (``nemojax.formats.base``): polarengine checkpoints (layouts A/B/C read, B
written, ``polar_config.json``), partition specs, orbax description.

Inference (``path`` static): "dequant" rebuilds ``W_hat`` in the activation dtype and does one matmul
(bit-identical to the package's BF16 dequant for bf16 activations); "rotated" never applies ``H`` to the weights:
``W x = (W H)(H x)`` blockwise, so it rotates ``x`` once per 128-block (``hadamard.fwht``) and contracts with
``table[code] / sqrt(128) * norm`` -- one rotation can serve several matrices that read the same input
(:meth:`HLWQWeight.rotate` + :meth:`HLWQWeight.matmul_rotated`; the routed experts share it through
:meth:`HLWQWeight.input_transform`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from ..base import QuantError, QuantFormat, dot_rows, register
from .checkpoint import layer_entry, layout_kind, module_tensors, polar_config, read_layout
from .codebook import check_bits, lloyd_max_table
from .codes import dequantize, lookup, quantize_jit, scaled_table
from .hadamard import BLOCK, padded_in, rotate
from .packing import pack_lsb, unpack_lsb

__all__ = ["HLWQWeight", "PATHS", "check_quantizable"]

PATHS = ("dequant", "rotated")


@register
@struct.dataclass
class HLWQWeight(QuantFormat):
    """An HLWQ-quantized linear weight (or a stacked bank, e.g. experts ``[E, N, K]``).

    Leaves: ``packed`` uint8 ``[..., N, K_pad*bits/8]`` (LSB-first codes, ``packing.pack_lsb``), ``norms`` float16
    ``[..., N, K_pad/128]``, ``table`` float32 ``[..., 2^bits]``: the levels, *broadcast over the leading axes* so
    that every leaf has the bank axes first and ``jax.tree.map(lambda a: a[e], node)`` (or
    ``dynamic_index_in_dim``) gives expert ``e`` (a few hundred bytes per expert; it also lets a checkpoint's
    per-tensor ``.ct`` be kept as is). Static: ``bits``, ``in_features`` (K before padding), ``path``:
    "dequant" (rebuild W in x's dtype, one matmul) or "rotated" (rotate x by ``fwht``, contract with
    ``table[code] / sqrt(128) * norm``; no Hadamard on the weights).
    """

    packed: jax.Array
    norms: jax.Array
    table: jax.Array
    bits: int = struct.field(pytree_node=False, default=5)
    in_features: int = struct.field(pytree_node=False, default=0)
    path: str = struct.field(pytree_node=False, default="dequant")
    backend: str = struct.field(pytree_node=False, default="xla")  # "xla" | "pallas" | "triton" (quant.set_backend)

    name = "hlwq"
    input_split_in_shard_map = False  # the static in_features describes the whole row
    quantizes_embeddings = True  # polarengine quantizes every matrix, the embedding table and lm_head too
    recipes = {
        # the Mamba-aware rule set of the polarengine HLWQ-Q5 Nemotron checkpoints: every matrix (embeddings and
        # lm_head included) except the router and conv1d
        "hlwq-q5": {"quantize": ("*",), "exclude": ("*.gate", "*.conv1d"), "bits": 5,
                    "about": "polarengine HLWQ 5-bit, layout B (packed codes + polar_config.json)"},
        "hlwq-q5-converged": {"quantize": ("*",), "exclude": ("*.gate", "*.conv1d"), "bits": 5,
                              "codebook": "converged",
                              "about": "the same with the converged Lloyd-Max codebook (stored per tensor)"},
    }

    @property
    def k_pad(self) -> int:
        return self.packed.shape[-1] * 8 // self.bits

    @property
    def n_blocks(self) -> int:
        return self.k_pad // BLOCK

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.in_features)

    def codes(self) -> jax.Array:
        """uint8 codes ``[..., N, K_pad]``."""
        return unpack_lsb(self.packed, self.bits, self.k_pad)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.codes(), self.norms, self.table, self.in_features, dtype)

    def rotate(self, x: jax.Array) -> jax.Array:
        """``x [..., in_features]`` -> ``H x`` per 128-block ``[..., K_pad]`` (zero padded), in x's dtype
        (computed in float32). Share it between matrices that read the same x via :meth:`matmul_rotated`."""
        self.check_input(x)
        return rotate(x, self.k_pad)

    def matmul_rotated(self, xr: jax.Array, dtype=None) -> jax.Array:
        """``xr = fwht(pad(x)) [..., K_pad]`` (e.g. from :meth:`rotate`) -> ``x @ W^T [..., N]`` (fp32
        accumulation; result in ``dtype``, default xr's). For a stacked node the bank axes come after x's."""
        if xr.shape[-1] != self.k_pad:
            raise QuantError(f"HLWQ matmul_rotated: input has {xr.shape[-1]} features, expected K_pad={self.k_pad}")
        return _matmul_rotated(self, xr, jnp.dtype(dtype or xr.dtype))

    def matmul(self, x: jax.Array) -> jax.Array:
        """``x [..., in_features] @ W^T -> [..., N]`` in x's dtype (fp32 accumulation). A stacked node
        ``[E, N, K]`` gives ``[..., E, N]``."""
        self.check_input(x)
        if self.path == "rotated":
            return _matmul_rotated(self, rotate(x, self.k_pad), jnp.dtype(x.dtype))
        if self.path != "dequant":
            raise QuantError(f"HLWQ path {self.path!r} is not one of {PATHS}")
        return _matmul_dequant(self, x)

    def input_transform(self):
        """The rotation on the "rotated" path (computed once for every expert of a bank); None on "dequant"."""
        return self.rotate if self.path == "rotated" else None

    def matmul_transformed(self, xt: jax.Array, dtype=None) -> jax.Array:
        return self.matmul_rotated(xt, dtype)

    def take_rows(self, idx) -> "HLWQWeight":
        return self.replace(packed=jnp.take(self.packed, idx, axis=0), norms=jnp.take(self.norms, idx, axis=0))

    @classmethod
    def run_options(cls) -> tuple[str, ...]:
        return ("hlwq_path",)

    def configure(self, hlwq_path: str | None = None, **_) -> "HLWQWeight":
        """``hlwq_path``: the inference path ("dequant" | "rotated")."""
        return self if hlwq_path is None else self.replace(path=hlwq_path)

    def check_input(self, x):
        """QuantError unless ``x`` has ``in_features`` features."""
        if x.shape[-1] != self.in_features:
            raise QuantError(f"HLWQ matmul: input has {x.shape[-1]} features, the weight expects {self.in_features}")

    @classmethod
    def recipe_options(cls, mode: str | None = None, bits: int = 5, codebook: str = "compatible",
                       path: str = "dequant", **_) -> dict:
        """``bits`` (2..8), the codebook table ("compatible": polarquant's 100-iteration Lloyd-Max table;
        "converged": the optimum) and the inference ``path``."""
        super().recipe_options(mode)
        if codebook not in ("compatible", "converged") or path not in PATHS or not 2 <= bits <= 8:
            raise ValueError(f"bits {bits} / codebook {codebook!r} / path {path!r} invalid (bits 2..8, codebook "
                             f"'compatible'|'converged', path 'dequant'|'rotated')")
        return {"bits": bits, "table": lloyd_max_table(bits, 100 if codebook == "compatible" else None), "path": path}

    @classmethod
    def from_float(cls, w, bits: int = 5, table=None, path: str = "dequant", name: str = "weight") -> "HLWQWeight":
        """Quantize a float weight ``[..., N, K]`` (any K; rows are zero padded to whole 128-blocks)."""
        bits = check_bits(bits)
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
        packed, n, t, bits, in_features = _checked_arrays(codes, norms, table, bits, in_features, name, path)
        return cls(jnp.asarray(packed), jnp.asarray(n), jnp.asarray(t), bits, in_features, path)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @classmethod
    def stored_in(cls, ck, mod: str) -> bool:
        return layout_kind(ck, mod) is not None

    @classmethod
    def tensor_names(cls, ck, mod: str, shape: tuple[int, int]) -> list[str]:
        got = module_tensors(ck, mod)
        if not any(n.endswith(("norms", "weight__norms")) for n in got) or len(got) < 2:
            raise QuantError(f"{ck.file_of(got[0])}: HLWQ tensor {mod!r} has codes but no norms")
        return got

    @classmethod
    def read(cls, ck, mods: list[str], shape: tuple[int, int], *, stacked: bool = False, configs: dict | None = None,
             hlwq_path: str | None = None, copy: bool = True, **_) -> "HLWQWeight":
        """Any polarengine layout (``configs["polar"]``: the parsed ``polar_config.json``, or None); ``copy=False``:
        arrays that need no conversion stay the checkpoint's read-only views."""
        path = hlwq_path or "dequant"
        pc = (configs or {}).get("polar")
        nodes = []
        for mod in mods:
            codes, norms, table, bits, in_f = read_layout(ck, mod, shape, pc)
            arrays = _checked_arrays(codes, norms, table, bits, in_f, mod, path)
            nodes.append(cls(*(np.array(a) if copy else a for a in arrays[:3]), *arrays[3:], path))  # owned copies
        return jax.tree.map(lambda *a: np.stack(a), *nodes) if stacked else nodes[0]

    def checkpoint_tensors(self, mod: str):
        """Layout B: the packed codes as stored, the raw levels as ``.ct`` (exact: a stored ``ct_scaled`` would
        not round-trip bit for bit), the norms."""
        yield mod + ".codes", np.asarray(self.packed, np.uint8)
        yield mod + ".ct", np.asarray(self.table, np.float32).reshape(-1, 1 << self.bits)[0]
        yield mod + ".norms", np.asarray(self.norms, np.float16)

    def config_entry(self) -> dict:
        return layer_entry(self.shape[-2], self.in_features, self.bits)

    @classmethod
    def quant_config(cls, entries: dict[str, dict]) -> tuple[str, dict]:
        return "polar", polar_config(entries)

    # ------------------------------------------------------------------------------------------------ sharding
    def partition_specs(self, logical: tuple, spec) -> "HLWQWeight":
        """Codes and norms follow the weight, the input dimension split only at whole 128-blocks; the table
        follows the bank axes."""
        lead, k_axis = len(logical) - 2, len(logical) - 1
        blocks = {k_axis: self.norms.shape[-1]}  # K_pad / 128
        s = spec(self.packed.shape, logical, blocks)
        return self.replace(packed=s, norms=spec(self.norms.shape, logical, blocks), table=P(*s[:lead], None))


def _checked_arrays(codes, norms, table, bits, in_features, name: str, path: str):
    """Checkpoint arrays validated for a node: ``(packed, norms, table, bits, in_features)`` (NumPy; packed
    LSB-first, norms float16, the table broadcast over the leading axes)."""
    _check_path(path, name)
    try:
        bits = check_bits(bits)
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
        want = [1 << bits] if not lead else f"[{1 << bits}] or {[*lead, 1 << bits]}"
        raise QuantError(f"{name}: HLWQ table shape {list(t.shape)}, expected {want} for {bits} bits")
    if not np.all(np.isfinite(t)):
        raise QuantError(f"{name}: HLWQ table contains NaN or Inf")
    return packed, n, np.broadcast_to(t, (*lead, 1 << bits)), bits, in_features


def _dot(x, w):
    return dot_rows(x, w)


@functools.partial(jax.jit, static_argnums=2)
def _matmul_rotated(node: HLWQWeight, xr, dtype):
    """``xr @ (W H)^T`` with ``W H = table[code] / sqrt(128) * norm`` per block, built in xr's dtype."""
    *lead, N, k_pad = (*node.packed.shape[:-1], node.k_pad)
    v = lookup(scaled_table(node.table), unpack_lsb(node.packed, node.bits))
    v = v.reshape(*lead, N, k_pad // BLOCK, BLOCK) * node.norms.astype(jnp.float32)[..., None]
    return _dot(xr, v.reshape(*lead, N, k_pad).astype(xr.dtype)).astype(dtype)


@jax.jit
def _matmul_dequant(node: HLWQWeight, x):
    w = dequantize(unpack_lsb(node.packed, node.bits), node.norms, node.table, node.in_features, x.dtype)
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
