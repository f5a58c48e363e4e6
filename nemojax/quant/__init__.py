"""Quantization as transforms on the parameter pytree.

``apply(params, config, recipe)`` swaps selected float weights for quantized nodes (``nemojax.formats``) and,
given calibration amaxes, sets NVFP4 ``input_scale`` and FP8 KV ``k_scale`` / ``v_scale``. Recipes are data:
glob patterns (``fnmatch``, ``*`` crosses dots) over checkpoint module names such as
``backbone.layers.3.mixer.experts.0.up_proj`` (stacked expert banks match with expert 0's name).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import jax
import jax.numpy as jnp

from ..blocks.base import BLOCKS, Spec
from ..config import Config
from ..formats import FORMATS, QuantError, is_quantized
from ..formats.base import check_run_options
from ..formats.hlwq import lloyd_max_table
from ..formats.nvfp4 import MODES
from ..kernels import BACKENDS, backend_unavailable
from ..params import param_specs, tree_paths

__all__ = ["Recipe", "RECIPES", "apply", "calibrate_model", "module_name", "quantized_modules", "resolve_recipe",
           "format_options", "set_mode", "set_backend"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Which linears get which format.

    quantize: globs of modules to quantize; exclude: globs kept in high precision (wins over quantize);
    keep_mamba_before_attention: also keep the Mamba layer directly before each attention layer;
    kv_cache: "fp8" or None; mode: NVFP4 execution mode ("w4a16" | "w4a4").
    HLWQ (format "hlwq"): bits (2..8), codebook "compatible" (polarquant's 100-iteration Lloyd-Max table) or
    "converged" (the optimum; ~17% lower 5-bit MSE, stored with the checkpoint), path "dequant" | "rotated".
    """

    name: str = "custom"
    format: str = "nvfp4"
    quantize: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_mamba_before_attention: bool = False
    kv_cache: str | None = None
    mode: str = "w4a16"
    bits: int = 5
    codebook: str = "compatible"
    path: str = "dequant"


RECIPES = {
    # the published Nemotron-3-Nano NVFP4 layout (selective: attention, router, conv1d, lm_head and the Mamba layer
    # before each attention layer stay in high precision)
    "nvfp4": Recipe(
        name="nvfp4",
        quantize=("*.mixer.experts.*", "*.mixer.shared_experts.*", "*.mixer.in_proj", "*.mixer.out_proj",
                  "*.mixer.up_proj", "*.mixer.down_proj"),
        exclude=("lm_head", "*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.conv1d", "*.gate"),
        keep_mamba_before_attention=True, kv_cache="fp8"),
    # every linear of the blocks (attention and every Mamba layer too); embeddings and lm_head stay
    "nvfp4-all": Recipe(name="nvfp4-all", quantize=("*.mixer.*",), exclude=("*.conv1d", "*.gate"),
                        kv_cache="fp8"),
    # the Mamba-aware rule set of the polarengine HLWQ-Q5 Nemotron checkpoints: every matrix (embeddings and
    # lm_head included) except the router and conv1d
    "hlwq-q5": Recipe(name="hlwq-q5", format="hlwq", quantize=("*",), exclude=("*.gate", "*.conv1d"), bits=5),
    "hlwq-q5-converged": Recipe(name="hlwq-q5-converged", format="hlwq", quantize=("*",),
                                exclude=("*.gate", "*.conv1d"), bits=5, codebook="converged"),
}

# the leaf names of the block kinds' linears (what a recipe can select)
_LINEAR_LEAVES = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for kind in BLOCKS.values() for n in kind.linears))


def module_name(spec: Spec) -> str:
    """Checkpoint module name of a parameter (no ``.weight``; stacked experts named by expert 0)."""
    name = spec.ckpt.format(e=0) if spec.stacked else spec.ckpt
    return name[: -len(".weight")] if name.endswith(".weight") else name


