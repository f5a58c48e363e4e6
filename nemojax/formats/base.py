"""The interface of a quantized-weight format, and the registry of formats.

A format is a node class: a ``flax.struct.dataclass`` subclassing :class:`QuantFormat` whose pytree leaves are the
stored arrays of one quantized linear weight (the float weight it encodes is ``[N, K]``, checkpoint layout
``[out, in]``) or of a stacked bank ``[..., N, K]`` (experts): every leaf has the bank axes first, so
``jax.tree.map(lambda a: a[e], node)`` is expert ``e``. Its static fields (``pytree_node=False``) are ``backend``
(``"xla"`` | ``"pallas"`` | ``"triton"``, set by ``nemojax.quant.set_backend``; every format declares it, default
``"xla"``) and the format's own. The *first* leaf is the main array, laid out like the float weight in its leading
axes (``[..., N, ...]``); code that only needs the bank / row axes of a node's partition specs reads that one.

A format registers itself with :func:`register` (``FORMATS[cls.name] = cls``); ``nemojax/formats/__init__.py``
imports the format modules on one line, in checkpoint-detection order (a new format: its module, and its name
added to that line). Generic code never names a format: it asks :func:`is_quantized` / :func:`format_of` and calls
the interface below. The kernels (``nemojax.kernels``) are keyed by ``(cls.name, node.backend)``; a format without
kernels runs its :meth:`QuantFormat.matmul` (the XLA reference) on every backend.

What a format implements (abstract unless a default is given):

node: ``shape``, ``dequantize(dtype)``, ``matmul(x)``, ``take_rows(idx)``, ``partition_specs(logical, spec)``,
``checkpoint_tensors(mod)``; with defaults: ``nbytes``, ``configure(**run_options)``, ``input_transform()`` /
``matmul_transformed(xt, dtype)``, ``config_entry()``, ``describe()``.
class: ``from_float(w, ..., name=)``, ``stored_in(ck, mod)``, ``tensor_names(ck, mod, shape)``,
``quant_config(entries)``, and either ``stored_fields(ck, mods, shape)`` or ``read(ck, mods, shape, ...)``; with
defaults: ``check_options(**run_options)``, ``recipe_options(mode, **fields)``, ``leaf_names()``,
``from_description(leaves, info)``; class attributes ``name``, ``quant_algos``, ``group_size``,
``input_split_in_shard_map``, ``recipes``, ``modes``, ``activation_modes``, ``input_scale_divisor``,
``quantizes_embeddings``.

Quantization recipes are data a format declares (``recipes``: ``{recipe name: {field: value}}``, the fields of
``nemojax.quant.Recipe`` less ``name`` / ``format``): ``nemojax.quant`` registers every format's recipes, in
registration order, and ``nemojax convert --to`` offers each as a target. A format with execution ``modes`` takes
``from_float(..., mode=)`` and the run option ``<name>_mode`` (``configure``; ``nemojax.quant.set_mode``) into its
static field ``mode``; the ``activation_modes`` among them quantize activations with the static leaf
``input_scale``, which calibration sets to the linear's input amax / ``input_scale_divisor`` (``from_float(w,
input_scale, ...)``).

``ck`` (a checkpoint) is anything with ``name in ck``, ``ck.shape(name)``, ``ck.dtype(name)`` (NumPy dtypes,
``ml_dtypes`` for bfloat16 / float8), ``ck.get(name)`` (a NumPy array, possibly memory-mapped),
``ck.file_of(name)`` and ``ck.path`` (``nemojax.checkpoint.Checkpoint``). Tensor names of a module are ``mod +
suffix`` (``mod``: the checkpoint module name without ``.weight``, e.g. ``backbone.layers.0.mixer.in_proj``; one
name per expert for a bank stored one expert per module). Errors are :class:`QuantError` naming the tensor (and
the file); the checkpoint layer turns them into its own error type with the same message.

A format whose leaves are a module's tensors as stored -- e.g. ModelOpt FP8 (``quant_algo`` "FP8": ``M.weight``
F8_E4M3 [N, K], ``M.weight_scale`` F32 [], optional ``M.input_scale`` F32 [], one module per expert) -- defines
``stored_fields`` and gets ``read``, sharded loading (each device reads its slice), orbax and the checkpoint writer
from the defaults; its ``stored_in`` must not claim a module of an earlier format (NVFP4's have
``weight_scale_2``), and ``quant_config`` returns ``("modelopt", {"quant_algo": "FP8", "group_size": None, ...})``.
Static fields must be JSON-able (:meth:`QuantFormat.describe`).
"""
from __future__ import annotations

