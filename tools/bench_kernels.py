#!/usr/bin/env python
"""Check and time every kernel against its reference and against a bf16 matmul on the present device.

Kernels: Pallas NVFP4 and HLWQ matmuls (decode GEMV path for M <= 8, tensor-core path above), the grouped
(ragged, per-expert) NVFP4 and HLWQ matmuls at MoE decode shape (T tokens x top-6 of the experts), the FWHT, and,
when jax-triton is installed on a GPU, the jax-triton NVFP4 / HLWQ decode GEMVs. For each: max |kernel -
reference| relative to max |reference|, time per call of the kernel, of its pure-jnp reference and of a bf16
matmul of the same shape (grouped: ``jax.lax.ragged_dot`` on a bf16 bank), and the kernel's achieved bandwidth
(bytes of codes + scales it must read, activations, output) against the device's measured copy bandwidth.

Times are per call inside one jitted loop of ``--reps`` calls (no Python dispatch in the figure). On a CPU the
Pallas kernels run in interpret mode: the check is real, the timings say nothing (shapes are cut down there).

    python tools/bench_kernels.py [--reps 50] [--ms 1,64] [--tokens 1,8] [--json]
    # on a GPU machine: pip install -e '.[gpu]' (jax[cuda] + jax-triton), then the same command
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

# the Nano-30B's matrices (N x K): expert up/down, Mamba in_proj, attention q_proj
SHAPES = [("expert up_proj", 1856, 2688), ("expert down_proj", 2688, 1856), ("mamba in_proj", 10304, 2688),
          ("q_proj", 4096, 2688)]
CPU_SHAPES = [("expert up_proj (N cut)", 64, 2688), ("mamba in_proj (K=10304 as N, K cut)", 10304, 64)]


def loop_time(f, *args, reps: int = 50) -> float:
    """Seconds per call of ``f(*args)`` measured as ``reps`` calls inside one jitted fori_loop (a loop-carried
    scalar perturbs the first argument each iteration so nothing is hoisted): no Python dispatch in the figure."""
    import jax
    import jax.numpy as jnp

    x, rest = args[0], args[1:]

    @jax.jit
    def run(x, *rest):
        def body(i, c):
            y = f((x.astype(jnp.float32) * (1.0 + c * 0.0)).astype(x.dtype), *rest)
            return c + y.reshape(-1)[0].astype(jnp.float32)
        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    jax.block_until_ready(run(x, *rest))
    t0 = time.perf_counter()
    jax.block_until_ready(run(x, *rest))
    return (time.perf_counter() - t0) / reps


def once_time(f, *args) -> float:
    import jax

    jf = jax.jit(f)
    jax.block_until_ready(jf(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(jf(*args))
    return time.perf_counter() - t0


def copy_bandwidth(mb: int = 1024, reps: int = 20) -> float:
    """Device copy bandwidth (bytes read + written per second) of ``x + 1`` over ``mb`` MiB."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    jax.block_until_ready(out)
    return 2 * a.nbytes * reps / (time.perf_counter() - t0)


def _nbytes(*arrays) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in arrays))


