"""Hugging Face safetensors checkpoints -> the parameter pytree (``nemojax.params`` layout).

Reads a checkpoint folder (``nemojax.checkpoint.source``: an index, ``model.safetensors`` or one shard set) in
original NVIDIA naming (``backbone.*``, one tensor per expert) or transformers-5 naming (``model.*``, experts
stacked in ``mixer.experts.up_proj`` / ``down_proj``). Tensors are memory-mapped and converted one at a time, so
peak host memory is about the final parameters plus one tensor. :class:`Reader` is the one reader of plan items
every loop uses (loading, sharded loading, the conversions).

``load_params(..., mmap=True)`` (CPU only) keeps the parameters stored as they are used in the files' read-only
memory maps instead of copying them (:class:`MapReport` counts what was mapped and what was copied).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..experts.bank import HostBank
from ..formats import QuantFormat
from ..formats.base import check_run_options
from ..params import leaf_dtype
from .orbax import OrbaxError, is_orbax_checkpoint, load_orbax
from .plan import PlanItem, nest, plan
from .source import Checkpoint, CheckpointError, read_quant_configs

__all__ = ["Reader", "MapReport", "load_params", "resolve_dtype", "read_region", "progress_bar", "stack_banks",
           "check_mmap"]

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype, argname: str = "dtype"):
    """'bfloat16' | 'float32' | 'float16' (or a jnp dtype) -> jnp dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"{argname}={dtype!r} is not supported; use one of 'bfloat16', 'float32', 'float16'")
        return jnp.dtype(_DTYPES[dtype.lower()])
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{argname}={dtype!r} is not a dtype") from None
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise ValueError(f"{argname}={dtype!r} is not supported; use one of bfloat16, float32, float16")
    return dt


def read_region(ck: Checkpoint, names, shape: tuple[int, ...], stacked: bool, dtype, index=None,
                suffix: str = "") -> np.ndarray:
    """Region ``index`` (a tuple of ints / slices over ``shape``; None: all of it) of a parameter of ``shape``
    stored as the one tensor ``names[0] + suffix``, or (``stacked``) as one tensor ``names[e] + suffix`` per
    expert, as an owned C-ordered array of ``dtype`` (never a view of the checkpoint's memory map). Experts are
    copied one at a time into the output, so memory holds the output and nothing more."""
    if not stacked:
        return np.array(ck.get(names[0] + suffix).reshape(shape)[... if index is None else index], dtype=dtype,
                        copy=True, order="C")
    first, rest = (slice(None), ()) if index is None else (index[0], tuple(index[1:]))
    one = lambda e: ck.get(names[e] + suffix).reshape(shape[1:])[rest]  # noqa: E731
    if not isinstance(first, slice):
        return np.array(one(first), dtype=dtype, copy=True, order="C")
    experts = range(*first.indices(len(names)))
    piece = np.broadcast_to(np.zeros((), dtype), shape[1:])[rest].shape  # the region of one expert (no data)
    out = np.empty((len(experts), *piece), dtype)
    for j, e in enumerate(experts):
        out[j] = one(e)
    return out


