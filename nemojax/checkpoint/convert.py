"""Checkpoint conversions: a reader (the source's plan, :class:`nemojax.checkpoint.read.Reader`) -> a transform
(quantization with a recipe of ``nemojax.quant``, or none) -> a writer (sharded safetensors,
:class:`nemojax.checkpoint.write.ShardWriter`, or nemojax's orbax format), one parameter (one expert) at a time.
Output is written to a temporary folder beside the destination and renamed only when complete, so a failed or
interrupted run leaves nothing half-written."""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax.numpy as jnp
import numpy as np

from .. import quant as qlib
from ..config import Config
from ..formats import FORMATS, is_quantized
from ..params import Spec
from .orbax import Scratch, tensor_bytes, write_tree
from .output import ConvertError, DiskFullError, atomic_output, check_apart, check_output, copy_side_files
from .plan import nest, plan_format
from .read import Reader, load_params, progress_bar
from .source import Checkpoint
from .write import ShardWriter, expert_spec, param_tensors, save_params, write_config

__all__ = ["dequantize_checkpoint", "convert_checkpoint", "convert_to_orbax", "open_source", "ConvertError",
           "DiskFullError", "TARGETS", "DEFAULT_MAX_SHARD_BYTES", "SUPPORTED"]

TARGETS = (*qlib.RECIPES, "bf16", "orbax")  # every registered format's recipes (nemojax.quant.RECIPES)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")
SUPPORTED = (f"bf16 -> {' | '.join(qlib.RECIPES)}; {' | '.join(FORMATS)} -> bf16; "
             "any -> orbax (optionally quantizing a bf16 checkpoint with quant=<recipe>)")
_BF16 = jnp.dtype(jnp.bfloat16)


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, base=None, dtype="bfloat16",
                          force: bool = False, max_shard_bytes: int | None = None, progress: bool = False) -> str:
    """An NVFP4 or HLWQ (any polarengine layout) checkpoint -> a plain BF16 Hugging Face checkpoint
    (original ``backbone.*`` naming), like ``polarquant-convert``. ``base`` supplies buffers HLWQ files lack."""
    src = os.fspath(src)
    check_output(dst, force, src)
    cfg = Config.from_json(src)
    params = load_params(src, cfg, dtype, progress=progress, base=base, dequantize=True)
    for i in cfg.layer_indices("*"):  # FP8 KV scales do not belong in a BF16 checkpoint
        params["layers"][i]["mixer"].pop("k_scale", None)
        params["layers"][i]["mixer"].pop("v_scale", None)
    with atomic_output(dst, force, src) as tmp:
        save_params(params, cfg, tmp, max_shard_bytes=max_shard_bytes)
        copy_side_files(src, tmp)
    return os.fspath(dst)


# ================================================================================================ the reader
def open_source(src, dst, base=None) -> tuple[Reader, str]:
    """A conversion's input: the reader of ``src`` (its plan checked) and its format (``plan_format``)."""
    src = os.fspath(src)
    check_apart(dst, src)  # before anything is read
    cfg = Config.from_json(src)
    reader = Reader(Checkpoint(src), cfg, Checkpoint(base) if base is not None else None)
    return reader, plan_format(reader.items)


