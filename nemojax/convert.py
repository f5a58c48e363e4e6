"""Checkpoint conversions. Output is written to a temporary folder beside the destination and renamed only
when complete, so a failed or interrupted run leaves nothing half-written."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import errno
import json
import math
import struct

import numpy as np

from .config import Config
from .formats import FORMATS
from .quant import RECIPES, Recipe, resolve_recipe
from .weights import kind_format, load_params, save_params

__all__ = ["dequantize_checkpoint", "atomic_output", "convert_checkpoint", "ConvertError", "TARGETS",
           "DEFAULT_MAX_SHARD_BYTES", "checkpoint_format"]


class atomic_output:
    """``with atomic_output(dst, force) as tmp: ...write into tmp...`` -> renamed to ``dst`` on success."""

    def __init__(self, dst: str | os.PathLike, force: bool = False):
        self.dst = os.path.abspath(os.fspath(dst))
        if os.path.exists(self.dst) and not force:
            raise FileExistsError(f"{self.dst}: already exists (use force=True / --force to overwrite)")
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.force = force
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.partial-", dir=parent)

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.dst):
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return False


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, chat template, generation config: every small non-weight file except the quant configs."""
    skip = {"config.json", "polar_config.json", "hf_quant_config.json", "model.safetensors.index.json"}
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if os.path.isfile(p) and f not in skip and not f.endswith(".safetensors"):
            shutil.copy2(p, os.path.join(dst, f))


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, base=None, dtype="bfloat16",
                          force: bool = False, max_shard_bytes: int | None = None, progress: bool = False) -> str:
    """An NVFP4 or HLWQ (any polarengine layout) checkpoint -> a plain BF16 Hugging Face checkpoint
    (original ``backbone.*`` naming), like ``polarquant-convert``. ``base`` supplies buffers HLWQ files lack."""
    src = os.fspath(src)
    cfg = Config.from_json(src)
    params = load_params(src, cfg, dtype, progress=progress, base=base, dequantize=True)
    for i in cfg.layer_indices("*"):  # FP8 KV scales do not belong in a BF16 checkpoint
        params["layers"][i]["mixer"].pop("k_scale", None)
        params["layers"][i]["mixer"].pop("v_scale", None)
    with atomic_output(dst, force) as tmp:
        save_params(params, cfg, tmp, max_shard_bytes=max_shard_bytes)
        _copy_side_files(src, tmp)
    return os.fspath(dst)


# ================================================================================================ streaming
TARGETS = (*RECIPES, "bf16", "orbax")  # every registered format's recipes (nemojax.quant.RECIPES)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")
SUPPORTED = (f"bf16 -> {' | '.join(RECIPES)}; {' | '.join(FORMATS)} -> bf16; "
             "any -> orbax (optionally quantizing a bf16 checkpoint with quant=<recipe>)")


class ConvertError(ValueError):
    """A conversion that cannot be done (unsupported input/target pair, disk full, ...)."""


def checkpoint_format(items) -> str:
    """'bf16' (plain floats), a quantized format's name ('nvfp4', 'hlwq', ...) or 'mixed' from ``weights.plan``
    items."""
    q = {kind_format(k).name for _, _, k, _ in items if kind_format(k) is not None}
    if len(q) > 1:
        return "mixed"
    return q.pop() if q else "bf16"


def _write_array(f, a: np.ndarray) -> None:
    """Append one array's bytes to an open file (module-level so tests can simulate a full disk)."""
    np.ascontiguousarray(a).reshape(-1).tofile(f)


