"""Hugging Face safetensors checkpoints -> the parameter pytree (``nemojax.params`` layout).

Reads a folder with ``model.safetensors``, a sharded set with ``model.safetensors.index.json``, or loose
``*.safetensors`` files; original NVIDIA naming (``backbone.*``, one tensor per expert) or transformers-5
naming (``model.*``, experts stacked in ``mixer.experts.up_proj`` / ``down_proj``). Tensors are memory-mapped
and converted one at a time, so peak host memory is about the final parameters plus one tensor.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .blocks.base import Spec
from .config import Config
from .formats import FORMATS, QuantError, QuantFormat, is_quantized
from .formats.base import check_run_options, check_tensor
from .params import is_spec, leaf_dtype, param_specs, tree_paths
from .quant.modelopt import config_quantization, hf_quant_config, linear_modules, read_quant_config
from .quant.polar import read_polar_config
from .safetensors_io import SafeFile, SafetensorsError

__all__ = ["CheckpointError", "Checkpoint", "load_params", "resolve_dtype", "kind_format", "stored_format",
           "read_node", "read_quant_configs", "quant_modules", "write_quant_configs"]

_IGNORED = re.compile(r"^(mtp\.|backbone\.mtp\.|model\.mtp\.)")  # multi-token-prediction heads: not used
_FLOAT_KINDS = ("f",)
_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "float16": jnp.float16, "fp16": jnp.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unexpected or mis-shaped tensors, bad files."""


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


class Checkpoint:
    """All tensors of a checkpoint folder: ``names``, ``file_of(name)``, ``get(name)`` (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a folder")
        index = os.path.join(self.path, "model.safetensors.index.json")
        self._files: dict[str, SafeFile] = {}
        self._where: dict[str, SafeFile] = {}
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            for name, fname in weight_map.items():
                sf = self._open(os.path.join(self.path, fname))
                if name not in sf:
                    raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname} but that file does not "
                                          f"contain it")
                self._where[name] = sf
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no model.safetensors, model.safetensors.index.json or "
                                      f"*.safetensors file")
            for fname in files:
                sf = self._open(os.path.join(self.path, fname))
                for name in sf.keys():
                    if name in self._where:
                        raise CheckpointError(f"{self.path}: tensor {name!r} appears in both "
                                              f"{os.path.basename(self._where[name].path)} and {fname}")
                    self._where[name] = sf

    def _open(self, fpath: str) -> SafeFile:
        if fpath not in self._files:
            try:
                self._files[fpath] = SafeFile(fpath)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        return self._files[fpath]

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    @property
    def naming(self) -> str:
        """'original' (``backbone.*``) or 'hf5' (``model.*``)."""
        if any(n.startswith("backbone.") for n in self._where):
            return "original"
        if any(n.startswith("model.") for n in self._where):
            return "hf5"
        raise CheckpointError(f"{self.path}: no 'backbone.*' or 'model.*' tensors: not a Nemotron-H checkpoint")


def _hf5(name: str) -> str:
    return "model." + name[len("backbone."):] if name.startswith("backbone.") else name


def _sources(ck: Checkpoint, spec: Spec) -> tuple[str, list[str]]:
    """How one parameter is stored and under which names:

    * ('whole', [name]) / ('experts', [name per expert]): a float tensor (experts one per expert);
    * (format, [module]) / (format + '_experts', [module per expert]): a linear stored in a quantized format
      (``nemojax.formats.FORMATS``, the first whose ``stored_in`` claims the module; see :func:`kind_format`).
    """
    conv = (lambda n: n) if ck.naming == "original" else _hf5
    if spec.stacked:
        stacked = conv(spec.ckpt.replace(".{e}", "").removesuffix(".weight"))
        if stacked in ck:
            return "whole", [stacked]
        names = [conv(spec.ckpt.format(e=e)) for e in range(spec.shape[0])]
        mods = [n.removesuffix(".weight") for n in names]
        fmt = stored_format(ck, mods[0])
        return (fmt.name + "_experts", mods) if fmt else ("experts", names)
    name = conv(spec.ckpt)
    fmt = stored_format(ck, name.removesuffix(".weight")) if name.endswith(".weight") and len(spec.shape) == 2 \
        else None
    return (fmt.name, [name.removesuffix(".weight")]) if fmt else ("whole", [name])


def stored_format(ck: Checkpoint, mod: str) -> type[QuantFormat] | None:
    """The quantized format checkpoint module ``mod`` is stored in (the first that claims it), or None."""
    return next((f for f in FORMATS.values() if f.stored_in(ck, mod)), None)


def kind_format(kind: str) -> type[QuantFormat] | None:
    """The quantized format of a :func:`plan` item's kind ("nvfp4", "hlwq_experts", ...); None for float kinds."""
    return FORMATS.get(kind.removesuffix("_experts"))