class Reader:
    """Reads the items of a checkpoint's plan: ``items`` (:func:`nemojax.checkpoint.plan.plan`), and per item
    :meth:`float` (an array), :meth:`node` (a quantized node) or :meth:`value` (whichever it is stored as).

    ``base``: the checkpoint supplying buffers ``ck`` lacks; ``configs``: the folder's quantization configs
    (``read_quant_configs``; None: read when a quantized item is first read); ``run_options``: the formats'
    run options (``nvfp4_mode``, ``hlwq_path``) applied to every node.
    """

    def __init__(self, ck: Checkpoint, cfg: Config, base: Checkpoint | None = None, configs: dict | None = None,
                 run_options: dict | None = None):
        self.ck, self.cfg, self.base = ck, cfg, base
        self._configs = configs
        self.run_options = dict(run_options or {})
        self.items = plan(ck, cfg, base)

    @classmethod
    def open(cls, path, cfg: Config, base=None, run_options: dict | None = None) -> "Reader":
        """The reader of checkpoint folder ``path`` (its quantization configs read and checked first)."""
        ck = Checkpoint(path)
        configs = read_quant_configs(ck.path)
        return cls(ck, cfg, Checkpoint(base) if base is not None else None, configs, run_options)

    def quant_configs(self) -> dict:
        """The folder's quantization configs (read and checked on first use)."""
        if self._configs is None:
            self._configs = read_quant_configs(self.ck.path)
        return self._configs

    def checkpoint_of(self, item: PlanItem) -> Checkpoint:
        return self.base if item.source == "base" else self.ck

    def dtype_of(self, item: PlanItem, dtype) -> np.dtype:
        """The NumPy dtype a float item is read as: ``dtype``, float32 for fp32 leaves and KV-cache scales."""
        return np.dtype(jnp.float32 if item.spec is None else leaf_dtype(item.spec, dtype))

    def region(self, item: PlanItem, dtype, index=None) -> np.ndarray:
        """Region ``index`` of a float item (see :func:`read_region`), in :meth:`dtype_of`."""
        return read_region(self.checkpoint_of(item), item.names, item.shape, item.stacked,
                           self.dtype_of(item, dtype), index)

    def node(self, item: PlanItem, expert: int | None = None, copy: bool = True) -> QuantFormat:
        """A quantized item (one module, or a bank stacked over its experts; only expert ``expert`` of it when
        given) as a node with NumPy leaves, the run options applied. ``copy=False``: the leaves of one module that
        are stored as used stay read-only views of the checkpoint's memory map."""
        mods = list(item.names) if expert is None else [item.names[expert]]
        extra = {} if copy else {"copy": False}
        try:
            return item.fmt.read(self.ck, mods, item.module_shape, stacked=item.stacked and expert is None,
                                 configs=self.quant_configs(), **extra, **self.run_options)
        except ValueError as e:  # QuantError, or an array that does not fit
            raise CheckpointError(str(e)) from None

    def float(self, item: PlanItem, dtype, expert: int | None = None) -> np.ndarray:
        """An item (or expert ``expert`` of it) as a float NumPy array; a quantized one dequantized to ``dtype``."""
        if item.fmt is not None:
            return np.asarray(self.node(item, expert).dequantize(jnp.dtype(dtype)))
        return self.region(item, dtype, None if expert is None else (expert,))

    def value(self, item: PlanItem, dtype, expert: int | None = None):
        """An item (or expert ``expert``) as it is stored: a quantized node, or a float array of ``dtype``."""
        return self.node(item, expert) if item.fmt is not None else self.float(item, dtype, expert)