class _ShardWriter:
    """Streams ``(name, array)`` pairs into safetensors shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own). Tensor bytes go straight to a per-shard data file, so memory holds no
    more than the tensor being written; when a shard is full the final file is header + the data copied over.
    ``close()`` names the shards ``model-0000k-of-0000N.safetensors`` and writes ``model.safetensors.index.json``.
    """

    def __init__(self, folder: str, max_shard_bytes: int):
        from .safetensors_io import _NAMES

        self._names = _NAMES
        self.folder = folder
        self.max = int(max_shard_bytes)
        self.shards: list[tuple[str, list[str]]] = []  # (temp file, tensor names)
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._size = 0

    def _open(self):
        k = len(self.shards) + 1
        self._data_path = os.path.join(self.folder, f".shard-{k:05d}.data")
        self._data = open(self._data_path, "wb")
        self._header, self._size = {}, 0

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.asarray(a)
        dt = np.dtype(a.dtype)
        if dt not in self._names:
            raise ConvertError(f"tensor {name!r} has unsupported dtype {dt}")
        nb = math.prod(a.shape) * dt.itemsize
        if self._data is not None and self._size and self._size + nb > self.max:
            self._flush()
        if self._data is None:
            self._open()
        self._header[name] = {"dtype": self._names[dt], "shape": list(a.shape),
                              "data_offsets": [self._size, self._size + nb]}
        _write_array(self._data, a)
        self._size += nb
        self.total += nb

    def _flush(self) -> None:
        self._data.close()
        self._data = None
        k = len(self.shards) + 1
        path = os.path.join(self.folder, f".shard-{k:05d}.safetensors")
        header = dict(self._header)
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as out, open(self._data_path, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(src, out, 16 << 20)
        os.remove(self._data_path)
        self.shards.append((path, [n for n in self._header]))

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None

    def close(self) -> list[str]:
        if self._data is not None:
            self._flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for k, (tmp, names) in enumerate(self.shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.folder, fname))
            files.append(fname)
            weight_map.update({name: fname for name in names})
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
        return files


def open_source(src, dst, base=None):
    """A conversion's input: ``(src, config, Checkpoint, base Checkpoint | None, plan items, format)``."""
    from .weights import Checkpoint, plan

    src = os.fspath(src)
    if os.path.abspath(src) == os.path.abspath(os.fspath(dst)):
        raise ConvertError("the output folder must differ from the input folder")
    cfg = Config.from_json(src)
    ck = Checkpoint(src)
    base_ck = Checkpoint(base) if base is not None else None
    items = plan(ck, cfg, base_ck)
    return src, cfg, ck, base_ck, items, checkpoint_format(items)


