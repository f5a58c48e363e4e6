"""Quantization as transforms on the parameter pytree.

``apply(params, config, recipe)`` swaps selected float weights for quantized nodes (``nemojax.formats``) and,
given calibration amaxes, sets the activation ``input_scale`` of formats that take one (NVFP4, FP8) and FP8 KV
``k_scale`` / ``v_scale``. Recipes are data, declared by the formats (``QuantFormat.recipes``): glob patterns
(``fnmatch``, ``*`` crosses dots) over checkpoint module names such as
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
from ..kernels import BACKENDS, backend_unavailable, resolve_backend
from ..params import param_specs, tree_paths

__all__ = ["Recipe", "RECIPES", "apply", "calibrate_model", "module_name", "quantized_modules", "resolve_recipe",
           "format_options", "set_mode", "set_backend"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Which linears get which format.

    quantize: globs of modules to quantize; exclude: globs kept in high precision (wins over quantize);
    keep_mamba_before_attention: also keep the Mamba layer directly before each attention layer;
    kv_cache: "fp8" or None; mode: the format's execution mode (``QuantFormat.modes``; None: its default, e.g.
    NVFP4 "w4a16" | "w4a4"); about: a one-line description (``nemojax convert --help``).
    HLWQ (format "hlwq"): bits (2..8), codebook "compatible" (polarquant's 100-iteration Lloyd-Max table) or
    "converged" (the optimum; ~17% lower 5-bit MSE, stored with the checkpoint), path "dequant" | "rotated".
    """

    name: str = "custom"
    format: str = "nvfp4"
    quantize: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_mamba_before_attention: bool = False
    kv_cache: str | None = None
    mode: str | None = None
    bits: int = 5
    codebook: str = "compatible"
    path: str = "dequant"
    about: str = ""


#: every registered format's recipes (``QuantFormat.recipes``), in registration order
RECIPES = {name: Recipe(name=name, format=fmt.name, **data) for fmt in FORMATS.values()
           for name, data in fmt.recipes.items()}

# the leaf names of the block kinds' linears (what a recipe can select)
_LINEAR_LEAVES = tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for kind in BLOCKS.values() for n in kind.linears))


def module_name(spec: Spec) -> str:
    """Checkpoint module name of a parameter (no ``.weight``; stacked experts named by expert 0)."""
    name = spec.ckpt.format(e=0) if spec.stacked else spec.ckpt
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _fields(r: Recipe) -> dict:
    """The recipe's fields a format reads (``QuantFormat.recipe_options``)."""
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("name", "format")}


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
    try:
        FORMATS[r.format].recipe_options(**_fields(r))
    except ValueError as e:
        raise ValueError(f"recipe {r.name!r}: {e}") from None
    if r.kv_cache not in (None, "fp8"):
        raise ValueError(f"recipe {r.name!r}: kv_cache {r.kv_cache!r} is not one of None, 'fp8'")
    return r


def format_options(recipe, mode: str | None = None) -> dict:
    """The keyword options of the recipe's format ``from_float`` (``QuantFormat.recipe_options``: HLWQ: bits,
    codebook table, path; NVFP4 / FP8: the execution ``mode``, default the recipe's)."""
    r = resolve_recipe(recipe)
    return FORMATS[r.format].recipe_options(**{**_fields(r), "mode": mode or r.mode})


def quantized_modules(cfg: Config, recipe) -> dict[str, str]:
    """``{param path: module name}`` of the linears ``recipe`` quantizes for this config."""
    r = resolve_recipe(recipe)
    keep = set()
    if r.keep_mamba_before_attention:
        for i, c in enumerate(cfg.pattern):
            if c == "*" and i > 0 and cfg.pattern[i - 1] == "M":
                keep.add(f"backbone.layers.{i - 1}.mixer.")
    out = {}
    matrices = _LINEAR_LEAVES + (("embeddings", "lm_head") if FORMATS[r.format].quantizes_embeddings else ())
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

    calibration: amaxes from :func:`calibrate_model`; for a format with activation scales sets ``input_scale =
    amax / QuantFormat.input_scale_divisor`` (NVFP4: 2688; same value for every expert of a bank, as ModelOpt
    exports it) and, with ``kv_cache="fp8"``, ``k_scale = amax / 448``. Without calibration the activation modes
    (NVFP4 W4A4) and the FP8 KV cache are unavailable (weight-only, e.g. W4A16, works).
    """
    r = resolve_recipe(recipe)
    fmt = FORMATS[r.format]
    if mode is not None and fmt.modes and mode not in fmt.modes:
        raise ValueError(f"mode={mode!r}: expected one of {fmt.modes}")
    opts = format_options(r, mode)
    mode = opts.get("mode")
    targets = quantized_modules(cfg, r)
    if not targets:
        raise ValueError(f"recipe {r.name!r} selects no linear of pattern {cfg.pattern!r}")
    calib = calibration or {}
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_quantized)
    names = [n for n, _ in tree_paths(params)]
    out = []
    for path, leaf in zip(names, flat):
        if path in targets and not is_quantized(leaf):
            scale = {}
            if fmt.input_scale_divisor is not None:
                ins = None
                if path in calib:
                    a = jnp.float32(calib[path]) / jnp.float32(fmt.input_scale_divisor)
                    ins = jnp.broadcast_to(a, leaf.shape[:-2]) if leaf.ndim == 3 else a
                if mode in fmt.activation_modes and ins is None:
                    raise QuantError(f"{targets[path]}: {mode} mode needs calibration (input_scale)")
                scale = {"input_scale": ins}
            leaf = fmt.from_float(leaf, **scale, name=targets[path], **opts)
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
    """The same parameters with every quantized node whose format has execution mode ``mode``
    (``QuantFormat.modes``: NVFP4 "w4a16" | "w4a4", ...) switched to it (run option ``<format>_mode``); nodes of
    other formats are left as they are."""
    known = {m for fmt in FORMATS.values() for m in fmt.modes}
    if mode not in known:
        raise ValueError(f"mode={mode!r}: expected one of {sorted(known)}")

    def switch(x):
        return x.configure(**{f"{x.name}_mode": mode}) if is_quantized(x) and mode in x.modes else x

    return jax.tree.map(switch, params, is_leaf=is_quantized)


def set_backend(params: dict, backend: str) -> dict:
    """The same parameters with every quantized node's matmul run by ``backend`` (``nemojax.kernels``): "xla"
    (the jnp reference: dequantize, then one XLA matmul), "cpu" (plain XLA for XLA:CPU: NVFP4, HLWQ and FP8 products of
    up to ``kernels.CPU_ROWS`` rows decode the packed bytes tile by tile, never a whole dequantized weight), "pallas"
    (``pallas_kernels``: codes decoded inside the kernels, dense and grouped for the MoE; on a CPU the kernels run
    in Pallas interpret mode, slow but exact), "triton" (as "pallas", with jax-triton decode GEMVs for up to 8
    rows; needs a GPU and jax-triton) or "auto" ("cpu" when jax runs on a CPU, else "xla"). One switch per model;
    a format without kernels runs its reference on every backend."""
    backend = resolve_backend(backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    why = backend_unavailable(backend)
    if why:
        raise ValueError(f"backend={backend!r}: {why}")
    return jax.tree.map(lambda x: x.replace(backend=backend) if is_quantized(x) else x, params, is_leaf=is_quantized)
