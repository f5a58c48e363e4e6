"""Where one compiled serving step spends its time on CPU: per-thunk times from a profiler trace, grouped by HLO
op kind, with the matrix products' GFLOP/s (the FLOPs of each YNNPACK fusion's dots from the compiled HLO).

    PYTHONPATH=$PWD python tools/profile_step.py --config medium --what prefill --chunk 256
    PYTHONPATH=$PWD python tools/profile_step.py --config medium --what decode --rows 16

``prefill``: one prompt chunk of ``--chunk`` tokens in one cache row (``nemojax.serve.steps.forward_row``);
``decode``: one decode step over ``--rows`` rows (``decode_rows``). Random weights; ``--dtype`` of the weights.
The trace needs ``--xla_cpu_enable_xprof_traceme=true`` in XLA_FLAGS (set here unless XLA_FLAGS is given).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_xprof_traceme=true")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


CONTAINERS = ("while", "call", "conditional")


def instructions(hlo: str) -> tuple[dict, dict]:
    """-> ({instruction name: (opcode[:fusion kind], the line)}, {computation name: [its lines]})."""
    ins, comps, cur = {}, {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
            continue
        if cur is not None:
            comps[cur].append(line)
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
        if m:
            kind = re.search(r"kind=(k\w+)", line)
            ins[m.group(1)] = (m.group(2) + (":" + kind.group(1) if kind else ""), line)
    return ins, comps


def dims(text: str) -> list[int]:
    m = re.match(r"\s*\w+\[([\d,]*)\]", text)
    return [int(v) for v in m.group(1).split(",") if v] if m else []


def fusion_flops(line: str, comps: dict) -> int:
    """FLOPs of the dots inside the fusion ``line`` calls (2 * output elements * contracted size)."""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = comps.get(called.group(1), []) if called else []
    defs = {}
    for b in body:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", b)
        if m:
            defs[m.group(1)] = m.group(2)
    total = 0
    for b in body:
        if " dot(" not in b:
            continue
        out = dims(b.split("=", 1)[1])
        lhs_name = re.findall(r"%([\w.\-]+)", b.split("dot(", 1)[1])[0]
        lhs = dims(defs.get(lhs_name, ""))
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", b).group(1)
        k = 1
        for c in contracted.split(","):
            k *= lhs[int(c)] if lhs else 0
        n = 1
        for o in out:
            n *= o
        total += 2 * k * n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="medium")
    ap.add_argument("--what", default="prefill", choices=("prefill", "decode"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--calls", type=int, default=3, help="traced calls (times are per call)")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchlib import CONFIGS

    import nemojax
    from nemojax.config import Config
    from nemojax.params import init_params
    from nemojax.sampling import SamplingParams
    from nemojax.serve import Engine, steps

    cfg = Config.from_dict(CONFIGS[a.config])
    model = nemojax.Model(cfg, init_params(cfg, seed=0, dtype=a.dtype))
    eng = Engine(model, max_num_seqs=max(a.rows, 1), max_model_len=2 * a.chunk + 64, chunk=a.chunk,
                 prefix_cache_bytes=0)
    rng = np.random.default_rng(0)
    if a.what == "prefill":
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, a.chunk)).astype(np.int32))
        mask, at = jnp.ones((1, a.chunk), jnp.int32), jnp.asarray([a.chunk - 1])
        fn = steps.forward_row
        lowered = fn.lower(model.params, cfg, tokens, mask, steps.take_row(eng.cache, np.int32(0)), at)

        def call():
            jax.block_until_ready(fn(model.params, cfg, tokens, mask, steps.take_row(eng.cache, np.int32(0)), at))
    else:
        n = a.rows
        cache, logits = steps.take_head((eng.cache, eng.logits), n)
        sp = SamplingParams(jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.float32))
        rest = (jnp.ones(n, bool), jnp.zeros((n, 2), jnp.uint32), jnp.zeros(n, jnp.int32), sp)
        fn = steps.decode_rows
        lowered = fn.lower(model.params, cfg, cache, logits, *rest)
        state = [cache, logits]

        def call():
            _, state[0], state[1] = fn(model.params, cfg, *state, *rest)
            jax.block_until_ready(state)
    ins, comps = instructions(lowered.compile().as_text())
    for _ in range(2):
        call()  # compile, first-use
    t0 = time.perf_counter()
    for _ in range(a.calls):
        call()
    untraced = (time.perf_counter() - t0) / a.calls
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.calls):
                call()
        wall = (time.perf_counter() - t0) / a.calls
        trace = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not trace:
            sys.exit("profile_step: no trace written (is --xla_cpu_enable_xprof_traceme=true in XLA_FLAGS?)")
        with gzip.open(trace[0]) as f:
            ev = json.load(f)
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    per_name, calls = collections.Counter(), collections.Counter()
    for e in ev:
        if e.get("ph") == "X" and e.get("name") in ins:
            per_name[e["name"]] += e["dur"] / 1e3 / a.calls
            calls[e["name"]] += 1 / a.calls
    # a while loop's or call's own time includes the thunks of its body, which are listed themselves
    per_name = collections.Counter({n: ms for n, ms in per_name.items() if ins[n][0] not in CONTAINERS})
    by_kind = collections.Counter()
    for n, ms in per_name.items():
        by_kind[ins[n][0]] += ms
    total = sum(per_name.values())
    what = f"prefill chunk of {a.chunk}" if a.what == "prefill" else f"decode step over {a.rows} row(s)"
    print(f"{a.config} {a.dtype}, {what}: {untraced * 1e3:.1f} ms per call ({wall * 1e3:.1f} traced, the "
          f"profiler's start and stop included), thunks {total:.1f} ms (loop bodies counted, the loops themselves not)")
    print("\n| op kind | ms per call | share |\n|---|---:|---:|")
    for k, ms in by_kind.most_common(8):
        print(f"| {k} | {ms:.1f} | {ms / total:.0%} |")
    gemm_ms = sum(ms for n, ms in per_name.items() if "__ynn_fusion" in ins[n][1])
    gemm_flops = sum(fusion_flops(ins[n][1], comps) * calls[n] for n in per_name if "__ynn_fusion" in ins[n][1])
    if gemm_ms:
        print(f"\nmatrix products (YNNPACK fusions): {gemm_ms:.1f} ms, {gemm_flops / 1e9:.2f} GFLOP, "
              f"{gemm_flops / gemm_ms / 1e6:.1f} GFLOP/s")
    print("\n| thunk | calls | ms per call | GFLOP/s | instruction |\n|---|---:|---:|---:|---|")
    for n, ms in per_name.most_common(a.top):
        fl = fusion_flops(ins[n][1], comps) * calls[n] if "fusion(" in ins[n][1] else 0
        rate = f"{fl / ms / 1e6:.1f}" if fl else ""
        shape = ins[n][1].split("=", 1)[1].strip().split(" ")[0]
        print(f"| {n} | {calls[n]:.0f} | {ms:.1f} | {rate} | {ins[n][0]} {shape} |")


if __name__ == "__main__":
    main()
