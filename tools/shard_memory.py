#!/usr/bin/env python
"""Memory per device of a sharded Nemotron-H, from the sharding rules alone (nothing is allocated).

For each mesh shape (data x expert x tensor) prints the parameter bytes one device holds for BF16, NVFP4 (the
published selective recipe) and HLWQ Q5 weights, and the generation cache (KV + conv + SSM state) for a batch
and context. Default: the real Nemotron-3-Nano / Cascade-2 30B-A3B config (tests/fixtures).

    python tools/shard_memory.py [--config config.json] [--batch 8] [--context 8192] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

MESHES = [(1, 1, 1), (1, 2, 1), (1, 4, 1), (1, 2, 2), (8, 1, 1), (1, 8, 1), (1, 1, 8), (1, 4, 2), (1, 2, 4),
          (2, 4, 1), (2, 2, 2), (1, 16, 1), (2, 8, 1), (1, 8, 2)]


def abstract_quantized(cfg, recipe: str):
    """The abstract params with the recipe's linears as quantized nodes of ``ShapeDtypeStruct`` leaves."""
    import jax
    import jax.numpy as jnp

    from nemojax import quant
    from nemojax.formats.hlwq import BLOCK, HLWQWeight, padded_in
    from nemojax.formats.nvfp4 import NVFP4Weight
    from nemojax.params import abstract_params, key_str

    r = quant.resolve_recipe(recipe)
    targets = quant.quantized_modules(cfg, r)
    sds = jax.ShapeDtypeStruct

    def node(kpath, a):
        if ".".join(key_str(k) for k in kpath) not in targets:
            return a
        *lead, n, k = a.shape
        lead = tuple(lead)
        if r.format == "nvfp4":
            return NVFP4Weight(sds((*lead, n, k // 2), jnp.uint8), sds((*lead, n, k // 16), jnp.float8_e4m3fn),
                               sds(lead, jnp.float32), None, r.mode)
        kp = padded_in(k)
        return HLWQWeight(sds((*lead, n, kp * r.bits // 8), jnp.uint8), sds((*lead, n, kp // BLOCK), jnp.float16),
                          sds((*lead, 1 << r.bits), jnp.float32), r.bits, k, r.path)

    return jax.tree_util.tree_map_with_path(node, abstract_params(cfg, "bfloat16"))


def table(cfg, batch: int, context: int) -> list[dict]:
    import jax

    from nemojax import sharding as S

    trees = {"bf16": __import__("nemojax.params", fromlist=["x"]).abstract_params(cfg, "bfloat16"),
             "nvfp4": abstract_quantized(cfg, "nvfp4"), "hlwq-q5": abstract_quantized(cfg, "hlwq-q5")}
    rows = []
    for d, e, t in MESHES:
        shape = {"data": d, "expert": e, "tensor": t}
        row = {"mesh": f"{d}x{e}x{t}", "devices": d * e * t}
        for name, tree in trees.items():
            row[name] = S.parameter_bytes_per_device(tree, cfg, shape)
        row["cache"] = S.cache_bytes_per_device(cfg, batch, context, shape)
        rows.append(row)
    del jax
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(_REPO, "tests", "fixtures",
                                                     "nemotron3_nano_30b_a3b_config.json"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192, help="cache length (prompt + new tokens)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from nemojax.config import Config

    cfg = Config.from_json(a.config)
    rows = table(cfg, a.batch, a.context)
    if a.json:
        print(json.dumps({"config": a.config, "batch": a.batch, "context": a.context, "rows": rows}))
        return 0
    g = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    print(f"GB per device; cache = batch {a.batch} x {a.context} positions (bf16 KV and conv, fp32 SSM state)")
    print("| mesh (data x expert x tensor) | devices | BF16 params | NVFP4 params | HLWQ Q5 params | cache | "
          "BF16 + cache |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mesh']} | {r['devices']} | {g(r['bf16'])} | {g(r['nvfp4'])} | {g(r['hlwq-q5'])} | "
              f"{g(r['cache'])} | {g(r['bf16'] + r['cache'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