import abc
import dataclasses
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

__all__ = ["QuantError", "QuantFormat", "FORMATS", "register", "is_quantized", "format_of", "check_run_options",
           "check_tensor", "check_scale", "ieee_div", "per_tensor_spec", "dot_rows", "tile_rows", "expert_index",
           "NANO_SELECTIVE", "BLOCK_LINEARS"]


FEW_ROWS = 32  # up to this many rows an fp32 product on CPU runs weight-major (see dot_rows)


def expert_index(mod: str) -> int | None:
    """The expert number of a routed expert's checkpoint module (``...experts.<e>.<proj>``), else None."""
    m = re.search(r"\.experts\.(\d+)\.", mod)
    return None if m is None else int(m.group(1))


def tile_rows(n: int) -> int:
    """Rows per tile of a weight decoded tile by tile on a CPU (the ``rows_product`` of nvfp4, hlwq.rows, fp8): 64 (a
    float32 tile of a few thousand columns stays in cache) or the largest of 32 / 16 / 8 that divides ``n``;
    8 when none does (the caller pads)."""
    for t in (64, 32, 16, 8):
        if n % t == 0:
            return t
    return 8


def dot_rows(x: jax.Array, w: jax.Array, weight_major: bool = False) -> jax.Array:
    """``x [..., K] @ w[..., N, K]^T -> [..., (bank,) N]`` float32: the product every weight's matmul ends in.

    XLA:CPU runs a single-row product of 16-bit operands by converting the whole weight to fp32 first (~1 GB/s);
    from two rows on it calls its packed GEMM library. On CPU a single row against a matrix is therefore computed
    as two (behind an optimization barrier, else the simplifier slices the second row away again).

    An fp32 product of 2..32 rows reads the weight at a third of the one-row rate when written ``x @ w^T``; as
    ``w @ x^T`` (the weight the left operand, a [N, rows] result) and the small result transposed it runs 1.4-3x
    faster on CPU (``tools/bench_cpu_paths.py``), so with ``weight_major`` (plain weights: ``nemojax.ops.linear``)
    it is computed that way (behind a barrier, else the simplifier folds the transpose back into the product).
    Quantized formats keep the plain order: their XLA product is the reference their kernels are checked against.
    """
    dims = (((x.ndim - 1,), (w.ndim - 1,)), ((), ()))
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    if (weight_major and w.ndim == 2 and x.dtype == w.dtype == jnp.float32 and 2 <= rows <= FEW_ROWS
            and jax.default_backend() == "cpu"):
        yt = jax.lax.dot_general(w, x.reshape(rows, -1), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return jax.lax.optimization_barrier(yt).T.reshape(*x.shape[:-1], w.shape[0])
    if (w.ndim == 2 and x.dtype != jnp.float32 and x.size == x.shape[-1] and x.size
            and jax.default_backend() == "cpu"):
        x2 = jax.lax.optimization_barrier(jnp.concatenate([x.reshape(1, -1)] * 2))
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return y[:1].reshape(*x.shape[:-1], w.shape[0])
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


class QuantError(ValueError):
    """Input a quantizer or a format cannot take (shape, non-finite values, inconsistent scales, malformed
    checkpoint tensors); names the tensor."""


class QuantFormat(abc.ABC):
    """Base class of the quantized-weight node classes (see the module docstring for the contract as a whole)."""

    #: registry key; also the orbax node ``type`` and the checkpoint-plan kind (``name`` / ``name + "_experts"``)
    name: str = ""
    #: ModelOpt ``quant_algo`` values (``hf_quant_config.json``) of checkpoints stored in this format
    quant_algos: tuple[str, ...] = ()
    #: the ModelOpt ``group_size`` a checkpoint of this format must state (None: the format has no groups)
    group_size: int | None = None
    #: whether the input dimension of a bank may be split over devices inside the MoE's ``shard_map`` (each device
    #: then holds a node for a slice of the inputs); False when a static field describes the whole row
    input_split_in_shard_map: bool = True
    #: the format's quantization recipes as plain data: ``{recipe name: {Recipe field: value}}`` (quantize, exclude,
    #: keep_mamba_before_attention, kv_cache, mode, about, and the format's own options, e.g. HLWQ's bits)
    recipes: dict = {}
    #: execution modes (``from_float(mode=)``, run option ``<name>_mode``), the default first; () for none
    modes: tuple[str, ...] = ()
    #: the modes that quantize activations with a static ``input_scale`` (they need one: calibrate first)
    activation_modes: tuple[str, ...] = ()
    #: ``input_scale = calibrated input amax / input_scale_divisor``; None: the format takes no activation scale
    input_scale_divisor: float | None = None
    #: whether a recipe may select the embedding table and lm_head (else only the linears of the blocks)
    quantizes_embeddings: bool = False

    # -------------------------------------------------------------------------------------------- the node
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape ``[..., N, K]`` of the float weight the node encodes (``K`` before any padding)."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    @abc.abstractmethod
    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight ``[..., N, K]`` in ``dtype``."""

    @abc.abstractmethod
    def matmul(self, x: jax.Array) -> jax.Array:
        """The reference (XLA) ``x [..., K] @ W^T -> [..., N]`` in x's dtype, fp32 accumulation; a stacked node
        ``[E, N, K]`` gives ``[..., E, N]``. ``nemojax.ops.linear`` (through ``nemojax.kernels.linear``) runs the
        node's backend kernel instead where one is registered."""

    def input_transform(self) -> Callable[[jax.Array], jax.Array] | None:
        """A transform of the activations that every expert of a bank applies before its matmul, so the routed
        experts compute it once per layer (HLWQ's rotated path: the per-block Hadamard rotation); None (the
        default): no such transform. With one, :meth:`matmul_transformed` takes its output."""
        return None

    def matmul_transformed(self, xt: jax.Array, dtype=None) -> jax.Array:
        """``x @ W^T`` from ``xt = self.input_transform()(x)``, result in ``dtype`` (default xt's)."""
        raise NotImplementedError(f"{type(self).__name__} has no input transform")

    @abc.abstractmethod
    def take_rows(self, idx: jax.Array) -> "QuantFormat":
        """The node of rows ``idx`` (int array of any shape) of a 2-D node (an embedding lookup):
        ``node.take_rows(idx).dequantize(dt) == jnp.take(node.dequantize(dt), idx, axis=0)``."""

    def configure(self, **run_options) -> "QuantFormat":
        """The node with the load-time run options of this format applied (``nvfp4_mode`` for NVFP4,
        ``hlwq_path`` for HLWQ; an option of another format, or None, is ignored). Default: for a format with
        ``modes``, its static field ``mode`` set from ``<name>_mode`` (an activation mode needs the leaf
        ``input_scale``: QuantError without one); else unchanged."""
        mode = run_options.get(f"{self.name}_mode")
        if not self.modes or mode is None:
            return self
        self.check_options(**{f"{self.name}_mode": mode})
        if mode in self.activation_modes and getattr(self, "input_scale", None) is None:
            raise QuantError(f"{self.name}_mode={mode!r} needs input_scale in the checkpoint (calibrated "
                             f"{self.name.upper()})")
        return self.replace(mode=mode)

    @classmethod
    def run_options(cls) -> tuple[str, ...]:
        """The names of this format's load-time run options (keyword arguments of ``nemojax.load``). Default:
        ``<name>_mode`` for a format with ``modes``, else none."""
        return (f"{cls.name}_mode",) if cls.modes else ()

    @classmethod
    def check_options(cls, **run_options) -> None:
        """Raise ValueError for a run option of this format with a value it does not take (others ignored).
        Default: ``<name>_mode`` must be one of ``modes`` (for a format with modes)."""
        mode = run_options.get(f"{cls.name}_mode")
        if cls.modes and mode is not None and mode not in cls.modes:
            raise ValueError(f"{cls.name}_mode={mode!r}: expected one of {cls.modes}")

    @classmethod
    def recipe_options(cls, mode: str | None = None, **fields) -> dict:
        """The ``from_float`` keyword options of a recipe: ``mode`` (None: the default, ``modes[0]``) and the
        recipe's other fields (a format picks its own; the rest are ignored). ValueError for a value the format
        does not take. Default: ``{"mode": mode}`` for a format with modes, else nothing."""
        if not cls.modes:
            if mode is not None:
                raise ValueError(f"mode {mode!r}: the {cls.name} format has no execution modes")
            return {}
        if mode is not None and mode not in cls.modes:
            raise ValueError(f"mode {mode!r} is not one of {cls.modes}")
        return {"mode": mode or cls.modes[0]}

    # -------------------------------------------------------------------------------------------- making one
    @classmethod
    @abc.abstractmethod
    def from_float(cls, w, *args, name: str = "weight", **options) -> "QuantFormat":
        """Quantize a float weight ``[..., N, K]`` (leading axes: a bank) with the format's options; QuantError
        naming ``name`` for a weight it cannot take."""

    # -------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    @abc.abstractmethod
    def stored_in(cls, ck, mod: str) -> bool:
        """Whether checkpoint module ``mod`` is stored in this format (from tensor names only; it must not claim a
        module of a format registered before it)."""

    @classmethod
    @abc.abstractmethod
    def tensor_names(cls, ck, mod: str, shape: tuple[int, int]) -> list[str]:
        """Every tensor of module ``mod`` (one expert), checked against the float weight ``shape`` [N, K] (names,
        shapes, dtypes; QuantError otherwise). The checkpoint reports tensors no module claims as unexpected."""

    @classmethod
    def stored_fields(cls, ck, mods: list[str], shape: tuple[int, int]) -> dict[str, tuple[str, tuple]] | None:
        """For a format whose leaves are a module's tensors as stored: ``{leaf: (suffix, shape of one module's
        tensor)}`` (optional tensors only when every module has them). Then :meth:`read` needs no override and
        sharded loading reads every device's slice straight from the file. None (default): the node is built by
        converting the tensors (:meth:`read` overridden; sharded loading reads it whole on the host)."""
        return None

    @classmethod
    def read(cls, ck, mods: list[str], shape: tuple[int, int], *, stacked: bool = False, configs: dict | None = None,
             copy: bool = True, **run_options) -> "QuantFormat":
        """The node of modules ``mods`` (one, or one per expert stacked along a new leading axis when ``stacked``)
        with NumPy arrays as leaves (owned copies, never the checkpoint's memory maps; ``copy=False``: the leaves
        of one module that are stored as used may be the read-only memory-mapped views, for
        ``load_params(..., mmap=True)``), ``run_options`` applied (:meth:`configure`). ``configs``: the
        checkpoint's parsed quantization configs (``{"modelopt": ..., "polar": ...}``, values None when absent).
        Default: the tensors of :meth:`stored_fields`."""
        fields = cls.stored_fields(ck, mods, shape)
        if fields is None:
            raise NotImplementedError(f"{cls.__name__}: define read() or stored_fields()")

        def get(sfx, shp):
            arrs = [(np.array if copy or stacked else np.asarray)(ck.get(m + sfx)).reshape(shp) for m in mods]
            return np.stack(arrs) if stacked else arrs[0]

        return cls(**{f: get(sfx, shp) for f, (sfx, shp) in fields.items()}).configure(**run_options)

    @abc.abstractmethod
    def checkpoint_tensors(self, mod: str) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, NumPy array)`` of a 2-D node stored as module ``mod`` (what :meth:`read` reads back)."""

    def config_entry(self) -> dict:
        """What the checkpoint's quantization config needs to know of this (2-D) module: a small JSON-able dict,
        collected per module while writing and passed to :meth:`quant_config`. Default: for a format with
        ``activation_modes``, ``{"input_scale": whether the module has its activation scale}``; else nothing."""
        return {"input_scale": getattr(self, "input_scale", None) is not None} if self.activation_modes else {}

    @classmethod
    @abc.abstractmethod
    def quant_config(cls, entries: dict[str, dict]) -> tuple[str, dict]:
        """The quantization config of a checkpoint whose modules ``entries`` ({module: :meth:`config_entry`}) are
        in this format: ``(family, config)``. Family ``"modelopt"``: config ``{"quant_algo", "group_size" (or None),
        "weights", "input_activations" (or None)}`` (``hf_quant_config.json`` and config.json's
        ``quantization_config`` are written from it, ``nemojax.checkpoint.modelopt``); ``"polar"``: the
        ``polar_config.json`` object."""

    # -------------------------------------------------------------------------------------------- sharding
    @abc.abstractmethod
    def partition_specs(self, logical: tuple, spec: Callable) -> "QuantFormat":
        """A node of the same type whose leaves are the ``PartitionSpec`` of each leaf, given the logical axis
        names of the float weight ``[..., N, K]`` it encodes (``("expert", "mlp", "embed")``) and ``spec(shape,
        logical, block_dims=None) -> PartitionSpec`` (the mesh rules: each logical axis to its mesh axis where
        that divides the dimension, or for ``block_dims = {axis: number of whole blocks}`` the block count)."""

    # -------------------------------------------------------------------------------------------- orbax
    @classmethod
    def leaf_names(cls) -> list[str]:
        """The pytree fields, in order (the first is the main array)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)]

    def describe(self) -> dict:
        """Static description: ``{"type": name, static field: value}`` (``backend`` left out: it is chosen when a
        model is run, not stored). JSON-able; :meth:`from_description` rebuilds the node."""
        static = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.metadata.get("pytree_node", True) and f.name != "backend"}
        return {"type": self.name, **static}

    @classmethod
    def from_description(cls, leaves: dict, info: dict) -> "QuantFormat":
        """The node from its leaves ``{field: array}`` (absent optional leaves: their default) and
        :meth:`describe`'s dict."""
        return cls(**leaves, **{k: v for k, v in info.items() if k != "type"})