def _target(src, dst, to: str, quant, base, exclude: tuple[str, ...] = ()
            ) -> tuple[Reader, str, "qlib.Recipe | None"]:
    """The one place a target is interpreted: ``(reader, source format, recipe or None)`` for converting ``src`` to
    ``to`` (a quantization recipe's name, "bf16" or "orbax" with an optional recipe ``quant``), the recipe keeping
    the modules of the globs ``exclude`` in high precision too; ConvertError for a pair that cannot be converted."""
    reader, fmt = open_source(src, dst, base)
    if to == "orbax":
        recipe = None
        if quant is not None:
            try:
                recipe = qlib.resolve_recipe(quant)
            except ValueError as e:
                raise ConvertError(f"--quant: {e}") from None
            if fmt != "bf16":
                raise ConvertError(f"{reader.ck.path}: --quant needs a BF16 checkpoint, this one is {fmt} (convert "
                                   f"it to bf16 first)")
    else:
        if (to == "bf16") == (fmt == "bf16") or fmt == "mixed":
            raise ConvertError(f"{reader.ck.path}: cannot convert a {fmt} checkpoint to {to}; supported conversions: "
                               f"{SUPPORTED}")
        recipe = qlib.resolve_recipe(to) if to != "bf16" else None
    if recipe is not None and exclude:
        recipe = dataclasses.replace(recipe, exclude=recipe.exclude + tuple(exclude))
    if fmt != "bf16":
        reader.quant_configs()  # read and checked before anything is written
    return reader, fmt, recipe


# ================================================================================================ the transform
class _Quantize:
    """The transform: the float weights a recipe selects -> nodes of its format (weight-only: no calibration, so
    no ``input_scale`` and no FP8 KV scales); everything else unchanged. No recipe: the identity."""

    def __init__(self, cfg: Config, recipe):
        self.targets = qlib.quantized_modules(cfg, recipe) if recipe is not None else {}
        self.fmt = FORMATS[recipe.format] if recipe is not None else None
        self.options = qlib.format_options(recipe) if recipe is not None else {}

    def __call__(self, path: str, w, expert: int | None = None):
        if path not in self.targets:
            return w
        what = self.targets[path] if expert is None else f"{self.targets[path]} (expert {expert})"
        return self.fmt.from_float(jnp.asarray(w), name=what, **self.options)


def _pieces(spec: Spec) -> list[tuple[Spec, int | None]]:
    """What a parameter is converted as: itself, or an expert bank one expert at a time (same bytes: scales are
    per expert)."""
    return [(spec, None)] if not spec.stacked else [(expert_spec(spec, e), e) for e in range(spec.shape[0])]


# ================================================================================================ conversions
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, force: bool = False,
                       max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, base: str | os.PathLike | None = None,
                       progress: bool = True, quant: str | None = None, exclude: tuple[str, ...] = ()) -> dict:
    """Convert a checkpoint folder one parameter at a time (peak memory ~ one parameter, not the model).

    ``to``: a recipe (:data:`nemojax.quant.RECIPES`; "nvfp4" is ModelOpt's layout, weight-only W4A16_NVFP4 with
    the published selective recipe: there is no calibration, so no ``input_scale`` and no FP8 KV scales;
    "hlwq-q5" / "hlwq-q5-converged" are polarengine layout B + polar_config.json) from a BF16 (float)
    checkpoint, or "bf16" from a quantized checkpoint (``base``: the BF16 checkpoint supplying the
    ``e_score_correction_bias`` HLWQ files lack), or "orbax" (the parameter pytree as an orbax checkpoint, see
    ``nemojax.checkpoint.orbax``; ``quant``: a recipe to quantize a BF16 source on the way, e.g. "nvfp4").
    ``exclude``: globs of modules the recipe keeps in high precision besides its own. Output goes to a temporary
    folder beside ``dst``, renamed at the end: any error leaves nothing (a full disk: ``DiskFullError``), and
    partial folders killed runs left beside ``dst`` are removed first. Returns a summary dict
    (``removed_partials``: what was removed).
    """
    if quant is not None and to != "orbax":
        raise ConvertError(f"quant={quant!r} applies to --to orbax only (use --to {quant} for safetensors)")
    if exclude and (to == "bf16" or (to == "orbax" and quant is None)):
        raise ConvertError(f"exclude={list(exclude)} applies to a quantizing conversion only (a recipe)")
    if to not in TARGETS:
        raise ConvertError(f"--to {to!r}: unknown target; supported: {', '.join(TARGETS)} ({SUPPORTED})")
    if to != "orbax" and max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConvertError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    if to == "orbax":
        return convert_to_orbax(src, dst, quant=quant, force=force, base=base, progress=progress, exclude=exclude)
    return _to_safetensors(src, dst, to, force, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, base, progress, exclude)


