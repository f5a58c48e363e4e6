"""``nemojax convert`` / ``inspect`` / ``verify`` subcommands. ``add_subcommands(subparsers)`` registers them on
the main CLI's subparsers; every command function returns an exit code and raises ``nemojax.cli.UsageError``
for user errors (printed as ``nemojax CMD: error: ...``, exit code 2)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

__all__ = ["add_subcommands", "cmd_convert", "cmd_inspect", "cmd_verify", "inspect_checkpoint", "verify_checkpoint",
           "main"]

_CONVERT_EPILOG = """\
supported conversions:
  bf16  -> RECIPE             quantized with a recipe (below), in its format's checkpoint layout (ModelOpt formats:
                              hf_quant_config.json + config.json quantization_config). WEIGHT-ONLY: there is no
                              calibration, so no input_scale (no activation modes such as W4A4) and no FP8 KV-cache
                              scales are written. --exclude GLOB keeps more modules in high precision.
{recipes}
  nvfp4 -> bf16, hlwq -> bf16 dequantized plain BF16 checkpoint (like polarquant-convert; --base for HLWQ files
                              that lack e_score_correction_bias); any quantized format likewise
  any   -> orbax              the parameter pytree as an orbax checkpoint (params/ + nemojax_orbax.json + config and
                              tokenizer files), quantized nodes kept as they are; --quant RECIPE quantizes a bf16
                              source on the way. nemojax.load and `nemojax generate --model OUT` read it.
