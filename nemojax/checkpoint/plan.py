"""The plan of a checkpoint: every parameter of a config matched to the tensors that store it, checked (names,
shapes, dtypes) before anything is read. Every loop that reads a checkpoint (loading, sharded loading, the
conversions) walks the same list of :class:`PlanItem`.

Also the parameter-path helpers shared by the readers and writers: :func:`flat_params` (``(path, leaf)`` of a
pytree, quantized nodes as leaves) and :func:`nest` (back to the pytree).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

from ..config import Config
from ..formats import FORMATS, QuantError, QuantFormat, is_quantized
from ..formats.base import check_tensor
from ..params import Spec, param_specs, tree_paths
from .source import Checkpoint, CheckpointError, naming_function

__all__ = ["PlanItem", "plan", "plan_format", "stored_format", "flat_params", "nest"]

_IGNORED = re.compile(r"^(mtp\.|backbone\.mtp\.|model\.mtp\.)")  # multi-token-prediction heads: not used


@dataclasses.dataclass(frozen=True)
class PlanItem:
    """One parameter and where it is stored.

    ``path``: the parameter's dot path (``layers.3.mixer.in_proj``; an FP8 KV-cache scale:
    ``layers.i.mixer.k_scale`` / ``v_scale``, with ``spec`` None). ``names``: the tensor names (float) or the module
    names (quantized: ``fmt`` is the format, the first of ``nemojax.formats.FORMATS`` whose ``stored_in`` claims
    the module). ``stacked``: one tensor / module per expert (``names[e]``), stacked along a new leading axis when
    read; False for one tensor holding the whole parameter (transformers-5 stacked experts included).
    ``source``: "checkpoint", or "base" for a buffer read from the base checkpoint (HLWQ files lack
    ``e_score_correction_bias``).
    """

    path: str
    spec: Spec | None
    names: tuple[str, ...]
    fmt: type[QuantFormat] | None = None
    stacked: bool = False
    source: str = "checkpoint"

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape (``()`` for a KV-cache scale)."""
        return () if self.spec is None else self.spec.shape

    @property
    def module_shape(self) -> tuple[int, ...]:
        """The shape of what one name stores: one expert's for a stacked item, else the parameter's."""
        return self.shape[1:] if self.stacked else self.shape


def stored_format(ck: Checkpoint, mod: str) -> type[QuantFormat] | None:
    """The quantized format checkpoint module ``mod`` is stored in (the first that claims it), or None."""
    return next((f for f in FORMATS.values() if f.stored_in(ck, mod)), None)


def _item(ck: Checkpoint, path: str, spec: Spec, conv) -> PlanItem:
    """How one parameter is stored: a float tensor (experts one per expert, or stacked) or a linear stored in a
    quantized format (one module, or one per expert)."""
    if spec.stacked:
        whole = conv(spec.ckpt.replace(".{e}", "").removesuffix(".weight"))
        if whole in ck:
            return PlanItem(path, spec, (whole,))
        names = tuple(conv(spec.ckpt.format(e=e)) for e in range(spec.shape[0]))
        mods = tuple(n.removesuffix(".weight") for n in names)
        fmt = stored_format(ck, mods[0])
        return PlanItem(path, spec, mods if fmt else names, fmt, stacked=True)
    name = conv(spec.ckpt)
    fmt = stored_format(ck, name.removesuffix(".weight")) if name.endswith(".weight") and len(spec.shape) == 2 \
        else None
    return PlanItem(path, spec, (name.removesuffix(".weight"),), fmt) if fmt else PlanItem(path, spec, (name,))


_TENSOR_KINDS = {"float": (lambda dt: dt.kind == "f" or dt.name == "bfloat16", "a floating-point weight"),
                 "float32": (lambda dt: dt == np.float32, "an F32 scale")}


