"""What a checkpoint folder holds, from its headers alone: format, tensor counts, bytes by component and dtype,
the quantization configs and a config summary (``nemojax inspect``)."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from ..config import Config
from ..formats import FORMATS
from ..params import count_params
from .orbax import OrbaxError, is_orbax_checkpoint, read_meta
from .plan import stored_format
from .source import Checkpoint, CheckpointError

__all__ = ["inspect_checkpoint", "inspect_orbax", "component"]

_LAYER = re.compile(r"^(?:backbone|model)\.layers\.(\d+)\.(.*)$")


def component(name: str, pattern: str | None) -> str:
    """The part of the model a checkpoint tensor belongs to ("mamba", "routed experts", "lm_head", ...);
    ``pattern``: the config's layer pattern (None: guessed from the name)."""
    if name.startswith(("mtp.", "backbone.mtp.", "model.mtp.")):
        return "mtp"
    if "embeddings" in name or "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    m = _LAYER.match(name)
    if not m:
        return "norms/other"
    i, rest = int(m.group(1)), m.group(2)
    if not rest.startswith("mixer."):
        return "norms/other"
    rest = rest[len("mixer."):]
    if rest.startswith("experts."):
        return "routed experts"
    if rest.startswith("shared_experts."):
        return "shared experts"
    if rest.startswith("gate."):
        return "router"
    kind = pattern[i] if pattern and i < len(pattern) else None
    if kind is None:  # no config: guess from the name
        if rest.startswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            kind = "*"
        elif rest.startswith(("in_proj", "conv1d", "A_log", "D", "dt_bias", "norm", "out_proj")):
            kind = "M"
        elif rest.startswith(("up_proj", "down_proj")):
            kind = "-"
    return {"M": "mamba", "*": "attention", "-": "mlp"}.get(kind, "norms/other")


def _config_summary(cfg: Config) -> dict:
    return {"pattern": cfg.pattern, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "parameters": count_params(cfg)}


def _tally(rows) -> tuple[dict, dict, int]:
    """``(bytes by component, bytes by dtype, total)`` of ``(component, dtype name, bytes)`` rows."""
    comps: dict[str, dict] = {}
    dtypes: dict[str, dict] = {}
    total = 0
    for comp, dt, nb in rows:
        total += nb
        for key, d in ((comp, comps), (dt, dtypes)):
            c = d.setdefault(key, {"tensors": 0, "bytes": 0})
            c["tensors"] += 1
            c["bytes"] += nb
    return comps, dtypes, total


def inspect_checkpoint(d: str) -> dict:
    """Format, tensor counts, bytes by component and dtype, config summary (headers only, nothing loaded)."""
    if is_orbax_checkpoint(d):
        return inspect_orbax(d)
    ck = Checkpoint(d)
    names = ck.names
    modules = {name: 0 for name in FORMATS}  # quantized modules by format
    for mod in {n.rsplit(".", 1)[0] for n in names}:
        fmt = stored_format(ck, mod)
        if fmt is not None:
            modules[fmt.name] += 1
    layouts = set()  # polarengine layouts
    for n in names:
        if n.endswith(".codes"):
            layouts.add("A" if ck.dtype(n) == "int8" else "B")
        elif n.endswith(".weight__packed"):
            layouts.add("C")
    cfg = None
    try:
        cfg = Config.from_json(d)
    except Exception:  # noqa: BLE001  (inspect still reports the tensors)
        pass
    pattern = cfg.pattern if cfg is not None else None
    float_dts = sorted({ck.dtype(n).name for n in names if ck.dtype(n).kind == "f" or ck.dtype(n).name ==
                        "bfloat16"} - {"float8_e4m3fn"})
    present = [name for name, n in modules.items() if n]
    if present:
        fmt = present[0] if len(present) == 1 else "mixed"
    else:
        main = max(float_dts, key=lambda t: sum(1 for n in names if ck.dtype(n).name == t)) if float_dts else "?"
        fmt = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(main, main)
    comps, dtypes, total = _tally((component(n, pattern), ck.dtype(n).name, math.prod(ck.shape(n)) *
                                   ck.dtype(n).itemsize) for n in names)
    out = {"path": os.path.abspath(d), "format": fmt, "hlwq_layout": "/".join(sorted(layouts)) or None,
           "tensors": len(names), "files": len({ck.file_of(n) for n in names}), "bytes": total,
           **{f"{name}_modules": n for name, n in modules.items()}, "components": comps, "dtypes": dtypes}
    qfile = os.path.join(d, "hf_quant_config.json")
    if os.path.exists(qfile):
        with open(qfile) as f:
            q = json.load(f).get("quantization", {})
        out["quantization"] = {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo"),
                               "exclude_modules": len(q.get("exclude_modules") or [])}
    pfile = os.path.join(d, "polar_config.json")
    if os.path.exists(pfile):
        with open(pfile) as f:
            p = json.load(f)
        out["polar"] = {"bits": p.get("bits"), "layers": len(p.get("layers") or {}), "producer": p.get("producer")}
    if cfg is not None:
        out["config"] = _config_summary(cfg)
    return out


def inspect_orbax(d: str) -> dict:
    """``inspect_checkpoint`` for a nemojax orbax folder (reads nemojax_orbax.json only)."""
    try:
        meta = read_meta(d)
    except OrbaxError as e:
        raise CheckpointError(str(e)) from None
    cfg = Config.from_json(d)
    kinds = {n["type"] for n in meta["nodes"].values()}
    fmt = "orbax " + ("+".join(sorted(kinds)) if kinds else "float")

    def row(path, shape, dt):
        m = re.match(r"^layers\.(\d+)\.(.*)$", path)
        name = f"backbone.layers.{m.group(1)}.{m.group(2)}" if m else path
        return component(name, cfg.pattern), dt, math.prod(shape) * np.dtype(dt).itemsize

    comps, dtypes, total = _tally(row(path, shape, dt) for path, (shape, dt) in meta["leaves"].items())
    return {"path": os.path.abspath(d), "format": fmt, "hlwq_layout": None, "tensors": len(meta["leaves"]),
            "files": 1, "bytes": total,
            **{f"{name}_modules": sum(n["type"] == name for n in meta["nodes"].values()) for name in FORMATS},
            "components": comps, "dtypes": dtypes, "config": _config_summary(cfg)}