def cases(gpu: bool, ms, tokens, experts: int):
    """Yield (kernel, shape label, m, kernel fn, reference fn, bf16 fn, args, bf16 args, bytes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax.quant.hlwq import HLWQWeight
    from nemojax.quant.nvfp4 import NVFP4Weight
    from pallas_kernels import hlwq as HK
    from pallas_kernels import nvfp4 as NK

    interp = not gpu
    tg = None
    if gpu:
        try:
            from pallas_kernels import triton_gemv as tg

            if tg.unavailable():
                tg = None
        except ImportError:
            tg = None
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    dense = lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),  # noqa: E731
                                             preferred_element_type=jnp.float32).astype(x.dtype)
    for name, n, k in SHAPES if gpu else CPU_SHAPES:
        w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32))
        nv = NVFP4Weight.from_float(w)
        hl = HLWQWeight.from_float(w, 5, path="rotated")
        wb = w.astype(bf)
        del w
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(bf)
            xr = hl.rotate(x.astype(jnp.float32)).astype(bf)
            out = m * n * 2
            nv_args, hl_args = (x, nv.packed, nv.scale, nv.scale_2), (xr, hl.packed, hl.norms, hl.table)
            nv_bytes = _nbytes(nv.packed, nv.scale, x) + out
            hl_bytes = _nbytes(hl.packed, hl.norms, xr) + out
            yield ("nvfp4_matmul", name, n, k, m, lambda *a: NK.nvfp4_matmul(*a, interpret=interp),
                   NK.nvfp4_matmul_reference, dense, nv_args, (x, wb), nv_bytes)
            yield ("hlwq_matmul", name, n, k, m, lambda x, p, nn, t: HK.hlwq_matmul(x, p, nn, t, 5, interpret=interp),
                   lambda x, p, nn, t: HK.hlwq_matmul_reference(x, p, nn, t, 5), dense, hl_args, (x, wb), hl_bytes)
            if tg is not None and m <= tg.MAX_ROWS:
                yield ("triton nvfp4_gemv", name, n, k, m, tg.nvfp4_gemv, NK.nvfp4_matmul_reference, dense, nv_args,
                       (x, wb), nv_bytes)
                yield ("triton hlwq_gemv", name, n, k, m, lambda x, p, nn, t: tg.hlwq_gemv(x, p, nn, t, 5),
                       lambda x, p, nn, t: HK.hlwq_matmul_reference(x, p, nn, t, 5), dense, hl_args, (x, wb),
                       hl_bytes)
            xp = jnp.pad(x, ((0, 0), (0, hl.k_pad - k)))
            yield ("fwht", name, hl.k_pad, hl.k_pad, m, lambda v: HK.fwht(v, interpret=interp), HK.fwht_reference,
                   None, (xp,), None, 2 * xp.nbytes)
    # grouped, at MoE decode shape: T tokens routed to top-6 distinct experts each
    n, k = (1856, 2688) if gpu else (64, 256)
    wbank = jnp.asarray(rng.standard_normal((experts, n, k)).astype(np.float32) * 0.02)
    nv = NVFP4Weight.from_float(wbank)
    hl = HLWQWeight.from_float(wbank, 5, path="rotated")
    wb = wbank.astype(bf)
    del wbank
    for t in tokens:
        ids = np.sort(np.concatenate([rng.choice(experts, min(6, experts), replace=False) for _ in range(t)]))
        gs = jnp.asarray(np.bincount(ids, minlength=experts), jnp.int32)
        used = int((np.asarray(gs) > 0).sum())
        x = jnp.asarray(rng.standard_normal((ids.size, k)).astype(np.float32)).astype(bf)
        xr = hl.rotate(x.astype(jnp.float32)).astype(bf)
        out = ids.size * n * 2
        rag = lambda x, w, g: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), g)  # noqa: E731
        per_e = lambda a: a.nbytes // experts  # noqa: E731
        label = f"{experts} experts {n}x{k}, {t} tok x top-6 ({used} used)"
        yield ("nvfp4_grouped", label, n, k, ids.size,
               lambda x, p, s, s2, g: NK.nvfp4_grouped_matmul(x, p, s, s2, g, interpret=interp),
               NK.nvfp4_grouped_matmul_reference, rag, (x, nv.packed, nv.scale, nv.scale_2, gs), (x, wb, gs),
               used * (per_e(nv.packed) + per_e(nv.scale)) + x.nbytes + out)
        yield ("hlwq_grouped", label, n, k, ids.size,
               lambda x, p, nn, tb, g: HK.hlwq_grouped_matmul(x, p, nn, tb, g, 5, interpret=interp),
               lambda x, p, nn, tb, g: HK.hlwq_grouped_matmul_reference(x, p, nn, tb, g, 5), rag,
               (xr, hl.packed, hl.norms, hl.table, gs), (x, wb, gs),
               used * (per_e(hl.packed) + per_e(hl.norms)) + xr.nbytes + out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="calls per timing loop (GPU)")
    ap.add_argument("--ms", default="1,64", help="activation rows of the dense kernels (decode GEMV = 1)")
    ap.add_argument("--tokens", default="1,8", help="tokens of the grouped MoE cases (rows = 6 x tokens)")
    ap.add_argument("--experts", type=int, default=None, help="experts in the grouped bank (default 128; CPU 8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() == "gpu"
    dev = jax.devices()[0]
    bw = copy_bandwidth(1024, 20) if gpu else copy_bandwidth(256, 3)
    print(f"[bench_kernels] {dev.device_kind} ({jax.default_backend()}, jax {jax.__version__}): copy bandwidth "
          f"{bw / 1e9:.0f} GB/s{'' if gpu else ' -- CPU: Pallas interpret mode, timings say nothing'}",
          file=sys.stderr)
    T = (lambda f, *args: loop_time(f, *args, reps=a.reps)) if gpu else once_time
    rows = []
    ms = [int(s) for s in a.ms.split(",")]
    toks = [int(s) for s in a.tokens.split(",")]
    for kern, label, n, k, m, fk, fr, fb, args, bargs, nbytes in cases(gpu, ms, toks, a.experts or (128 if gpu else 8)):
        t0 = time.perf_counter()
        got = jax.jit(fk)(*args).astype(jnp.float32)
        ref = jax.jit(fr)(*args).astype(jnp.float32)
        err = float(jnp.abs(got - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))
        finite = bool(jnp.isfinite(got).all())
        t_k, t_r = T(fk, *args), T(fr, *args)
        t_b = T(fb, *bargs) if fb is not None else None
        rows.append({"kernel": kern, "shape": label, "n": n, "k": k, "m": m, "rel_err": err, "finite": finite,
                     "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6,
                     "bf16_us": None if t_b is None else t_b * 1e6, "bytes": nbytes, "gbps": nbytes / t_k / 1e9,
                     "pct_copy_bw": 100 * nbytes / t_k / bw})
        print(f"[bench_kernels] {kern} {label} m={m}: rel err {err:.1e}, {t_k * 1e6:.1f} us, "
              f"{100 * nbytes / t_k / bw:.0f}% of copy BW ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "copy_bw_gbps": bw / 1e9, "rows": rows}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"device {dev.device_kind} (jax {jax.__version__}): copy bandwidth {bw / 1e9:.0f} GB/s")
        print("| kernel | shape (N x K) | M | rel err | kernel us | jnp ref us | bf16 us | GB/s | % copy BW |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            bf = f"{r['bf16_us']:.1f}" if r["bf16_us"] is not None else "-"
            print(f"| {r['kernel']} | {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['rel_err']:.1e} | "
                  f"{r['kernel_us']:.1f} | {r['reference_us']:.1f} | {bf} | {r['gbps']:.0f} | "
                  f"{r['pct_copy_bw']:.0f}% |")
    bad = [r for r in rows if not r["finite"] or r["rel_err"] > 2e-2]
    if bad:
        print(f"[bench_kernels] {len(bad)} kernel(s) disagree with their reference: "
              f"{[(r['kernel'], r['shape'], r['m']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
