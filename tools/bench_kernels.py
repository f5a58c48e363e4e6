#!/usr/bin/env python
"""Check and time every kernel against its reference and against a bf16 matmul on the present device.

Kernels: Pallas NVFP4 and HLWQ matmuls (decode GEMV path for M <= 8, tensor-core path above), the grouped
(ragged, per-expert) NVFP4 and HLWQ matmuls at MoE decode shape (T tokens x top-6 of the experts), the FWHT, and,
when jax-triton is installed on a GPU, the jax-triton NVFP4 / HLWQ decode GEMVs. For each: max |kernel -
reference| relative to max |reference|, time per call of the kernel, of its pure-jnp reference and of a bf16
matmul of the same shape (grouped: ``jax.lax.ragged_dot`` on a bf16 bank), and the kernel's achieved bandwidth
(bytes of codes + scales it must read, activations, output) against the device's measured copy bandwidth.

Times are device time per call (GPU: busy time of the GPU streams in a profiler trace over ``--reps`` calls, so
neither launch gaps nor Python dispatch count), cycling through distinct copies of the weights (>= 200 MB in all)
so that no call finds its weights in the H100's 50 MB L2. On a CPU the Pallas kernels run in interpret mode: the
check is real, the timings say nothing (shapes are cut down there). ``--sweep`` (GPU) also tries the decode GEMVs'
launch parameters (column block, K splits, warps).

    python tools/bench_kernels.py [--reps 64] [--ms 1,64] [--tokens 1,8] [--sweep] [--json]
    # on a GPU machine: pip install -e '.[gpu]' (jax[cuda] + jax-triton), then the same command
"""
from __future__ import annotations

import argparse
import functools
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


LAST_BREAKDOWN: dict[str, float] = {}  # the last profiled call: us per call of its 8 longest kernels, by name
L2_DEFEAT_BYTES = 200 * 2 ** 20  # H100 L2 is 50 MB: cycle through this many bytes of weight copies


def device_time(f, arg_sets, reps: int = 64) -> tuple[float, str]:
    """Seconds of device time per call of ``f``, cycling through ``arg_sets`` (distinct copies of the weights,
    so a call does not find its weights in L2 from the previous one). On a GPU the time is the busy time of the
    GPU streams in a profiler trace (CUPTI), divided by the calls: launch gaps and Python dispatch do not count,
    every kernel the call runs does (split-K reduction, casts). Elsewhere, or if the trace has no GPU events:
    wall time of ``reps`` back-to-back asynchronous calls. Returns (seconds, "profiler" | "wall")."""
    import jax

    jf = jax.jit(f)
    for a in arg_sets:
        jax.block_until_ready(jf(*a))
    if jax.default_backend() == "gpu":
        try:
            t = _profiled(jf, arg_sets, reps)
            if t is not None:
                return t, "profiler"
        except Exception as e:  # noqa: BLE001 -- a profiler that cannot run falls back to wall time
            print(f"[bench_kernels] profiler unavailable ({type(e).__name__}: {e}); wall-clock times", file=sys.stderr)
    t0 = time.perf_counter()
    outs = [jf(*arg_sets[i % len(arg_sets)]) for i in range(reps)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / reps, "wall"


def _profiled(jf, arg_sets, reps):
    import glob
    import tempfile

    import jax
    from jax._src.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d) as sess:
            outs = [jf(*arg_sets[i % len(arg_sets)]) for i in range(reps)]
            jax.block_until_ready(outs)
        pd = getattr(sess, "profile_data", None)
        if pd is None:
            files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
            pd = ProfileData.from_file(files[0]) if files else None
        if pd is None:
            return None
        spans, names = [], {}
        for plane in pd.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or list(plane.lines)
            for ln in lines:
                for e in ln.events:
                    spans.append((e.start_ns, e.end_ns))
                    names[e.name] = names.get(e.name, 0.0) + e.duration_ns * 1e-3 / reps
    if not spans:
        return None
    LAST_BREAKDOWN.clear()
    LAST_BREAKDOWN.update(sorted(names.items(), key=lambda kv: -kv[1])[:8])
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in sorted(spans):  # union of the kernels' intervals (streams may overlap)
        if cur_e is None or a > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    busy += cur_e - cur_s
    return busy * 1e-9 / reps