def resolve_recipe(recipe) -> Recipe:
    """A recipe name (a key of :data:`RECIPES`) or a :class:`Recipe`, checked (ValueError)."""
    if isinstance(recipe, Recipe):
        r = recipe
    elif isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r}: unknown; known recipes: {sorted(RECIPES)}")
        r = RECIPES[recipe]
    else:
        raise ValueError(f"recipe must be a name or a Recipe, got {recipe!r}")
    if r.format not in FORMATS:
        raise ValueError(f"recipe {r.name!r}: format {r.format!r} is not one of {', '.join(map(repr, FORMATS))}")
    if r.format == "hlwq" and (r.codebook not in ("compatible", "converged") or r.path not in ("dequant", "rotated")
                               or not 2 <= r.bits <= 8):
        raise ValueError(f"recipe {r.name!r}: bits {r.bits} / codebook {r.codebook!r} / path {r.path!r} invalid "
                         f"(bits 2..8, codebook 'compatible'|'converged', path 'dequant'|'rotated')")
    if r.mode not in MODES:
        raise ValueError(f"recipe {r.name!r}: mode {r.mode!r} is not one of {MODES}")
    if r.kv_cache not in (None, "fp8"):
        raise ValueError(f"recipe {r.name!r}: kv_cache {r.kv_cache!r} is not one of None, 'fp8'")
    return r


def format_options(recipe, mode: str | None = None) -> dict:
    """The keyword options of the recipe's format ``from_float`` (HLWQ: bits, codebook table, path; NVFP4: the
    execution ``mode``, default the recipe's; another format: none)."""
    r = resolve_recipe(recipe)
    if r.format == "hlwq":
        return {"bits": r.bits, "table": lloyd_max_table(r.bits, 100 if r.codebook == "compatible" else None),
                "path": r.path}
    return {"mode": mode or r.mode} if r.format == "nvfp4" else {}


def quantized_modules(cfg: Config, recipe) -> dict[str, str]:
    """``{param path: module name}`` of the linears ``recipe`` quantizes for this config."""
    r = resolve_recipe(recipe)
    keep = set()
    if r.keep_mamba_before_attention:
        for i, c in enumerate(cfg.pattern):
            if c == "*" and i > 0 and cfg.pattern[i - 1] == "M":
                keep.add(f"backbone.layers.{i - 1}.mixer.")
    out = {}
    matrices = _LINEAR_LEAVES + (("embeddings", "lm_head") if r.format == "hlwq" else ())
    for path, spec in tree_paths(param_specs(cfg)):
        if path.rsplit(".", 1)[-1] not in matrices:
            continue
        name = module_name(spec)
        if not any(fnmatch.fnmatchcase(name, g) for g in r.quantize):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in r.exclude) or any(name.startswith(k) for k in keep):
            continue
        out[path] = name
    return out


def calibrate_model(params: dict, cfg: Config, batches, recipe="nvfp4") -> dict:
    """Activation amaxes for ``recipe``: ``{param path: amax}`` for quantized linears' inputs (and every
    attention ``k_proj``'s) and ``{"layers.i.mixer.k_proj.k" / ".v_proj.v": amax}`` for attention K/V (the outputs
    of ``k_proj`` / ``v_proj``)."""
    from .calibrate import calibrate  # it runs the forward: imported on use (the model imports quantized formats)

    observe = {p: p for p in quantized_modules(cfg, recipe)}
    outputs = {}
    for i, c in enumerate(cfg.pattern):
        if c == "*":
            observe[f"layers.{i}.mixer.k_proj"] = f"layers.{i}.mixer.k_proj"
            outputs[f"layers.{i}.mixer.k_proj"] = f"layers.{i}.mixer.k_proj.k"
            outputs[f"layers.{i}.mixer.v_proj"] = f"layers.{i}.mixer.v_proj.v"
    return calibrate(params, cfg, batches, observe, outputs)