@dataclasses.dataclass
class MapReport:
    """What a ``mmap=True`` load did with the checkpoint's bytes: ``mapped`` (parameters aliasing the files' read-only
    memory maps), ``copied`` (owned copies: a cast, a transformed quantized leaf, a tensor whose file offset is
    not 64-byte aligned, which XLA:CPU needs to alias a buffer), ``on_disk`` (routed-expert banks left as
    per-expert views, :class:`nemojax.experts.bank.HostBank`: read when fetched or stacked); bytes and tensors."""

    mapped_bytes: int = 0
    copied_bytes: int = 0
    on_disk_bytes: int = 0
    mapped_tensors: int = 0
    copied_tensors: int = 0
    on_disk_tensors: int = 0

    def add(self, kind: str, nbytes: int, n: int = 1) -> None:
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + int(nbytes))
        setattr(self, f"{kind}_tensors", getattr(self, f"{kind}_tensors") + n)

    @property
    def mapped_fraction(self) -> float:
        """``mapped / (mapped + copied)`` (the experts left on disk not counted)."""
        total = self.mapped_bytes + self.copied_bytes
        return self.mapped_bytes / total if total else 0.0

    def summary(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        return (f"mmap: {mb(self.mapped_bytes)} mapped ({self.mapped_tensors} tensors), {mb(self.copied_bytes)} "
                f"copied ({self.copied_tensors}), {mb(self.on_disk_bytes)} of routed experts left on disk")


def check_mmap(path) -> None:
    """ValueError naming ``mmap=True`` where it cannot work: a backend other than CPU, an orbax folder."""
    if jax.default_backend() != "cpu":
        raise ValueError(f"mmap=True needs the CPU backend (jax's default backend is {jax.default_backend()!r}, "
                         f"where the weights are copied to device memory anyway): load without mmap")
    if is_orbax_checkpoint(path):
        raise ValueError(f"mmap=True: {os.fspath(path)} is a nemojax orbax checkpoint; memory mapping reads "
                         f"safetensors folders only")


def load_params(path: str | os.PathLike, cfg: Config, dtype="bfloat16", progress: bool = False,
                nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant", base: str | os.PathLike | None = None,
                dequantize: bool = False, mmap: bool = False, bank_views: bool = False,
                report: MapReport | None = None, **run_options) -> dict:
    """Load a checkpoint folder into the parameter pytree (jax arrays on the default device).

    Safetensors folders (below) and nemojax orbax folders (``nemojax_orbax.json``; see
    ``nemojax.checkpoint.orbax``).

    Float weights are cast to ``dtype``; ``A_log``, ``D`` and ``e_score_correction_bias`` stay float32.
    Quantized linears (``nemojax.formats``, detected from the tensors) become nodes: ModelOpt NVFP4 (those with
    ``weight_scale_2``) run in ``nvfp4_mode``; polarengine HLWQ (any layout) run on ``hlwq_path`` ("dequant" |
    "rotated"), with the ``e_score_correction_bias`` those checkpoints lack read from ``base`` (a BF16 checkpoint
    folder). FP8 KV scales (``k_proj.k_scale``, ``v_proj.v_scale``) become mixer leaves ``k_scale`` /
    ``v_scale``. ``dequantize=True`` turns every quantized weight into a plain array of ``dtype``.
    ``run_options``: the run options of other registered formats (``QuantFormat.run_options``, e.g.
    ``fp8_mode="w8a8"``).

    ``mmap=True`` (CPU backend, safetensors only; ValueError otherwise): every tensor stored as its parameter
    uses it (same dtype, no transform; quantized leaves included) becomes a jax array aliasing the file's
    read-only memory map, checked by pointer; the rest is copied as usual. Stacked expert banks (one tensor per
    expert) are still stacked into RAM, unless ``bank_views=True``: then each bank is a
    :class:`nemojax.experts.bank.HostBank` of per-expert views (for ``nemojax.experts.offload``, or
    :func:`stack_banks`). ``report``: a :class:`MapReport` filled in with the byte counts.
    """
    dtype = resolve_dtype(dtype)
    options = {"nvfp4_mode": nvfp4_mode, "hlwq_path": hlwq_path, **run_options}
    check_run_options(**options)
    if bank_views and not mmap:
        raise ValueError("bank_views=True needs mmap=True")
    if mmap:
        check_mmap(path)
    if is_orbax_checkpoint(path):  # nemojax's own orbax format (``nemojax convert --to orbax``)
        try:
            return load_orbax(path, cfg, dtype, dequantize=dequantize, **options)
        except OrbaxError as e:
            raise CheckpointError(str(e)) from None
    reader = Reader.open(path, cfg, base, options)
    report = report if report is not None else MapReport()
    flat: dict = {}
    bar = progress_bar(len(reader.items), f"loading {os.path.basename(os.path.abspath(reader.ck.path))}", progress)
    for item in reader.items:
        if mmap and bank_views and item.spec is not None and item.spec.stacked and not dequantize:
            flat[item.path] = _bank_views(reader, item, dtype, report)
        elif mmap and (item.fmt is None or not item.stacked):
            flat[item.path] = _mapped(reader, item, dtype, dequantize, report)
        elif item.fmt is not None:
            node = jax.tree.map(_to_device, reader.node(item))
            report.add("copied", node.nbytes, len(jax.tree.leaves(node)))
            flat[item.path] = node.dequantize(dtype) if dequantize else node
        else:
            x = flat[item.path] = _to_device(reader.float(item, dtype))
            report.add("copied", x.nbytes)
        bar.update(1)
    bar.close()
    return nest(flat)


def _file_view(a) -> bool:
    """Whether NumPy array ``a`` is (a view of) a memory map."""
    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def _view(reader: Reader, item: PlanItem, dtype, name: str | None = None, shape=None) -> np.ndarray:
    """Float tensor ``name`` (default the item's one) as ``shape`` (default the parameter's): the checkpoint's
    read-only view when stored in the parameter's dtype, else an owned cast copy."""
    a = reader.checkpoint_of(item).get(name or item.names[0]).reshape(item.shape if shape is None else shape)
    want = reader.dtype_of(item, dtype)
    return a if a.dtype == want else np.array(a, dtype=want, order="C")


def _put_mapped(a: np.ndarray, report: MapReport) -> jax.Array:
    """device_put (finished) of a NumPy leaf, counted as mapped where the jax array aliases a memory map (on CPU,
    XLA zero-copies 64-byte-aligned buffers and copies anything else)."""
    x = jax.device_put(a)
    x.block_until_ready()
    aliased = _file_view(a) and a.size > 0 and x.unsafe_buffer_pointer() == a.ctypes.data
    report.add("mapped" if aliased else "copied", a.nbytes)
    return x


def _mapped(reader: Reader, item: PlanItem, dtype, dequantize: bool, report: MapReport):
    """An item under ``mmap=True``: unstacked (a view where stored as used), or a stacked float bank (a copy)."""
    if item.fmt is not None:
        node = jax.tree.map(lambda a: _put_mapped(a, report), reader.node(item, copy=False))
        return node.dequantize(dtype) if dequantize else node
    if item.stacked:
        return _put_mapped(reader.float(item, dtype), report)
    return _put_mapped(_view(reader, item, dtype), report)


def _bank_views(reader: Reader, item: PlanItem, dtype, report: MapReport) -> HostBank:
    """A routed-expert bank as per-expert views of the files (casts and transformed leaves: owned copies)."""
    E = item.shape[0]
    if item.fmt is not None:
        experts = [reader.node(item, e, copy=False) for e in range(E)]
    elif item.stacked:
        experts = [_view(reader, item, dtype, item.names[e], item.module_shape) for e in range(E)]
    else:  # one tensor holding the whole bank (transformers-5 naming)
        whole = _view(reader, item, dtype)
        experts = [whole[e] for e in range(E)]
    for x in experts:
        for a in jax.tree.leaves(x):
            report.add("on_disk" if _file_view(a) else "copied", a.nbytes)
    return HostBank(experts)


def stack_banks(params: dict) -> dict:
    """``params`` with every :class:`nemojax.experts.bank.HostBank` (``load_params(..., bank_views=True)``) stacked
    into device arrays (a copy of each whole bank: leaves [E, ...])."""
    if not any(isinstance(x, HostBank) for x in jax.tree.leaves(params)):
        return params
    return jax.tree.map(lambda x: jax.tree.map(_to_device, x.stack()) if isinstance(x, HostBank) else x, params)


def _to_device(arr: np.ndarray) -> jax.Array:
    """``jax.device_put`` finished before the next tensor is read.

    device_put is asynchronous: without waiting, queued transfers keep their host temporaries alive and the
    peak grows well past "parameters + one tensor". ``arr`` is always an owned copy (:func:`read_region`), never
    the checkpoint's memory map: on CPU device_put zero-copies aligned host buffers, and a parameter aliasing the
    file would change when the file is rewritten and fault when it is truncated (what ``mmap=True`` accepts,
    :func:`_put_mapped`).
    """
    x = jax.device_put(arr)
    x.block_until_ready()
    return x


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` tensors (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