def copies(args, weight_bytes: int, gpu: bool):
    """Argument sets with distinct copies of the weights (all but the first argument) covering
    ``L2_DEFEAT_BYTES`` on a GPU (at most 32 sets); one set elsewhere."""
    import jax.numpy as jnp

    c = min(32, max(2, -(-L2_DEFEAT_BYTES // max(weight_bytes, 1)))) if gpu else 1
    return [args] + [(args[0], *(jnp.array(a, copy=True) for a in args[1:])) for _ in range(c - 1)]


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
    """Yield (kernel, shape label, n, k, m, kernel fn, reference fn, bf16 fn, arg sets, bf16 arg sets, bytes):
    an arg set is one call's arguments; the sets differ in weights (dense: copies; grouped: expert choices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax.formats.hlwq import HLWQWeight
    from nemojax.formats.nvfp4 import NVFP4Weight
    from pallas_kernels import hlwq as HK
    from pallas_kernels import nvfp4 as NK

    interp = not gpu
    tg = _triton(gpu)
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
            nv_w, hl_w = _nbytes(nv.packed, nv.scale), _nbytes(hl.packed, hl.norms)
            nv_sets = copies((x, nv.packed, nv.scale, nv.scale_2), nv_w, gpu)
            hl_sets = copies((xr, hl.packed, hl.norms, hl.table), hl_w, gpu)
            b_sets = copies((x, wb), wb.nbytes, gpu)
            nv_bytes, hl_bytes = nv_w + x.nbytes + out, hl_w + xr.nbytes + out
            yield ("nvfp4_matmul", name, n, k, m, lambda *a: NK.nvfp4_matmul(*a, interpret=interp),
                   NK.nvfp4_matmul_reference, dense, nv_sets, b_sets, nv_bytes)
            yield ("hlwq_matmul", name, n, k, m, lambda x, p, nn, t: HK.hlwq_matmul(x, p, nn, t, 5, interpret=interp),
                   lambda x, p, nn, t: HK.hlwq_matmul_reference(x, p, nn, t, 5), dense, hl_sets, b_sets, hl_bytes)
            if tg is not None and m <= tg.MAX_ROWS:
                yield ("triton nvfp4_gemv", name, n, k, m, tg.nvfp4_gemv, NK.nvfp4_matmul_reference, dense, nv_sets,
                       b_sets, nv_bytes)
                yield ("triton hlwq_gemv", name, n, k, m, lambda x, p, nn, t: tg.hlwq_gemv(x, p, nn, t, 5),
                       lambda x, p, nn, t: HK.hlwq_matmul_reference(x, p, nn, t, 5), dense, hl_sets, b_sets,
                       hl_bytes)
            xp = jnp.pad(x, ((0, 0), (0, hl.k_pad - k)))
            yield ("fwht", name, hl.k_pad, hl.k_pad, m, lambda v: HK.fwht(v, interpret=interp), HK.fwht_reference,
                   None, [(xp,)], None, 2 * xp.nbytes)
            del nv_sets, hl_sets, b_sets
    # grouped, at MoE decode shape: T tokens routed to top-6 distinct experts each; the arg sets draw different
    # experts (the bank is larger than L2, so a call does not find the previous call's experts there)
    n, k = (1856, 2688) if gpu else (64, 256)
    wbank = jnp.asarray(rng.standard_normal((experts, n, k)).astype(np.float32) * 0.02)
    nv = NVFP4Weight.from_float(wbank)
    hl = HLWQWeight.from_float(wbank, 5, path="rotated")
    wb = wbank.astype(bf)
    del wbank
    per_e = lambda a: a.nbytes // experts  # noqa: E731
    rag = lambda x, w, g: jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), g)  # noqa: E731
    for t in tokens:
        draws = []
        for _ in range(8 if gpu else 1):
            ids = np.sort(np.concatenate([rng.choice(experts, min(6, experts), replace=False) for _ in range(t)]))
            gs = jnp.asarray(np.bincount(ids, minlength=experts), jnp.int32)
            x = jnp.asarray(rng.standard_normal((ids.size, k)).astype(np.float32)).astype(bf)
            draws.append((x, hl.rotate(x.astype(jnp.float32)).astype(bf), gs, int((np.asarray(gs) > 0).sum())))
        used = draws[0][3]
        out = draws[0][0].shape[0] * n * 2
        label = f"{experts} experts, {t} tok x top-6 ({used} used)"
        yield ("nvfp4_grouped", label, n, k, 6 * t,
               lambda x, p, s, s2, g: NK.nvfp4_grouped_matmul(x, p, s, s2, g, interpret=interp),
               NK.nvfp4_grouped_matmul_reference, rag, [(x, nv.packed, nv.scale, nv.scale_2, g) for x, _, g, _ in draws],
               [(x, wb, g) for x, _, g, _ in draws],
               used * (per_e(nv.packed) + per_e(nv.scale)) + draws[0][0].nbytes + out)
        yield ("hlwq_grouped", label, n, k, 6 * t,
               lambda x, p, nn, tb, g: HK.hlwq_grouped_matmul(x, p, nn, tb, g, 5, interpret=interp),
               lambda x, p, nn, tb, g: HK.hlwq_grouped_matmul_reference(x, p, nn, tb, g, 5), rag,
               [(xr, hl.packed, hl.norms, hl.table, g) for _, xr, g, _ in draws], [(x, wb, g) for x, _, g, _ in draws],
               used * (per_e(hl.packed) + per_e(hl.norms)) + draws[0][1].nbytes + out)


def _triton(gpu: bool):
    if not gpu:
        return None
    try:
        from pallas_kernels import triton_gemv as tg
    except ImportError:
        return None
    return None if tg.unavailable() else tg


def sweep(bw: float, reps: int) -> list[dict]:
    """Launch-parameter sweep of the decode GEMVs (M = 1) on the Mamba in_proj shape: Pallas
    (column block, K splits, warps) and, with jax-triton, the Triton GEMVs. Prints the best of each."""
    import itertools

    import jax.numpy as jnp
    import numpy as np

    from nemojax.formats.hlwq import HLWQWeight
    from nemojax.formats.nvfp4 import NVFP4Weight
    from pallas_kernels import hlwq as HK
    from pallas_kernels import nvfp4 as NK

    tg = _triton(True)
    rng = np.random.default_rng(1)
    res = []
    for name, n, k in SHAPES[2:3]:
        w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32))
        nv, hl = NVFP4Weight.from_float(w), HLWQWeight.from_float(w, 5, path="rotated")
        x = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32)).astype(jnp.bfloat16)
        xr = hl.rotate(x.astype(jnp.float32)).astype(jnp.bfloat16)
        nv_w, hl_w = _nbytes(nv.packed, nv.scale), _nbytes(hl.packed, hl.norms)
        nv_sets = copies((x, nv.packed, nv.scale, nv.scale_2), nv_w, True)
        hl_sets = copies((xr, hl.packed, hl.norms, hl.table), hl_w, True)
        grid = list(itertools.product((32, 64, 128), (None, 2, 8), (4, 8)))
        makers = {
            "pallas nvfp4": (nv_sets, nv_w, lambda bn, sp, nw: functools.partial(
                NK.nvfp4_matmul, block_n_=bn, splits=sp, num_warps=nw)),
            "pallas hlwq": (hl_sets, hl_w, lambda bn, sp, nw: lambda x, p, nn, t: HK.hlwq_matmul(
                x, p, nn, t, 5, block_n_=bn, splits=sp, num_warps=nw)),
        }
        if tg is not None:
            makers["triton nvfp4"] = (nv_sets, nv_w, lambda bn, sp, nw: functools.partial(
                tg.nvfp4_gemv, bn=bn, splits=sp, num_warps=nw))
            makers["triton hlwq"] = (hl_sets, hl_w, lambda bn, sp, nw: lambda x, p, nn, t: tg.hlwq_gemv(
                x, p, nn, t, 5, bn=bn, splits=sp, num_warps=nw))
        variants = [(kern, sets, wb, cfg, make(*cfg)) for kern, (sets, wb, make) in makers.items() for cfg in grid]
        best = {}
        for kern, sets, wbytes, cfg, f in variants:
            try:
                t, how = device_time(f, sets, reps)
            except Exception as e:  # noqa: BLE001 -- a launch configuration the compiler rejects is skipped
                print(f"[bench_kernels] sweep {kern} {name} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            pct = 100 * (wbytes + x.nbytes + 2 * n) / t / bw
            r = {"kernel": kern, "shape": name, "n": n, "k": k, "block_n": cfg[0], "splits": cfg[1],
                 "num_warps": cfg[2], "us": t * 1e6, "pct_copy_bw": pct, "timing": how}
            res.append(r)
            if kern not in best or r["us"] < best[kern]["us"]:
                best[kern] = r
        for r in best.values():
            print(f"[bench_kernels] sweep best {r['kernel']} {name} {n}x{k}: block_n={r['block_n']} "
                  f"splits={r['splits']} num_warps={r['num_warps']}: {r['us']:.1f} us, {r['pct_copy_bw']:.0f}% of "
                  f"copy BW", file=sys.stderr)
        del nv_sets, hl_sets
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=64, help="calls per timing (GPU)")
    ap.add_argument("--ms", default="1,64", help="activation rows of the dense kernels (decode GEMV = 1)")
    ap.add_argument("--tokens", default="1,8", help="tokens of the grouped MoE cases (rows = 6 x tokens)")
    ap.add_argument("--experts", type=int, default=None, help="experts in the grouped bank (default 128; CPU 8)")
    ap.add_argument("--sweep", action="store_true", help="GPU: also sweep the decode GEMVs' launch parameters")
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
    reps = a.reps if gpu else 1
    rows = []
    ms = [int(s) for s in a.ms.split(",")]
    toks = [int(s) for s in a.tokens.split(",")]
    for kern, label, n, k, m, fk, fr, fb, sets, bsets, nbytes in cases(gpu, ms, toks,
                                                                        a.experts or (128 if gpu else 8)):
        t0 = time.perf_counter()
        got = jax.jit(fk)(*sets[0]).astype(jnp.float32)
        ref = jax.jit(fr)(*sets[0]).astype(jnp.float32)
        err = float(jnp.abs(got - ref).max() / jnp.maximum(jnp.abs(ref).max(), 1e-30))
        finite = bool(jnp.isfinite(got).all())
        t_k, how = device_time(fk, sets, reps)
        parts = dict(LAST_BREAKDOWN)
        t_r, _ = device_time(fr, sets[:2], max(4, reps // 8))
        t_b = device_time(fb, bsets, reps)[0] if fb is not None else None
        rows.append({"kernel": kern, "shape": label, "n": n, "k": k, "m": m, "rel_err": err, "finite": finite,
                     "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6, "timing": how,
                     "bf16_us": None if t_b is None else t_b * 1e6, "bytes": nbytes, "gbps": nbytes / t_k / 1e9,
                     "pct_copy_bw": 100 * nbytes / t_k / bw, "weight_sets": len(sets),
                     "kernels_us": parts})
        print(f"[bench_kernels] {kern} {label} m={m}: rel err {err:.1e}, {t_k * 1e6:.1f} us ({how}), "
              f"{100 * nbytes / t_k / bw:.0f}% of copy BW ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    swept = sweep(bw, reps) if (gpu and a.sweep) else []
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "copy_bw_gbps": bw / 1e9, "rows": rows, "sweep": swept}
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