_TENSOR_KINDS = {"float": (lambda dt: dt.kind == "f" or dt.name == "bfloat16", "a floating-point weight"),
                 "float32": (lambda dt: dt == np.float32, "an F32 scale")}


def _check(ck: Checkpoint, name: str, want: tuple[int, ...], dtype: str = "float") -> None:
    try:
        check_tensor(ck, name, want, *_TENSOR_KINDS[dtype])
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def plan(ck: Checkpoint, cfg: Config, base: Checkpoint | None = None) -> list[tuple[str, Spec, str, list[str]]]:
    """Match every parameter to checkpoint tensors; raise on missing, unexpected or mis-shaped tensors.

    Returns ``(path, spec, kind, names)`` items (see ``_sources``); FP8 KV-cache scales appear as extra items
    ``("layers.i.mixer.k_scale", None, "scalar", [name])``.
    """
    specs = tree_paths(param_specs(cfg))
    out, used, missing = [], set(), []
    for path, spec in specs:
        kind, names = _sources(ck, spec)
        fmt = kind_format(kind)
        if fmt is not None:
            shape = spec.shape[1:] if spec.stacked else spec.shape
            for mod in names:
                try:
                    used.update(fmt.tensor_names(ck, mod, shape))
                except QuantError as e:
                    raise CheckpointError(str(e)) from None
            out.append((path, spec, kind, names))
            continue
        if kind == "whole" and names[0].endswith(".e_score_correction_bias") and names[0] not in ck and base:
            if names[0] not in base:
                raise CheckpointError(f"{base.path}: the base checkpoint has no {names[0]!r} either")
            _check(base, names[0], spec.shape)
            out.append((path, spec, "base", names))
            continue
        absent = [n for n in names if n not in ck]
        if absent:
            missing.extend(absent)
            continue
        for n in names:
            want = (spec.ckpt_shape or spec.shape) if kind == "whole" else spec.shape[1:]
            if kind == "whole" and spec.ckpt_shape is not None and tuple(ck.shape(n)) == spec.shape:
                want = spec.shape  # conv1d saved without the middle axis
            _check(ck, n, want)
        used.update(names)
        out.append((path, spec, kind, names))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = ""
        if all(n.endswith(".e_score_correction_bias") for n in missing):
            hint = (": polarengine (HLWQ) checkpoints drop this registered buffer; pass base=<the BF16 checkpoint "
                    "they were made from> (nemojax.load(..., base=...) / --base)")
        raise CheckpointError(f"{ck.path}: missing tensor(s) {missing[:5]}{more} for a {cfg.num_hidden_layers}-layer "
                              f"model with pattern {cfg.pattern!r}{hint}")
    conv = (lambda n: n) if ck.naming == "original" else _hf5
    for i in cfg.layer_indices("*"):
        k, v = (conv(f"backbone.layers.{i}.mixer.{p}_proj.{p}_scale") for p in ("k", "v"))
        if (k in ck) != (v in ck):
            raise CheckpointError(f"{ck.path}: {k if k not in ck else v!r} is missing (FP8 KV needs both scales)")
        if k in ck:
            for n, key in ((k, "k_scale"), (v, "v_scale")):
                _check(ck, n, (), "float32")
                used.add(n)
                out.append((f"layers.{i}.mixer.{key}", None, "scalar", [n]))
    unexpected = [n for n in ck.names if n not in used and not _IGNORED.match(n)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(f"{ck.file_of(first)}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' (and more)' if len(unexpected) > 5 else ''} not used by pattern {cfg.pattern!r}")
    return out


def _read(ck: Checkpoint, spec: Spec, kind: str, names: list[str], np_dtype) -> np.ndarray:
    """One float parameter as a NumPy array of ``np_dtype`` (experts stacked into a preallocated buffer)."""
    if kind == "experts":
        out = np.empty(spec.shape, np_dtype)
        for e, n in enumerate(names):
            out[e] = ck.get(n)
        return out
    return np.array(ck.get(names[0]), dtype=np_dtype, copy=True).reshape(spec.shape)  # owned, never the map


def read_quant_configs(folder: str) -> dict:
    """The parsed quantization configs of a checkpoint folder (validated; None where absent), as the formats'
    ``read`` takes them: ``{"modelopt": hf_quant_config.json or config.json's quantization_config, "polar":
    polar_config.json}``."""
    return {"modelopt": read_quant_config(folder), "polar": read_polar_config(folder)}


def read_node(ck: Checkpoint, fmt: type[QuantFormat], spec: Spec, kind: str, names: list[str], configs: dict,
              run_options: dict, expert: int | None = None) -> QuantFormat:
    """A quantized parameter (:func:`plan` item of format ``fmt``: one module, or a bank stacked over its
    experts; only expert ``expert`` of it when given) as a node with NumPy leaves; ``configs``: from
    :func:`read_quant_configs`."""
    stacked = kind.endswith("_experts")
    shape = spec.shape[1:] if stacked else spec.shape
    mods = names if expert is None else [names[expert]]
    try:
        return fmt.read(ck, mods, shape, stacked=stacked and expert is None, configs=configs, **run_options)
    except ValueError as e:  # QuantError, or an array that does not fit
        raise CheckpointError(str(e)) from None


def load_params(path: str | os.PathLike, cfg: Config, dtype="bfloat16", progress: bool = False,
                nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant", base: str | os.PathLike | None = None,
                dequantize: bool = False) -> dict:
    """Load a checkpoint folder into the parameter pytree (jax arrays on the default device).

    Safetensors folders (below) and nemojax orbax folders (``nemojax_orbax.json``; see ``nemojax.orbax_io``).

    Float weights are cast to ``dtype``; ``A_log``, ``D`` and ``e_score_correction_bias`` stay float32.
    Quantized linears (``nemojax.formats``, detected from the tensors) become nodes: ModelOpt NVFP4 (those with
    ``weight_scale_2``) run in ``nvfp4_mode``; polarengine HLWQ (any layout) run on ``hlwq_path`` ("dequant" |
    "rotated"), with the ``e_score_correction_bias`` those checkpoints lack read from ``base`` (a BF16 checkpoint
    folder). FP8 KV scales (``k_proj.k_scale``, ``v_proj.v_scale``) become mixer leaves ``k_scale`` /
    ``v_scale``. ``dequantize=True`` turns every quantized weight into a plain array of ``dtype``.
    """
    dtype = resolve_dtype(dtype)
    check_run_options(nvfp4_mode=nvfp4_mode, hlwq_path=hlwq_path)
    from .orbax_io import OrbaxError, is_orbax_checkpoint, load_orbax

    if is_orbax_checkpoint(path):  # nemojax's own orbax format (``nemojax convert --to orbax``)
        try:
            return load_orbax(path, cfg, dtype, nvfp4_mode, hlwq_path, dequantize)
        except OrbaxError as e:
            raise CheckpointError(str(e)) from None
    ck = Checkpoint(path)
    configs = read_quant_configs(ck.path)
    run = {"nvfp4_mode": nvfp4_mode, "hlwq_path": hlwq_path}
    base_ck = Checkpoint(base) if base is not None else None
    specs = param_specs(cfg)
    flat, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    order = {p: i for i, (p, _) in enumerate(tree_paths(specs))}
    leaves: list = [None] * len(flat)
    extras: dict[str, jax.Array] = {}
    items = plan(ck, cfg, base_ck)
    bar = _progress(len(items), f"loading {os.path.basename(os.path.abspath(ck.path))}", progress)
    for path, spec, kind, names in items:
        if kind == "scalar":
            extras[path] = _to_device(np.array(ck.get(names[0]), np.float32).reshape(()))
        elif kind == "base":
            leaves[order[path]] = _to_device(_read(base_ck, spec, "whole", names, np.dtype(leaf_dtype(spec, dtype))))
        elif kind_format(kind) is not None:
            node = jax.tree.map(_to_device, read_node(ck, kind_format(kind), spec, kind, names, configs, run))
            leaves[order[path]] = node.dequantize(dtype) if dequantize else node
        else:
            arr = _read(ck, spec, kind, names, np.dtype(leaf_dtype(spec, dtype)))
            leaves[order[path]] = _to_device(arr)
            del arr
        bar.update(1)
    bar.close()
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    for path, val in extras.items():  # "layers.i.mixer.k_scale"
        _, i, _, key = path.split(".")
        params["layers"][int(i)]["mixer"][key] = val
    return params


def _to_device(arr: np.ndarray) -> jax.Array:
    """``jax.device_put`` finished before the next tensor is read.

    device_put is asynchronous: without waiting, queued transfers keep their host temporaries alive and the
    peak grows well past "parameters + one tensor". ``arr`` is always an owned copy (``_read``), never the
    checkpoint's memory map: on CPU device_put zero-copies aligned host buffers, and a parameter aliasing the
    file would change when the file is rewritten and fault when it is truncated.
    """
    x = jax.device_put(arr)
    x.block_until_ready()
    return x


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def checkpoint_tensors(params: dict, cfg: Config, naming: str = "original") -> Iterator[tuple[str, np.ndarray]]:
    """The parameter pytree as ``(checkpoint name, array)`` pairs: per-expert tensors for 'original' naming,
    stacked ``mixer.experts.*`` for 'hf5'; conv1d gets its [C, 1, K] checkpoint shape back. Quantized nodes
    become their format's tensors (``QuantFormat.checkpoint_tensors``, always per expert), FP8 KV scales
    ``k_proj.k_scale`` / ``v_proj.v_scale``."""
    if naming not in ("original", "hf5"):
        raise ValueError(f"naming={naming!r}: expected 'original' or 'hf5'")
    conv = (lambda n: n) if naming == "original" else _hf5
    specs = dict(tree_paths(param_specs(cfg)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        path = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if path.endswith((".k_scale", ".v_scale")):
            i, key = path.split(".")[1], path.rsplit(".", 1)[1]
            yield conv(f"backbone.layers.{i}.mixer.{key[0]}_proj.{key}"), np.asarray(leaf, np.float32).reshape(())
            continue
        spec = specs[path]
        if is_quantized(leaf):
            for mod, node in _modules(spec, leaf, conv):
                yield from node.checkpoint_tensors(mod)
            continue
        a = np.asarray(leaf)
        if spec.stacked:
            if naming == "hf5":
                yield _hf5(spec.ckpt.replace(".{e}", "").removesuffix(".weight")), a
            else:
                for e in range(a.shape[0]):
                    yield spec.ckpt.format(e=e), a[e]
            continue
        yield conv(spec.ckpt), a.reshape(spec.ckpt_shape) if spec.ckpt_shape else a


def _modules(spec: Spec, node: QuantFormat, conv=lambda n: n) -> list[tuple[str, QuantFormat]]:
    """``(module name, 2-D node with NumPy leaves)`` pairs of a quantized leaf (one per expert for a bank)."""
    host = jax.tree.map(np.asarray, node)
    if not spec.stacked:
        return [(conv(spec.ckpt.removesuffix(".weight")), host)]
    return [(conv(spec.ckpt.format(e=e).removesuffix(".weight")), jax.tree.map(lambda a: a[e], host))
            for e in range(spec.shape[0])]


def quant_modules(params: dict, cfg: Config) -> Iterator[tuple[str, QuantFormat]]:
    """``(module name, 2-D node)`` of every quantized module of a pytree (experts one by one), original naming."""
    specs = dict(tree_paths(param_specs(cfg)))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        if is_quantized(leaf):
            yield from _modules(specs[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)], leaf)


def write_quant_configs(folder: str, conf: dict, cfg: Config, entries: dict, kv_fp8: bool) -> None:
    """The quantization configs of a checkpoint whose quantized modules are ``entries`` (``{format: {module:
    QuantFormat.config_entry()}}``): ModelOpt formats write ``hf_quant_config.json`` and set ``conf``'s (config.json)
    ``quantization_config`` (every other linear excluded; ``kv_fp8``: the FP8 KV-cache scales), polarengine
    writes ``polar_config.json``."""
    modelopt = None
    for fmt, mods in entries.items():
        family, qc = fmt.quant_config(mods)
        if family == "modelopt":
            if modelopt is not None:
                raise ValueError(f"a checkpoint holds one ModelOpt format, got {modelopt} and {fmt.name}")
            modelopt = fmt.name
            exclude = [m for m in linear_modules(cfg) if m not in mods]
            conf["quantization_config"] = config_quantization(qc, exclude, kv_fp8)
            with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
                json.dump(hf_quant_config(qc, exclude, kv_fp8), f, indent=4)
        elif family == "polar":
            with open(os.path.join(folder, "polar_config.json"), "w") as f:
                json.dump(qc, f, indent=2)
        else:
            raise ValueError(f"{fmt.name}: unknown quantization config family {family!r}")


def save_params(params: dict, cfg: Config, folder: str | os.PathLike, *, naming: str = "original",
                max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index when ``max_shard_bytes`` is set).

    A quantized pytree is written in its formats' layouts with their configs (NVFP4: ModelOpt's
    ``hf_quant_config.json`` and a ``quantization_config`` in config.json, so vLLM / SGLang /
    transformers+ModelOpt read it; HLWQ: polarengine layout B and ``polar_config.json``)."""
    from .safetensors_io import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    entries: dict = {}
    for mod, node in quant_modules(params, cfg):
        entries.setdefault(type(node), {})[mod] = node.config_entry()
    kv = any("k_scale" in params["layers"][i]["mixer"] for i in cfg.layer_indices("*"))
    conf = cfg.to_dict()
    write_quant_configs(folder, conf, cfg, entries, kv)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    tensors = list(checkpoint_tensors(params, cfg, naming))
    if not max_shard_bytes:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], [], 0
    for name, a in tensors:
        if cur and size + a.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, a))
        size += a.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(a.nbytes for _, a in tensors)}, "weight_map": weight_map}, f,
                  indent=2)