def _to_safetensors(src, dst, to: str, force: bool, max_shard_bytes: int, base, progress: bool,
                    exclude: tuple[str, ...] = ()) -> dict:
    reader, fmt, recipe = _target(src, dst, to, None, base, exclude)
    quantize = _Quantize(reader.cfg, recipe)
    entries: dict = {}  # the quantized modules' config entries, by format
    out = atomic_output(dst, force, reader.ck.path)
    with out as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        label = os.path.basename(os.path.abspath(reader.ck.path))
        bar = progress_bar(len(reader.items), f"{label} -> {to}", progress)
        try:
            for item in reader.items:
                if item.spec is None:  # FP8 KV scales: not part of these checkpoints
                    bar.update(1)
                    continue
                for spec, e in _pieces(item.spec):
                    leaf = quantize(item.path, reader.float(item, _BF16, e), e)
                    if is_quantized(leaf):
                        entries.setdefault(type(leaf), {})[spec.ckpt.removesuffix(".weight")] = leaf.config_entry()
                    for name, a in param_tensors(item.path, spec, leaf):
                        writer.add(name, np.asarray(a))
                    del leaf
                bar.update(1)
            bar.close()
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_config(tmp, reader.cfg, entries, kv_fp8=False)
        copy_side_files(reader.ck.path, tmp)
    return {"source": reader.ck.path, "output": os.path.abspath(os.fspath(dst)), "from": fmt, "to": to,
            "parameters": len(reader.items), "shards": len(files), "tensor_bytes": writer.total,
            "removed_partials": out.removed}


def convert_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, quant: str | None = None,
                     force: bool = False, base: str | os.PathLike | None = None, progress: bool = True,
                     exclude: tuple[str, ...] = ()) -> dict:
    """A Hugging Face checkpoint folder (BF16, NVFP4 or HLWQ) -> an orbax checkpoint folder, streaming.

    ``quant``: a recipe name ("nvfp4", "hlwq-q5", ...) to quantize a BF16 checkpoint on the way (weight-only;
    no calibration). Without it the parameters keep their stored format (a quantized checkpoint stays
    quantized: nodes as stored, their run options set when the orbax checkpoint is loaded). Output goes to a
    temporary folder renamed at the end. Returns a summary dict.
    """
    reader, fmt, recipe = _target(src, dst, "orbax", quant, base, exclude)
    quantize = _Quantize(reader.cfg, recipe)
    flat: dict = {}
    out = atomic_output(dst, force, reader.ck.path)
    with out as tmp:
        scratch = Scratch(os.path.join(tmp, ".scratch"))
        label = os.path.basename(os.path.abspath(reader.ck.path))
        bar = progress_bar(len(reader.items), f"{label} -> orbax", progress)
        for item in reader.items:
            def one(e, item=item):
                return quantize(item.path, reader.value(item, _BF16, e), e)

            if item.spec is None:  # FP8 KV scales
                flat[item.path] = reader.float(item, _BF16)
            elif item.spec.stacked:  # one expert at a time, however it is stored
                flat[item.path] = scratch.bank(item.spec.shape[0], one)
            else:
                flat[item.path] = scratch.put(one(None))
            bar.update(1)
        bar.close()
        tree = nest(flat)
        write_tree(tmp, tree, reader.cfg)
        del tree, flat
        shutil.rmtree(scratch.folder)
        copy_side_files(reader.ck.path, tmp)
        nbytes = tensor_bytes(tmp)
    return {"source": reader.ck.path, "output": os.path.abspath(os.fspath(dst)), "from": fmt,
            "to": "orbax" + (f" ({recipe.name})" if recipe else ""), "parameters": len(reader.items), "shards": 1,
            "tensor_bytes": nbytes, "removed_partials": out.removed}