#: recipe globs of the published Nemotron-3-Nano selective layout (its NVFP4 and FP8 checkpoints alike): routed and
#: shared experts, Mamba in/out projections and MLPs quantized; attention, router, conv1d, lm_head and the Mamba
#: layer before each attention layer kept in high precision
NANO_SELECTIVE = {"quantize": ("*.mixer.experts.*", "*.mixer.shared_experts.*", "*.mixer.in_proj", "*.mixer.out_proj",
                               "*.mixer.up_proj", "*.mixer.down_proj"),
                  "exclude": ("lm_head", "*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.conv1d", "*.gate"),
                  "keep_mamba_before_attention": True}
#: recipe globs of every linear of the blocks (attention and every Mamba layer too; router and conv1d kept)
BLOCK_LINEARS = {"quantize": ("*.mixer.*",), "exclude": ("*.conv1d", "*.gate")}

FORMATS: dict[str, type[QuantFormat]] = {}


def register(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator: ``FORMATS[cls.name] = cls`` (registration order is the checkpoint-detection order)."""
    if not cls.name or cls.name in FORMATS:
        raise ValueError(f"format name {cls.name!r} of {cls.__name__} is empty or taken")
    FORMATS[cls.name] = cls
    return cls


def is_quantized(x) -> bool:
    """Whether ``x`` is a quantized-weight node (of any format; a node of PartitionSpecs too)."""
    return isinstance(x, QuantFormat)


def format_of(x) -> type[QuantFormat] | None:
    """The format (node class) of a quantized node; None for anything else (a plain array)."""
    return type(x) if isinstance(x, QuantFormat) else None


def check_run_options(**run_options) -> None:
    """Every format's :meth:`QuantFormat.check_options` (ValueError for a bad value, or for an option no registered
    format has)."""
    known = {name for fmt in FORMATS.values() for name in fmt.run_options()}
    unknown = sorted(set(run_options) - known)
    if unknown:
        raise ValueError(f"unknown run option(s) {unknown}; the registered formats take {sorted(known)}")
    for fmt in FORMATS.values():
        fmt.check_options(**run_options)


def check_tensor(ck, name: str, want: tuple[int, ...], ok: Callable[[np.dtype], bool], what: str) -> None:
    """QuantError naming the tensor and its file unless ``ck``'s tensor ``name`` has shape ``want`` (``[1]`` for
    ``[]`` is fine) and a dtype ``ok`` accepts (``what`` describes it: "an F32 scale")."""
    got = ck.shape(name)
    if tuple(got) != tuple(want) and not (want == () and tuple(got) == (1,)):
        raise QuantError(f"{ck.file_of(name)}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
    dt = ck.dtype(name)
    if not ok(dt):
        raise QuantError(f"{ck.file_of(name)}: tensor {name!r} has dtype {dt}; expected {what}")


def check_scale(ck, name: str, used: list[str], optional: bool = False) -> None:
    """Check ``ck``'s F32 [] (or [1]) scale tensor ``name`` (:func:`check_tensor`) and add it to ``used``; an
    ``optional`` one only when the checkpoint has it."""
    if optional and name not in ck:
        return
    check_tensor(ck, name, (), lambda dt: dt == np.float32, "an F32 scale")
    used.append(name)


def per_tensor_spec(a, main_spec, lead: int):
    """The ``PartitionSpec`` of a per-tensor scale leaf ``a`` (one value per matrix: ``[]``, or ``[E]`` for a bank)
    of a node whose main array has ``main_spec`` with ``lead`` bank axes: it follows the bank axes; None stays."""
    return None if a is None else (P(*main_spec[:lead]) if a.ndim else P())


def ieee_div(a, b):
    """IEEE ``a / b`` also under jit: XLA turns ``x / broadcast(d)`` into ``x * (1/d)``, which is off by an ulp
    now and then and flips rounding ties. Materialising ``b`` behind a barrier prevents it."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))))