def apply(params: dict, cfg: Config, recipe="nvfp4", calibration: dict | None = None, mode: str | None = None
          ) -> dict:
    """Quantize ``params`` per ``recipe``; returns a new pytree (the input is not modified).

    calibration: amaxes from :func:`calibrate_model`; sets NVFP4 ``input_scale = amax / 2688`` (same value for
    every expert of a bank, as ModelOpt exports it) and, with ``kv_cache="fp8"``, ``k_scale = amax / 448``.
    Without calibration, W4A4 mode and the FP8 KV cache are unavailable (weight-only W4A16 works).
    """
    r = resolve_recipe(recipe)
    mode = mode or r.mode
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    targets = quantized_modules(cfg, r)
    if not targets:
        raise ValueError(f"recipe {r.name!r} selects no linear of pattern {cfg.pattern!r}")
    calib = calibration or {}
    fmt, opts = FORMATS[r.format], format_options(r, mode)
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_quantized)
    names = [n for n, _ in tree_paths(params)]
    out = []
    if r.format != "nvfp4":  # no calibrated activation scales, no FP8 KV cache
        for path, leaf in zip(names, flat):
            if path in targets and not is_quantized(leaf):
                leaf = fmt.from_float(leaf, name=targets[path], **opts)
            out.append(leaf)
        return jax.tree_util.tree_unflatten(treedef, out)
    for path, leaf in zip(names, flat):
        if path in targets and not is_quantized(leaf):
            ins = None
            if path in calib:
                a = jnp.float32(calib[path]) / jnp.float32(2688.0)
                ins = jnp.broadcast_to(a, leaf.shape[:-2]) if leaf.ndim == 3 else a
            if mode == "w4a4" and ins is None:
                raise QuantError(f"{targets[path]}: w4a4 mode needs calibration (input_scale)")
            leaf = fmt.from_float(leaf, ins, name=targets[path], **opts)
        out.append(leaf)
    new = jax.tree_util.tree_unflatten(treedef, out)
    if r.kv_cache == "fp8":
        for i, c in enumerate(cfg.pattern):
            key = f"layers.{i}.mixer.k_proj.k"
            if c != "*":
                continue
            if key not in calib:
                if calibration is not None:
                    raise QuantError(f"backbone.layers.{i}.mixer: calibration has no K/V amax for the FP8 KV cache")
                continue  # weight-only without calibration: no FP8 KV
            m = dict(new["layers"][i]["mixer"])
            m["k_scale"] = jnp.float32(calib[key]) / jnp.float32(448.0)
            m["v_scale"] = jnp.float32(calib[f"layers.{i}.mixer.v_proj.v"]) / jnp.float32(448.0)
            new["layers"][i] = {**new["layers"][i], "mixer": m}
    return new


def set_mode(params: dict, mode: str) -> dict:
    """The same parameters with every NVFP4 node switched to ``mode`` ("w4a16" | "w4a4")."""
    check_run_options(nvfp4_mode=mode)
    return jax.tree.map(lambda x: x.configure(nvfp4_mode=mode) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def set_backend(params: dict, backend: str) -> dict:
    """The same parameters with every quantized node's matmul run by ``backend`` (``nemojax.kernels``): "xla"
    (the jnp reference: dequantize, then one XLA matmul), "pallas" (``pallas_kernels``: codes decoded inside the
    kernels, dense and grouped for the MoE; on a CPU the kernels run in Pallas interpret mode, slow but exact) or
    "triton" (as "pallas", with jax-triton decode GEMVs for up to 8 rows; needs a GPU and jax-triton). One switch
    per model; a format without kernels runs its reference on every backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    why = backend_unavailable(backend)
    if why:
        raise ValueError(f"backend={backend!r}: {why}")
    return jax.tree.map(lambda x: x.replace(backend=backend) if is_quantized(x) else x, params, is_leaf=is_quantized)
