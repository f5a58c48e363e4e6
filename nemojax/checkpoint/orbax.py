"""Orbax checkpoints of the parameter pytree (nemojax's own format; quantized nodes included).

A folder holds ``config.json``, the side files (tokenizer, chat template), ``params/`` (an orbax
``StandardCheckpointer`` checkpoint of the pytree) and ``nemojax_orbax.json``: every leaf's path, shape and
dtype plus the static fields of each quantized node, so the abstract tree is rebuilt without reading arrays
or relying on orbax's metadata API. A conversion streams (``nemojax.checkpoint.convert.convert_to_orbax``):
every output leaf is filled one parameter (one expert) at a time into a memory-mapped :class:`Scratch` file, so
peak memory stays about one parameter (each file's disk reserved before it is mapped: a full disk is a
DiskFullError, never a SIGBUS).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 names with NumPy)
import numpy as np

from ..config import Config
from ..formats import FORMATS, QuantError, is_quantized
from ..formats.base import check_run_options
from ..params import leaf_dtype, param_specs, tree_paths
from .output import DiskFullError, atomic_output, copy_side_files, is_disk_full, preallocate
from .plan import flat_params, nest

__all__ = ["META", "is_orbax_checkpoint", "save_orbax", "load_orbax", "read_meta", "write_tree", "tensor_bytes",
           "Scratch", "OrbaxError"]

META = "nemojax_orbax.json"
FORMAT_VERSION = 1


class OrbaxError(ValueError):
    """An unusable orbax checkpoint folder (message names the folder and the problem)."""


def is_orbax_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META))


def _describe(params: dict) -> dict:
    """``{"leaves": {path: [shape, dtype]}, "nodes": {path: static fields}}`` of a params pytree."""
    leaves, nodes = {}, {}
    for path, leaf in flat_params(params):
        if is_quantized(leaf):
            nodes[path] = leaf.describe()
            for field in leaf.leaf_names():
                a = getattr(leaf, field)
                if a is not None:
                    leaves[f"{path}.{field}"] = [list(a.shape), jnp.dtype(a.dtype).name]
        else:
            leaves[path] = [list(np.shape(leaf)), jnp.dtype(leaf.dtype).name]
    return {"leaves": leaves, "nodes": nodes}


def _build(meta: dict, make) -> dict:
    """The params pytree with leaves ``make(leaf path, shape, dtype)``; quantized nodes rebuilt from ``meta``."""
    nodes = meta["nodes"]
    flat, fields = {}, {}
    for path, (shape, dtype) in meta["leaves"].items():
        owner, _, field = path.rpartition(".")
        if owner in nodes:
            fields.setdefault(owner, {})[field] = make(path, tuple(shape), dtype)
        else:
            flat[path] = make(path, tuple(shape), dtype)
    for owner, info in nodes.items():
        flat[owner] = FORMATS[info["type"]].from_description(fields.get(owner, {}), info)
    return nest(flat)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _save_tree(folder: str, tree: dict) -> None:
    """orbax save of a pytree of NumPy arrays (memory maps) in bounded memory: the default NumpyHandler deep-copies
    every host array first, and tensorstore's compression buffers the compressed chunks (~0.7 x the checkpoint
    measured); weights barely compress, so both are off, with at most ~1 GB in flight."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers as th

    try:
        registry = th.create_type_handler_registry(
            (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (int, th.ScalarHandler()),
            (float, th.ScalarHandler()), (np.number, th.ScalarHandler()), (jax.Array, th.ArrayHandler()))
        handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, type_handler_registry=registry,
                                              use_compression=False)
    except TypeError:  # an orbax without these options: the standard (copying) handler
        handler = ocp.PyTreeCheckpointHandler()
    with ocp.Checkpointer(handler) as ck:
        ck.save(folder, args=ocp.args.PyTreeSave(tree))


def _write(folder: str, tree: dict, cfg: Config, meta: dict) -> None:
    try:
        _save_tree(os.path.join(folder, "params"), tree)
    except Exception as e:  # tensorstore: ValueError("RESOURCE_EXHAUSTED: ... No space left on device")
        if is_disk_full(e):
            need = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in meta["leaves"].values())
            raise DiskFullError(os.path.join(folder, "params"), need=need, what="writing the orbax arrays") from e
        raise
    with open(os.path.join(folder, META), "w") as f:
        json.dump({"format": "nemojax-orbax", "version": FORMAT_VERSION, **meta}, f, indent=1)
    if not os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)


def write_tree(folder: str, tree: dict, cfg: Config) -> None:
    """``params/``, ``nemojax_orbax.json`` and (when absent) ``config.json`` of a pytree of NumPy arrays and nodes
    (memory maps welcome) into ``folder``."""
    _write(folder, tree, cfg, _describe(tree))


def save_orbax(params: dict, cfg: Config, folder: str | os.PathLike, *, force: bool = False,
               side_files_from: str | os.PathLike | None = None) -> str:
    """Write ``params`` (plain or quantized) as an orbax checkpoint folder, atomically (temp folder + rename).

    ``side_files_from``: a Hugging Face folder whose tokenizer / chat-template files are copied along.
    """
    tree = jax.tree.map(np.asarray, params)
    with atomic_output(folder, force) as tmp:
        if side_files_from is not None:
            copy_side_files(os.fspath(side_files_from), tmp)
        _write(tmp, tree, cfg, _describe(params))
    return os.path.abspath(os.fspath(folder))


