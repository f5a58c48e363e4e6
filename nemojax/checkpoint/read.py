"""Hugging Face safetensors checkpoints -> the parameter pytree (``nemojax.params`` layout).

Reads a checkpoint folder (``nemojax.checkpoint.source``: an index, ``model.safetensors`` or one shard set) in
original NVIDIA naming (``backbone.*``, one tensor per expert) or transformers-5 naming (``model.*``, experts
stacked in ``mixer.experts.up_proj`` / ``down_proj``). Tensors are memory-mapped and converted one at a time, so
peak host memory is about the final parameters plus one tensor. :class:`Reader` is the one reader of plan items
every loop uses (loading, sharded loading, the conversions).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..formats import QuantFormat
from ..formats.base import check_run_options
from ..params import leaf_dtype
from .orbax import OrbaxError, is_orbax_checkpoint, load_orbax
from .plan import PlanItem, nest, plan
from .source import Checkpoint, CheckpointError, read_quant_configs

__all__ = ["Reader", "load_params", "resolve_dtype", "read_region", "progress_bar"]

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

    def node(self, item: PlanItem, expert: int | None = None) -> QuantFormat:
        """A quantized item (one module, or a bank stacked over its experts; only expert ``expert`` of it when
        given) as a node with NumPy leaves, the run options applied."""
        mods = list(item.names) if expert is None else [item.names[expert]]
        try:
            return item.fmt.read(self.ck, mods, item.module_shape, stacked=item.stacked and expert is None,
                                 configs=self.quant_configs(), **self.run_options)
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


def load_params(path: str | os.PathLike, cfg: Config, dtype="bfloat16", progress: bool = False,
                nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant", base: str | os.PathLike | None = None,
                dequantize: bool = False, **run_options) -> dict:
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
    """
    dtype = resolve_dtype(dtype)
    options = {"nvfp4_mode": nvfp4_mode, "hlwq_path": hlwq_path, **run_options}
    check_run_options(**options)
    if is_orbax_checkpoint(path):  # nemojax's own orbax format (``nemojax convert --to orbax``)
        try:
            return load_orbax(path, cfg, dtype, dequantize=dequantize, **options)
        except OrbaxError as e:
            raise CheckpointError(str(e)) from None
    reader = Reader.open(path, cfg, base, options)
    flat: dict = {}
    bar = progress_bar(len(reader.items), f"loading {os.path.basename(os.path.abspath(reader.ck.path))}", progress)
    for item in reader.items:
        if item.fmt is not None:
            node = jax.tree.map(_to_device, reader.node(item))
            flat[item.path] = node.dequantize(dtype) if dequantize else node
        else:
            flat[item.path] = _to_device(reader.float(item, dtype))
        bar.update(1)
    bar.close()
    return nest(flat)


def _to_device(arr: np.ndarray) -> jax.Array:
    """``jax.device_put`` finished before the next tensor is read.

    device_put is asynchronous: without waiting, queued transfers keep their host temporaries alive and the
    peak grows well past "parameters + one tensor". ``arr`` is always an owned copy (:func:`read_region`), never
    the checkpoint's memory map: on CPU device_put zero-copies aligned host buffers, and a parameter aliasing the
    file would change when the file is rewritten and fault when it is truncated.
    """
    x = jax.device_put(arr)
    x.block_until_ready()
    return x


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` tensors (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