def _check(ck: Checkpoint, name: str, want: tuple[int, ...], dtype: str = "float") -> None:
    try:
        check_tensor(ck, name, want, *_TENSOR_KINDS[dtype])
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def plan(ck: Checkpoint, cfg: Config, base: Checkpoint | None = None) -> list[PlanItem]:
    """Match every parameter to checkpoint tensors; raise on missing, unexpected or mis-shaped tensors.

    ``base``: a checkpoint supplying the ``e_score_correction_bias`` buffers ``ck`` lacks. FP8 KV-cache scales
    (``k_proj.k_scale``, ``v_proj.v_scale``) come last, as items with ``spec`` None.
    """
    conv = naming_function(ck.naming)
    out, used, missing = [], set(), []
    for path, spec in tree_paths(param_specs(cfg)):
        item = _item(ck, path, spec, conv)
        if item.fmt is not None:
            for mod in item.names:
                try:
                    used.update(item.fmt.tensor_names(ck, mod, item.module_shape))
                except QuantError as e:
                    raise CheckpointError(str(e)) from None
            out.append(item)
            continue
        name = item.names[0]
        if not item.stacked and name.endswith(".e_score_correction_bias") and name not in ck and base:
            if name not in base:
                raise CheckpointError(f"{base.path}: the base checkpoint has no {name!r} either")
            _check(base, name, spec.shape)
            out.append(dataclasses.replace(item, source="base"))
            continue
        absent = [n for n in item.names if n not in ck]
        if absent:
            missing.extend(absent)
            continue
        for n in item.names:
            want = item.module_shape if item.stacked else (spec.ckpt_shape or spec.shape)
            if not item.stacked and spec.ckpt_shape is not None and tuple(ck.shape(n)) == spec.shape:
                want = spec.shape  # conv1d saved without the middle axis
            _check(ck, n, want)
        used.update(item.names)
        out.append(item)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = ""
        if all(n.endswith(".e_score_correction_bias") for n in missing):
            hint = (": polarengine (HLWQ) checkpoints drop this registered buffer; pass base=<the BF16 checkpoint "
                    "they were made from> (nemojax.load(..., base=...) / --base)")
        raise CheckpointError(f"{ck.path}: missing tensor(s) {missing[:5]}{more} for a {cfg.num_hidden_layers}-layer "
                              f"model with pattern {cfg.pattern!r}{hint}")
    for i in cfg.layer_indices("*"):
        k, v = (conv(f"backbone.layers.{i}.mixer.{p}_proj.{p}_scale") for p in ("k", "v"))
        if (k in ck) != (v in ck):
            raise CheckpointError(f"{ck.path}: {k if k not in ck else v!r} is missing (FP8 KV needs both scales)")
        if k in ck:
            for n, key in ((k, "k_scale"), (v, "v_scale")):
                _check(ck, n, (), "float32")
                used.add(n)
                out.append(PlanItem(f"layers.{i}.mixer.{key}", None, (n,)))
    unexpected = [n for n in ck.names if n not in used and not _IGNORED.match(n)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(f"{ck.file_of(first)}: unexpected tensor(s) {unexpected[:5]}"
                              f"{' (and more)' if len(unexpected) > 5 else ''} not used by pattern {cfg.pattern!r}")
    return out


def plan_format(items: list[PlanItem]) -> str:
    """'bf16' (plain floats), a quantized format's name ('nvfp4', 'hlwq', ...) or 'mixed'."""
    q = {it.fmt.name for it in items if it.fmt is not None}
    if len(q) > 1:
        return "mixed"
    return q.pop() if q else "bf16"


def flat_params(params) -> list[tuple[str, object]]:
    """``[(dot path, leaf), ...]`` of a parameter pytree, a quantized node being one leaf."""
    return [(jax.tree_util.keystr(kp, simple=True, separator="."), leaf)
            for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]]


def nest(flat: dict) -> dict:
    """``{"layers.3.mixer.in_proj": x}`` -> nested dicts; a dict whose keys are 0..n-1 becomes a list."""
    root: dict = {}
    for path, v in flat.items():
        d = root
        *head, last = path.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v

    def fix(d):
        if not isinstance(d, dict):
            return d
        d = {k: fix(v) for k, v in d.items()}
        if d and all(k.isdigit() for k in d) and sorted(int(k) for k in d) == list(range(len(d))):
            return [d[str(i)] for i in range(len(d))]
        return d

    return fix(root)