def _mini_tree(path: str, leaf) -> dict:
    """A one-leaf pytree ``{"layers": {3: {"mixer": {"in_proj": leaf}}}}`` whose flattened path is ``path``
    (so ``weights.checkpoint_tensors`` names and splits it exactly as for the whole model)."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    tree = leaf
    for k in reversed(keys):
        tree = {k: tree}
    return tree


def _excluding(recipe: str, exclude) -> Recipe:
    """Recipe ``recipe`` (a name) with the globs ``exclude`` added to its exclusions (ConvertError if unknown)."""
    try:
        r = resolve_recipe(recipe)
    except ValueError as e:
        raise ConvertError(f"--quant: {e}") from None
    return dataclasses.replace(r, exclude=r.exclude + tuple(exclude)) if exclude else r


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, force: bool = False,
                       max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, base: str | os.PathLike | None = None,
                       progress: bool = True, quant: str | None = None, exclude: tuple[str, ...] = ()) -> dict:
    """Convert a checkpoint folder one parameter at a time (peak memory ~ one parameter, not the model).

    ``to``: a recipe (:data:`nemojax.quant.RECIPES`: "nvfp4" is ModelOpt's layout, weight-only W4A16_NVFP4 with
    the published selective recipe; there is no calibration, so no ``input_scale`` and no FP8 KV scales;
    "hlwq-q5" / "hlwq-q5-converged" are polarengine layout B + polar_config.json) from a BF16 (float)
    checkpoint, or "bf16" from a quantized checkpoint (``base``: the BF16 checkpoint supplying the
    ``e_score_correction_bias`` HLWQ files lack), or "orbax" (the parameter pytree as an orbax checkpoint, see
    ``nemojax.orbax_io``; ``quant``: a recipe to quantize a BF16 source on the way, e.g. "nvfp4" or "hlwq-q5").
    ``exclude``: globs of modules the recipe keeps in high precision besides its own. Output goes to a
    temporary folder beside ``dst``, renamed at the end: any error leaves nothing. Returns a summary dict.
    """
    if quant is not None and to != "orbax":
        raise ConvertError(f"quant={quant!r} applies to --to orbax only (use --to {quant} for safetensors)")
    if exclude and (to == "bf16" or (to == "orbax" and quant is None)):
        raise ConvertError(f"exclude={list(exclude)} applies to a quantizing conversion only (a recipe)")
    if to == "orbax":
        from .orbax_io import convert_to_orbax

        if quant is not None and exclude:
            quant = _excluding(quant, exclude)
        try:
            return convert_to_orbax(src, dst, quant=quant, force=force, base=base, progress=progress)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConvertError(f"{os.path.abspath(os.fspath(dst))}: the disk is full (no space left on device "
                                   f"while writing); nothing was written (the partial output was removed)") from None
            raise
    import jax.numpy as jnp

    from . import quant as qlib
    from .formats import FORMATS
    from .params import leaf_dtype
    from .weights import _progress, _read, checkpoint_tensors, read_node, read_quant_configs, write_quant_configs

    if to not in TARGETS:
        raise ConvertError(f"--to {to!r}: unknown target; supported: {', '.join(TARGETS)} ({SUPPORTED})")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    src, cfg, ck, base_ck, items, fmt = open_source(src, dst, base)
    if (to == "bf16") == (fmt == "bf16") or fmt == "mixed":
        raise ConvertError(f"{src}: cannot convert a {fmt} checkpoint to {to}; supported conversions: {SUPPORTED}")
    bf16 = jnp.dtype(jnp.bfloat16)
    configs = read_quant_configs(src) if fmt != "bf16" else {}
    recipe = _excluding(to, exclude) if to != "bf16" else None
    targets = qlib.quantized_modules(cfg, recipe) if recipe is not None else {}
    options = qlib.format_options(recipe) if recipe is not None else {}
    entries: dict = {}  # the quantized modules' config entries, by format
    dst_abs = os.path.abspath(os.fspath(dst))

    def read_float(spec, kind, names, e):
        """One parameter (``e`` None) or one expert ``e`` of a bank, as a float NumPy array (bf16 weights)."""
        dt = np.dtype(leaf_dtype(spec, bf16))
        if kind == "base":
            return _read(base_ck, spec, "whole", names, dt)
        if kind_format(kind) is not None:
            return np.asarray(read_node(ck, kind_format(kind), spec, kind, names, configs, {}, e).dequantize(bf16))
        if e is None:
            return _read(ck, spec, kind, names, dt)
        if kind == "experts":
            return np.array(ck.get(names[e]), dtype=dt, copy=True).reshape(spec.shape[1:])
        return np.array(ck.get(names[0])[e], dtype=dt, copy=True).reshape(spec.shape[1:])  # stacked (hf5) tensor

    def emit(path, spec, mod, w, what):
        """``(name, array)`` pairs of one 2-D weight ``w`` of module ``mod``: quantized when ``path`` is a target."""
        if path not in targets:
            return [(mod + ".weight", w)]
        node = FORMATS[recipe.format].from_float(jnp.asarray(w), name=what, **options)
        entries.setdefault(type(node), {})[mod] = node.config_entry()
        return list(node.checkpoint_tensors(mod))

    n_in = sum(1 for _ in items)
    try:
        with atomic_output(dst, force) as tmp:
            writer = _ShardWriter(tmp, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
            bar = _progress(n_in, f"{os.path.basename(os.path.abspath(src))} -> {to}", progress)
            try:
                for path, spec, kind, names in items:
                    if kind == "scalar":  # FP8 KV scales: not part of a BF16 checkpoint
                        bar.update(1)
                        continue
                    if spec.stacked:  # expert banks: one expert at a time (same bytes: scales are per expert)
                        for e in range(spec.shape[0]):
                            w = read_float(spec, kind, names, e)
                            mod = spec.ckpt.format(e=e).removesuffix(".weight")
                            for name, a in emit(path, spec, mod, w, f"{targets.get(path, mod)} (expert {e})"):
                                writer.add(name, np.asarray(a))
                            del w
                    else:
                        leaf = read_float(spec, kind, names, None)
                        if path in targets:
                            mod = spec.ckpt.removesuffix(".weight")
                            pairs = emit(path, spec, mod, leaf, targets[path])
                        else:
                            pairs = checkpoint_tensors(_mini_tree(path, leaf), cfg)
                        for name, a in pairs:
                            writer.add(name, np.asarray(a))
                        del leaf, pairs
                    bar.update(1)
                bar.close()
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            conf = cfg.to_dict()
            write_quant_configs(tmp, conf, cfg, entries, kv_fp8=False)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(conf, f, indent=2)
            _copy_side_files(src, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"{dst_abs}: the disk is full (no space left on device while writing); nothing was "
                               f"written (the partial output was removed)") from None
        raise
    return {"source": src, "output": dst_abs, "from": fmt, "to": to, "parameters": n_in, "shards": len(files),
            "tensor_bytes": writer.total}
