"""ModelOpt checkpoints: ``hf_quant_config.json`` and the ``quantization_config`` of config.json (read and
written), for the formats that name a ModelOpt ``quant_algo`` (``nemojax.formats``: ``QuantFormat.quant_algos``;
the tensor names per quantized linear live with each format)."""
from __future__ import annotations

import json
import os

from ..config import Config
from ..formats import FORMATS
from ..version import __version__

__all__ = ["read_quant_config", "hf_quant_config", "config_quantization", "quant_algos", "linear_modules",
           "QuantConfigError"]

PRODUCER = {"name": "nemojax", "version": __version__}


def quant_algos() -> dict:
    """``{ModelOpt quant_algo: format}`` of the registered formats."""
    return {algo: fmt for fmt in FORMATS.values() for algo in fmt.quant_algos}


class QuantConfigError(ValueError):
    """An unsupported or malformed quantization config; names the file and field."""


def read_quant_config(folder: str) -> dict | None:
    """``{"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules", "file"}`` or None (not
    quantized). Reads ``hf_quant_config.json`` first, else config.json's ``quantization_config``."""
    path = os.path.join(folder, "hf_quant_config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                q = json.load(f).get("quantization", {})
        except (ValueError, AttributeError) as e:
            raise QuantConfigError(f"{path}: not a valid hf_quant_config.json ({e})") from None
        src = path
    else:
        path = os.path.join(folder, "config.json")
        try:
            with open(path) as f:
                q = json.load(f).get("quantization_config")
        except (OSError, ValueError):
            return None
        if not q:
            return None
        src = path + " (quantization_config)"
        q = dict(q, exclude_modules=q.get("exclude_modules", q.get("ignore", [])),
                 kv_cache_quant_algo=q.get("kv_cache_quant_algo", "FP8" if q.get("kv_cache_scheme") else None))
    algos = quant_algos()
    algo = q.get("quant_algo")
    if algo not in algos:
        raise QuantConfigError(f"{src}: quant_algo {algo!r} is not supported (supported: {list(algos)})")
    fmt = algos[algo]
    if "group_size" not in q:
        groups = (q.get("config_groups") or {}).values()
        q["group_size"] = next((g.get("weights", {}).get("group_size") for g in groups), fmt.group_size)
    if q.get("group_size", fmt.group_size) != fmt.group_size:
        raise QuantConfigError(f"{src}: group_size {q.get('group_size')!r} is not supported "
                               f"({fmt.name.upper()} uses {fmt.group_size})")
    kv = q.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise QuantConfigError(f"{src}: kv_cache_quant_algo {kv!r} is not supported (supported: FP8, null)")
    # ModelOpt 0.47 + transformers 5 mangles a private sentinel into the names; strip it
    excl = [e.split(".\x00")[0] for e in (q.get("exclude_modules") or [])]
    return {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": fmt.group_size, "exclude_modules": excl,
            "file": src}


def hf_quant_config(qc: dict, exclude: list[str], kv_fp8: bool) -> dict:
    """``hf_quant_config.json`` from a format's ModelOpt config (``QuantFormat.quant_config``: quant_algo,
    group_size, weights, input_activations)."""
    group = {"group_size": qc["group_size"]} if qc.get("group_size") else {}
    return {"producer": PRODUCER,
            "quantization": {"quant_algo": qc["quant_algo"], "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
                             **group, "exclude_modules": exclude}}


def config_quantization(qc: dict, exclude: list[str], kv_fp8: bool) -> dict:
    """The compressed-tensors-shaped ``quantization_config`` ModelOpt writes into config.json."""
    group = {"weights": dict(qc["weights"]), "targets": ["Linear"]}
    if qc.get("input_activations"):
        group["input_activations"] = dict(qc["input_activations"])
    q = {"config_groups": {"group_0": group}, "ignore": exclude, "quant_algo": qc["quant_algo"],
         "producer": PRODUCER, "quant_method": "modelopt"}
    if kv_fp8:
        q["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return q


def linear_modules(cfg: Config) -> list[str]:
    """Every Linear-like module name of the model in checkpoint naming (experts one by one, conv1d too),
    in a stable order — the universe ``exclude_modules`` is drawn from."""
    out = ["lm_head"] if not cfg.tie_word_embeddings else []
    for i, c in enumerate(cfg.pattern):
        m = f"backbone.layers.{i}.mixer."
        if c == "M":
            out += [m + "in_proj", m + "conv1d", m + "out_proj"]
        elif c == "*":
            out += [m + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        elif c == "-":
            out += [m + "up_proj", m + "down_proj"]
        elif c == "E":
            out += [m + f"experts.{e}.{p}" for e in range(cfg.n_routed_experts) for p in ("up_proj", "down_proj")]
            if cfg.n_shared_experts:
                out += [m + "shared_experts.up_proj", m + "shared_experts.down_proj"]
    return out
