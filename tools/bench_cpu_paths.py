#!/usr/bin/env python
"""The XLA:CPU cliffs behind nemojax's CPU decode, each measured side by side with the formulation nemojax uses,
in one run on one pinned core (``--cores``; one XLA thread).

Rows (medium-config shapes: hidden 1024, experts 16 x 704, vocab 32000; bf16 unless said):

* ``row product``: ``x [1, K] @ W^T`` as one row (XLA converts all of W to fp32, then an fp32 GEMV) vs the same
  row computed as two (``nemojax.formats.base.dot_rows``: XLA's packed bf16 GEMM), and fp32 for reference;
* ``expert slice``: 6 experts' up/down products inside a ``fori_loop``, slicing the bf16 bank directly (XLA
  converts the whole bank to fp32 and back around a 16-bit dynamic-slice) vs through its raw bits
  (``nemojax.ops.dynamic_index``) vs raw bits behind an optimization barrier (what ``grouped_experts`` does);
* ``grouped experts``: ``nemojax.blocks.moe.grouped_experts`` at 1 and 8 tokens (top-6 of 16);
* ``embedding row``: a 16-step loop gathering one row of a bf16 [32000, 1024] table per step, directly (XLA hoists
  an fp32 copy of the whole table out of the loop) vs through its raw bits (still a hoisted copy) vs raw bits
  behind a barrier tied to the token ids (``nemojax.ops.take_rows``, what ``nemojax.model.embed`` does);
* ``NVFP4 product``: one NVFP4 [4096, 1024] weight's W4A16 product (dequantize, then the row product; the "xla"
  reference) vs the packed bytes decoded 64 rows at a time (``nvfp4.rows_product``, the "cpu" backend) vs bf16;
* ``4-bit row product`` at the real model's widths: NVFP4, HLWQ Q5 and FP8 on the "xla" reference (dequantize,
  then the two-row product) and on the "cpu" backend (the packed bytes decoded per 64-row tile; HLWQ's input
  rotated once), beside bf16;
* ``fp32 product`` of 1-16 rows: XLA's dot (its GEMM library from two rows on) vs a broadcast multiply and a sum
  over K (one fused pass over the weight) vs ``w @ x^T`` with the small result transposed (``nemojax.ops.linear``).

GB/s counts the weight bytes a product must read once. Progress to stderr, a markdown table to stdout
(``--json``: one JSON object)::

    python tools/bench_cpu_paths.py [--cores 0] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def timed(f, *args, repeats: int = 7) -> float:
    """Best-of-``repeats`` seconds of a jitted call (after one warm-up call)."""
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def chain(fn):
    """jit of ``(x, copies) -> x`` applying ``fn(x, *w)`` once per distinct weight copy ``w`` in ``copies`` (unrolled,
    every output element used): nothing can be hoisted or stay cache-resident between products."""
    import jax
    import jax.numpy as jnp

    def run(x, copies):
        for w in copies:
            x = x + (fn(x, *w).astype(jnp.float32).sum() * 1e-6).astype(x.dtype)
        return x
    return jax.jit(run)


def measure() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax import ops
    from nemojax.blocks.moe import grouped_experts
    from nemojax.formats.base import dot_rows
    from nemojax.formats.fp8 import FP8Weight
    from nemojax.formats.fp8 import dequantize as fp8_dequantize
    from nemojax.formats.fp8 import rows_product as fp8_rows
    from nemojax.formats.hlwq import HLWQWeight, unpack_lsb
    from nemojax.formats.hlwq import dequantize as hlwq_dequantize
    from nemojax.formats.hlwq.hadamard import rotate
    from nemojax.formats.hlwq.rows import rows_product as hlwq_rows
    from nemojax.formats.nvfp4 import NVFP4Weight, dequantize, rows_product

    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    rnd = lambda *s, dt=bf: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05).astype(dt)  # noqa: E731
    rows, N = [], 12  # distinct weight copies per measurement
    copies = lambda make: [make() for _ in range(N)]  # noqa: E731

    def add(group, name, seconds, nbytes, per=N):  # seconds for ``per`` products
        s = seconds / per
        rows.append({"group": group, "variant": name, "ms": s * 1e3, "gbs": nbytes / s / 1e9 if nbytes else None})
        print(f"[cpu paths] {group}: {name}: {s * 1e3:.3f} ms", file=sys.stderr, flush=True)

    # one row against a matrix
    K, Nout = 1024, 4096
    ws, x = copies(lambda: (rnd(Nout, K),)), rnd(1, K)
    w32 = [(w.astype(jnp.float32),) for (w,) in ws]
    one = lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
    nb = ws[0][0].nbytes
    add("row product [1,1024]x[4096,1024]", "bf16, one row (XLA)", timed(chain(one), x, ws), nb)
    add("row product [1,1024]x[4096,1024]", "bf16, as two rows (dot_rows)", timed(chain(dot_rows), x, ws), nb)
    add("row product [1,1024]x[4096,1024]", "fp32 (XLA)", timed(chain(one), x.astype(jnp.float32), w32), 2 * nb)

    # fp32 products of a few rows (the decode of a few sequences, an expert's few rows)
    mul_sum = lambda x, w: (x[:, None, :] * w[None]).sum(-1)  # noqa: E731
    for M in (1, 2, 4, 8, 16):
        xm = rnd(M, K, dt=jnp.float32)
        g = f"fp32 product [{M},1024]x[4096,1024]"
        add(g, "XLA dot", timed(chain(one), xm, w32), 2 * nb)
        if M > 1:
            add(g, "broadcast multiply + sum", timed(chain(mul_sum), xm, w32), 2 * nb)
            add(g, "weight-major, result transposed (linear)", timed(chain(ops.linear), xm, w32), 2 * nb)

    # six experts inside a loop
    E, F, H = 16, 704, 1024
    banks = copies(lambda: (rnd(E, F, H), rnd(E, H, F)))
    ex_bytes = 6 * 2 * F * H * 2

    def experts(take, barrier):
        def f(x, up, down):
            def body(j, acc):
                u, d, e = (jax.lax.optimization_barrier((up, down, j % E)) if barrier else (up, down, j % E))
                h = ops.relu2(dot_rows(x, take(u, e)).astype(x.dtype))
                return acc + dot_rows(h, take(d, e))
            return jax.lax.fori_loop(0, 6, body, jnp.zeros((1, H), jnp.float32))
        return f
    direct = lambda a, e: jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False)  # noqa: E731
    for name, take, bar in (("bf16 slice (XLA)", direct, False), ("raw-bits slice", ops.dynamic_index, False),
                            ("raw bits + barrier (grouped_experts)", ops.dynamic_index, True)):
        add("6 experts in a loop", name, timed(chain(experts(take, bar)), x, banks), ex_bytes)
    for T in (1, 8):
        xs = rnd(T, H)
        idx = jnp.asarray(np.stack([rng.choice(E, 6, replace=False) for _ in range(T)]), jnp.int32)
        wts = jnp.full((T, 6), 1 / 6, jnp.float32)
        used = len(np.unique(np.asarray(idx)))
        add("grouped_experts (top-6 of 16)", f"{T} token(s), {used} experts",
            timed(chain(lambda x, u, d: grouped_experts(x, wts, idx, u, d)), xs, banks), used * 2 * F * H * 2)

    # embedding row
    # one embedding row per step of a 16-step decode loop (the table is loop-invariant: XLA hoists its conversion)
    table = rnd(32000, H)

    def gather(take):
        def f(x, t):
            body = lambda i, acc: acc + take(t, i * 7 + 3).astype(jnp.float32)  # noqa: E731
            return jax.lax.fori_loop(0, 16, body, jnp.zeros((H,), jnp.float32))[None]
        return jax.jit(f)
    add("embedding row, 16-step loop [32000,1024]", "bf16 take (XLA)", timed(gather(lambda t, i: jnp.take(t, i, 0)), x,
                                                                             table), None, per=1)
    add("embedding row, 16-step loop [32000,1024]", "raw-bits take",
        timed(gather(lambda t, i: ops.from_bits(jnp.take(ops.as_bits(t), i, 0), t.dtype)), x, table), None, per=1)
    add("embedding row, 16-step loop [32000,1024]", "raw bits + barrier (nemojax.ops.take_rows)",
        timed(gather(lambda t, i: ops.take_rows(t, i)), x, table), None, per=1)

    # NVFP4 against bf16
    qs = [(q.packed, q.scale, q.scale_2) for q in (NVFP4Weight.from_float(w.astype(jnp.float32)) for (w,) in ws)]
    add("W4A16 product [1,1024]x[4096,1024]", "NVFP4 (dequantize + two-row product)",
        timed(chain(lambda x, p, s, s2: dot_rows(x, dequantize(p, s, s2, x.dtype))), x, qs),
        qs[0][0].nbytes + qs[0][1].nbytes)
    add("W4A16 product [1,1024]x[4096,1024]", "NVFP4, packed bytes decoded per 64-row tile (rows_product, cpu backend)",
        timed(chain(lambda x, p, s, s2: rows_product(x, p, s, s2)), x, qs), qs[0][0].nbytes + qs[0][1].nbytes)
    add("W4A16 product [1,1024]x[4096,1024]", "bf16 (two-row product)", timed(chain(dot_rows), x, ws), nb)

    # 4-bit products at the real model's widths (fewer copies: they are large)
    for Nw, Kw in ((1856, 2688), (2688, 1856), (10304, 2688)):
        g = f"4-bit row product [1,{Kw}]x[{Nw},{Kw}]"
        wr = [rnd(Nw, Kw) for _ in range(3)]
        xr = rnd(1, Kw)
        nq = [NVFP4Weight.from_float(w.astype(jnp.float32)) for w in wr]
        hq = [HLWQWeight.from_float(w.astype(jnp.float32), 5) for w in wr]
        nv = [(q.packed, q.scale, q.scale_2) for q in nq]
        hl = [(q.packed, q.norms, q.table) for q in hq]
        nvb, hlb = nv[0][0].nbytes + nv[0][1].nbytes, hl[0][0].nbytes + hl[0][1].nbytes
        kp = hq[0].k_pad
        hl_ref = lambda x, p, n, t: dot_rows(x, hlwq_dequantize(unpack_lsb(p, 5), n, t, Kw, x.dtype))  # noqa: E731
        hl_cpu = lambda x, p, n, t: hlwq_rows(rotate(x.astype(jnp.float32), kp), p, n, t, 5)  # noqa: E731
        add(g, "bf16 (two-row product)", timed(chain(dot_rows), xr, [(w,) for w in wr]), wr[0].nbytes, per=3)
        add(g, "NVFP4, xla (dequantize + two-row product)",
            timed(chain(lambda x, p, s, s2: dot_rows(x, dequantize(p, s, s2, x.dtype))), xr, nv), nvb, per=3)
        add(g, "NVFP4, cpu (rows_product)", timed(chain(rows_product), xr, nv), nvb, per=3)
        add(g, "HLWQ Q5, xla (dequantize + two-row product)", timed(chain(hl_ref), xr, hl), hlb, per=3)
        add(g, "HLWQ Q5, cpu (rotate x, hlwq.rows.rows_product)", timed(chain(hl_cpu), xr, hl), hlb, per=3)
        f8 = [(q.weight, q.weight_scale) for q in (FP8Weight.from_float(w) for w in wr)]
        add(g, "FP8, xla (dequantize + two-row product)",
            timed(chain(lambda x, c, s: dot_rows(x, fp8_dequantize(c, s, x.dtype))), xr, f8), f8[0][0].nbytes, per=3)
        add(g, "FP8, cpu (fp8.rows_product)", timed(chain(fp8_rows), xr, f8), f8[0][0].nbytes, per=3)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", default="0", help="comma-separated CPU cores to pin to (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    try:
        cores = [int(c) for c in args.cores.split(",")]
        os.sched_setaffinity(0, cores)
    except (ValueError, OSError) as e:
        ap.error(f"--cores {args.cores!r}: {e}")
    os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                               + os.environ.get("XLA_FLAGS", "")).strip()
    import jax

    rows = measure()
    if args.json:
        print(json.dumps({"cores": cores, "jax": jax.__version__, "rows": rows}, indent=1))
        return 0
    print(f"XLA:CPU paths, jax {jax.__version__}, core(s) {cores}, one thread\n")
    print("| what | variant | ms | GB/s of weights |")
    print("|---|---|---|---|")
    for r in rows:
        gbs = f"{r['gbs']:.1f}" if r["gbs"] else ""
        print(f"| {r['group']} | {r['variant']} | {r['ms']:.3f} | {gbs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