def read_meta(path: str | os.PathLike) -> dict:
    """``nemojax_orbax.json`` of a folder, validated (OrbaxError names the file)."""
    f = os.path.join(os.fspath(path), META)
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise OrbaxError(f"{f}: cannot read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "nemojax-orbax":
        raise OrbaxError(f"{f}: not a nemojax orbax description (format field {meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{f}: expected a JSON object")
    if meta.get("version") != FORMAT_VERSION:
        raise OrbaxError(f"{f}: format version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    if not isinstance(meta.get("leaves"), dict) or not isinstance(meta.get("nodes"), dict):
        raise OrbaxError(f"{f}: missing 'leaves' / 'nodes'")
    for path, info in meta["nodes"].items():
        if not isinstance(info, dict) or info.get("type") not in FORMATS:
            raise OrbaxError(f"{f}: node {path!r} has unknown type {info.get('type') if isinstance(info, dict) else info!r}")
    return meta


def load_orbax(path: str | os.PathLike, cfg: Config, dtype=jnp.bfloat16, nvfp4_mode: str = "w4a16",
               hlwq_path: str = "dequant", dequantize: bool = False, **run_options) -> dict:
    """Restore a folder written by :func:`save_orbax` / :func:`convert_to_orbax` into the params pytree.

    Plain float weights are restored as ``dtype`` (A_log, D, e_score_correction_bias stay float32); quantized
    nodes keep their codes and scales (``nvfp4_mode`` / ``hlwq_path`` set how they run) or become ``dtype``
    arrays with ``dequantize``; ``run_options``: other formats' (``fp8_mode``). Every leaf's shape is checked
    against ``cfg`` first.
    """
    path = os.path.abspath(os.fspath(path))
    options = {"nvfp4_mode": nvfp4_mode, "hlwq_path": hlwq_path, **run_options}
    check_run_options(**options)
    meta = read_meta(path)
    specs = dict(tree_paths(param_specs(cfg)))
    # a node's main array (its first leaf) has the leading shape of the parameter
    main_leaf = {o: f"{o}.{FORMATS[i['type']].leaf_names()[0]}" for o, i in meta["nodes"].items()}
    seen = set()
    for leaf_path, (shape, _) in meta["leaves"].items():
        owner = leaf_path.rpartition(".")[0] if leaf_path.rpartition(".")[0] in meta["nodes"] else leaf_path
        seen.add(owner)
        spec = specs.get(owner)
        if spec is None:
            if owner.endswith((".k_scale", ".v_scale")) and tuple(shape) == ():
                continue
            raise OrbaxError(f"{path}: tensor {leaf_path!r} is not a parameter of pattern {cfg.pattern!r}")
        if owner == leaf_path and tuple(shape) != tuple(spec.shape):
            raise OrbaxError(f"{path}: tensor {leaf_path!r} has shape {list(shape)}, expected {list(spec.shape)}")
        if leaf_path == main_leaf.get(owner) and tuple(shape[:-1]) != tuple(spec.shape[:-1]):
            raise OrbaxError(f"{path}: quantized {owner!r} codes have shape {list(shape)}, the parameter is "
                             f"{list(spec.shape)}")
    missing = [p for p in specs if p not in seen]
    if missing:
        raise OrbaxError(f"{path}: missing parameter(s) {missing[:5]} for pattern {cfg.pattern!r}")
    dtype = jnp.dtype(dtype)

    def target(leaf_path, shape, stored):
        want = jnp.dtype(stored)
        if leaf_path in specs and jnp.issubdtype(want, jnp.floating):
            want = leaf_dtype(specs[leaf_path], dtype)
        return jax.ShapeDtypeStruct(shape, want)

    abstract = _build(meta, target)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise OrbaxError(f"{path}: no params/ folder (incomplete orbax checkpoint)")
    try:
        tree = _checkpointer().restore(params_dir, abstract)
    except Exception as e:  # orbax / tensorstore raise many types; name the folder
        raise OrbaxError(f"{params_dir}: cannot restore the orbax checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a)), tree)

    def finish(x):
        if not is_quantized(x):
            return x
        if dequantize:
            return x.dequantize(dtype)
        try:
            return x.configure(**options)
        except QuantError as e:
            raise OrbaxError(f"{path}: {e}") from None

    return jax.tree.map(finish, params, is_leaf=is_quantized)


def tensor_bytes(folder: str | os.PathLike) -> int:
    """Bytes of all leaves of an orbax checkpoint folder (from ``nemojax_orbax.json``)."""
    return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in read_meta(folder)["leaves"].values())


class Scratch:
    """Memory-mapped raw files for the leaves of a tree being built (removed with the folder): a tree of
    them is written by :func:`write_tree` with one parameter in memory at a time."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.n = 0

    def new(self, shape, dtype) -> np.ndarray:
        """A zero-filled ``shape`` ``dtype`` array mapped from a new file whose disk space is reserved first."""
        self.n += 1
        dtype, shape = np.dtype(dtype), tuple(shape)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        path = os.path.join(self.folder, f"{self.n}.bin")
        with open(path, "wb") as f:
            preallocate(f, nbytes, path)
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def bank(self, n: int, get):
        """A stacked leaf or node of ``n`` experts from ``get(e)`` (one expert's array or node) into memmaps."""
        first = get(0)
        leaves, treedef = jax.tree_util.tree_flatten(first)
        out = [self.new((n, *np.shape(a)), np.asarray(a).dtype) for a in leaves]
        for e in range(n):
            cur = first if e == 0 else get(e)
            for o, a in zip(out, jax.tree_util.tree_leaves(cur)):
                o[e] = np.asarray(a)
            del cur
        first = None
        return jax.tree_util.tree_unflatten(treedef, out)

    def put(self, x):
        """A leaf or node with its arrays copied into memmaps (so only one parameter is ever in memory)."""
        def one(a):
            a = np.asarray(a)
            m = self.new(a.shape, a.dtype)
            m[...] = a
            return m

        return jax.tree.map(one, x)
