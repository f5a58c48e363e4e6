"""``nemojax inspect``: prints what a checkpoint folder holds (``nemojax.checkpoint.inspect``)."""
from __future__ import annotations

import json
import os

from ..checkpoint import inspect_checkpoint
from ..checkpoint.modelopt import quant_algos
from .errors import UsageError

__all__ = ["add_parser", "cmd_inspect"]


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint folder (format, tensors, bytes by component)",
                       description="Describe a Nemotron-H checkpoint: format, tensor counts, bytes by component "
                                   "and dtype, config summary. Reads headers only.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def _fmt_bytes(b: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= s:
            return f"{b / s:.2f} {unit}"
    return f"{b} B"


def cmd_inspect(a) -> int:
    if not os.path.isdir(a.dir):
        raise UsageError(f"{a.dir}: not a folder")
    r = inspect_checkpoint(a.dir)
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