Conversion streams one parameter at a time (peak memory ~ one parameter + small buffers); output is written to
a temporary folder beside OUT and renamed when complete, so an error (or a full disk) leaves nothing behind."""


def _epilog() -> str:
    """The epilog with each recipe and its ``about`` (``QuantFormat.recipes``)."""
    import textwrap

    from .quant import RECIPES

    return _CONVERT_EPILOG.format(recipes="\n".join(
        textwrap.fill(r.about, 116, initial_indent=f"    {name:26s}", subsequent_indent=" " * 30)
        for name, r in RECIPES.items()))


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    unit = m.group(2).rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}[unit]
    v = int(float(m.group(1)) * mult)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return v


def add_subcommands(sub) -> None:
    from .convert import TARGETS

    p = sub.add_parser("convert", help="convert a checkpoint (bf16 <-> a quantized format), streaming",
                       description="Convert a Nemotron-H checkpoint folder, one parameter at a time.",
                       epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="input checkpoint folder")
    p.add_argument("dst", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format (see below)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=_size, default="5GB", dest="max_shard_bytes",
                   help="maximum safetensors shard size (default 5GB; e.g. 500MB, 2GiB)")
    p.add_argument("--base", default=None, help="BF16 checkpoint supplying buffers HLWQ checkpoints lack")
    p.add_argument("--quant", default=None, metavar="RECIPE",
                   help="with --to orbax: quantize a bf16 source with this recipe (nvfp4, hlwq-q5, ...)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="also keep the modules matching GLOB (checkpoint names, e.g. 'backbone.layers.3.*') in high "
                        "precision; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="describe a checkpoint folder (format, tensors, bytes by component)",
                       description="Describe a Nemotron-H checkpoint: format, tensor counts, bytes by component "
                                   "and dtype, config summary. Reads headers only.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="load a checkpoint and run one forward pass",
                       description="Load a checkpoint with nemojax.load (checks every tensor's shape and dtype), "
                                   "run one forward pass on a few tokens and check the logits are finite. "
                                   "Exit code 0 OK, 1 failed check, 2 unusable input.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--base", default=None, help="BF16 checkpoint supplying buffers HLWQ checkpoints lack")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_verify)


def _usage(msg: str):
    from .cli import UsageError

    return UsageError(msg)


def _need_folder(d: str, what: str = "") -> None:
    if not os.path.isdir(d):
        raise _usage(f"{what}{d}: not a folder")
    if not os.path.exists(os.path.join(d, "config.json")):
        raise _usage(f"{what}{d}: no config.json (not a Hugging Face model folder)")


# ------------------------------------------------------------------------------------------------ convert
def cmd_convert(a) -> int:
    from .config import ConfigError
    from .convert import ConvertError, convert_checkpoint
    from .formats import QuantError
    from .quant.modelopt import QuantConfigError
    from .weights import CheckpointError

    _need_folder(a.src)
    if a.base is not None:
        _need_folder(a.base, "--base ")
    try:
        res = convert_checkpoint(a.src, a.dst, a.to, force=a.force, max_shard_bytes=a.max_shard_bytes, base=a.base,
                                 progress=not a.no_progress, quant=a.quant, exclude=tuple(a.exclude))
    except FileExistsError as e:
        raise _usage(f"{os.path.abspath(a.dst)}: already exists (use --force to overwrite)") from e
    except (ConvertError, ConfigError, CheckpointError, QuantConfigError, QuantError) as e:
        raise _usage(str(e)) from None
    if a.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['output']} ({res['from']} -> {res['to']}: {res['parameters']} parameters, "
              f"{res['tensor_bytes'] / 1e9:.3f} GB in {res['shards']} shard(s))")
    return 0


# ------------------------------------------------------------------------------------------------ inspect
_LAYER = re.compile(r"^(?:backbone|model)\.layers\.(\d+)\.(.*)$")


def _component(name: str, pattern: str | None) -> str:
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


def inspect_checkpoint(d: str) -> dict:
    """Format, tensor counts, bytes by component and dtype, config summary (headers only, nothing loaded)."""
    import math

    from .config import Config
    from .formats import FORMATS
    from .orbax_io import is_orbax_checkpoint
    from .weights import Checkpoint, stored_format

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
    comps: dict[str, dict] = {}
    dtypes: dict[str, dict] = {}
    total = 0
    for n in names:
        dt = ck.dtype(n)
        nb = math.prod(ck.shape(n)) * dt.itemsize
        total += nb
        c = comps.setdefault(_component(n, pattern), {"tensors": 0, "bytes": 0})
        c["tensors"] += 1
        c["bytes"] += nb
        t = dtypes.setdefault(dt.name, {"tensors": 0, "bytes": 0})
        t["tensors"] += 1
        t["bytes"] += nb
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
        import jax

        from .params import is_spec, param_specs

        n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))
        out["config"] = {"pattern": cfg.pattern, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                         "vocab_size": cfg.vocab_size, "n_routed_experts": cfg.n_routed_experts,
                         "num_experts_per_tok": cfg.num_experts_per_tok, "parameters": n_params}
    return out


def _config_summary(cfg) -> dict:
    from .params import count_params

    return {"pattern": cfg.pattern, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "parameters": count_params(cfg)}


def inspect_orbax(d: str) -> dict:
    """``inspect_checkpoint`` for a nemojax orbax folder (reads nemojax_orbax.json only)."""
    import math

    import numpy as np

    from .config import Config
    from .orbax_io import OrbaxError, read_meta
    from .weights import CheckpointError

    try:
        meta = read_meta(d)
    except OrbaxError as e:
        raise CheckpointError(str(e)) from None
    from .formats import FORMATS

    cfg = Config.from_json(d)
    kinds = {n["type"] for n in meta["nodes"].values()}
    fmt = "orbax " + ("+".join(sorted(kinds)) if kinds else "float")
    comps: dict[str, dict] = {}
    dtypes: dict[str, dict] = {}
    total = 0
    for path, (shape, dt) in meta["leaves"].items():
        nb = math.prod(shape) * np.dtype(dt).itemsize
        total += nb
        m = re.match(r"^layers\.(\d+)\.(.*)$", path)
        name = f"backbone.layers.{m.group(1)}.{m.group(2)}" if m else path
        for key, d_ in ((_component(name, cfg.pattern), comps), (dt, dtypes)):
            c = d_.setdefault(key, {"tensors": 0, "bytes": 0})
            c["tensors"] += 1
            c["bytes"] += nb
    return {"path": os.path.abspath(d), "format": fmt, "hlwq_layout": None, "tensors": len(meta["leaves"]),
            "files": 1, "bytes": total,
            **{f"{name}_modules": sum(n["type"] == name for n in meta["nodes"].values()) for name in FORMATS},
            "components": comps, "dtypes": dtypes, "config": _config_summary(cfg)}


def _fmt_bytes(b: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= s:
            return f"{b / s:.2f} {unit}"
    return f"{b} B"


def cmd_inspect(a) -> int:
    from .weights import CheckpointError

    if not os.path.isdir(a.dir):
        raise _usage(f"{a.dir}: not a folder")
    try:
        r = inspect_checkpoint(a.dir)
    except CheckpointError as e:
        raise _usage(str(e)) from None
    if a.json:
        print(json.dumps(r))
        return 0
    fmt = r["format"] + (f" (layout {r['hlwq_layout']})" if r["hlwq_layout"] else "")
    print(f"{r['path']}: {fmt}, {r['tensors']} tensors in {r['files']} file(s), {_fmt_bytes(r['bytes'])}")
    if "config" in r:
        c = r["config"]
        print(f"  config: pattern {c['pattern']!r} ({c['layers']} layers), hidden {c['hidden_size']}, vocab "
              f"{c['vocab_size']}, {c['n_routed_experts']} experts (top-{c['num_experts_per_tok']}), "
              f"{c['parameters']:,} parameters")
    if "quantization" in r:
        from .quant.modelopt import quant_algos

        q = r["quantization"]
        fmt = quant_algos().get(q["quant_algo"])
        n = f"{r[f'{fmt.name}_modules']} {fmt.name.upper()} modules, " if fmt is not None else ""
        print(f"  quantization: {q['quant_algo']}, KV {q['kv_cache_quant_algo']}, {n}{q['exclude_modules']} excluded")
    if "polar" in r:
        print(f"  polar: bits {r['polar']['bits']}, {r['hlwq_modules']} HLWQ modules")
    print("  by component:")
    for k, v in sorted(r["components"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"    {k:16s} {v['tensors']:7d} tensors  {_fmt_bytes(v['bytes']):>10s}")
    print("  by dtype:")
    for k, v in sorted(r["dtypes"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"    {k:16s} {v['tensors']:7d} tensors  {_fmt_bytes(v['bytes']):>10s}")
    return 0


# ------------------------------------------------------------------------------------------------ verify
def verify_checkpoint(d: str, base: str | None = None, tokens: int = 8) -> dict:
    """Load + one forward pass; ``{"ok": bool, "error": str | None, ...}``. Raises on unusable input
    (ConfigError / CheckpointError / QuantError) so the caller can tell bad input from a failed check."""
    import time

    import numpy as np

    from . import api

    t0 = time.perf_counter()
    model = api.load(d, base=base, progress=False)
    load_s = time.perf_counter() - t0
    cfg = model.config
    ids = (np.arange(tokens, dtype=np.int64) * 7 + 3) % cfg.vocab_size
    t0 = time.perf_counter()
    logits = np.asarray(model.logits(ids[None, :]))
    fwd_s = time.perf_counter() - t0
    finite = bool(np.isfinite(logits).all())
    want = (1, tokens, cfg.vocab_size)
    ok = finite and tuple(logits.shape) == want
    err = None
    if not finite:
        err = f"{int((~np.isfinite(logits)).sum())} non-finite logit(s)"
    elif tuple(logits.shape) != want:
        err = f"logits have shape {list(logits.shape)}, expected {list(want)}"
    return {"path": os.path.abspath(d), "ok": ok, "error": err, "tokens": tokens,
            "logits_shape": list(logits.shape), "finite": finite, "load_s": round(load_s, 3),
            "forward_s": round(fwd_s, 3)}


def cmd_verify(a) -> int:
    from .config import ConfigError
    from .formats import QuantError
    from .quant.modelopt import QuantConfigError
    from .weights import CheckpointError

    _need_folder(a.dir)
    if a.base is not None:
        _need_folder(a.base, "--base ")
    try:
        r = verify_checkpoint(a.dir, a.base)
    except (ConfigError, CheckpointError, QuantConfigError, QuantError) as e:
        if a.json:
            print(json.dumps({"path": os.path.abspath(a.dir), "ok": False, "error": str(e)}))
        raise _usage(str(e)) from None
    except Exception as e:  # noqa: BLE001  (a failed forward is a failed check, exit 1)
        r = {"path": os.path.abspath(a.dir), "ok": False, "error": f"{type(e).__name__}: {e}"}
    if a.json:
        print(json.dumps(r))
    elif r["ok"]:
        print(f"OK {r['path']}: loaded in {r['load_s']:.1f} s, forward on {r['tokens']} tokens -> finite logits "
              f"{r['logits_shape']}")
    else:
        print(f"FAILED {r['path']}: {r['error']}", file=sys.stderr)
    return 0 if r["ok"] else 1


# ------------------------------------------------------------------------------------------------ standalone
def main(argv=None, prog: str = "nemojax") -> int:
    """Run the three subcommands without the main CLI (tools/convert.py uses this)."""
    from .cli import UsageError

    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_subcommands(sub)
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except UsageError as e:
        print(f"nemojax {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
