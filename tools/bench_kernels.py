#!/usr/bin/env python
"""Check and time every kernel against its reference and against a bf16 matmul on the present device.

For each shape (the Nano-30B's expert up/down, Mamba in_proj and attention q_proj, as decode GEMVs with M=1 and
as a small prefill M=64): max |kernel - reference| (relative), the time of the Pallas kernel, of the jnp
reference (dequantize + XLA matmul) and of a plain bf16 matmul of the same shape, and the kernel's achieved
bandwidth (bytes of codes + scales + activations read, output written) against the device's measured copy
bandwidth. On a CPU the kernels run in interpret mode (correctness only; the timings say nothing).

Times are per call inside one jitted loop of ``--reps`` calls (no Python dispatch in the figure).

    python tools/bench_kernels.py [--reps 50] [--json]
    # on a GPU machine: pip install -e . (jax[cuda]), then the same command
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

SHAPES = [("expert up_proj", 1856, 2688), ("expert down_proj", 2688, 1856), ("mamba in_proj", 10304, 2688),
          ("q_proj", 4096, 2688)]


def timeit(fn, reps):
    import jax

    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def loop_time(f, x, *rest, reps: int = 50) -> float:
    """Seconds per call of ``f(x, *rest)`` measured as ``reps`` calls inside one jitted fori_loop (a loop-carried
    scalar perturbs x each iteration so nothing is hoisted): no Python dispatch in the figure."""
    import jax
    import jax.numpy as jnp

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


def copy_bandwidth(mb: int = 1024, reps: int = 20) -> float:
    """Device copy bandwidth, bytes read + written per second."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)
    return 2 * a.nbytes / timeit(lambda: f(a), reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--ms", default="1,64", help="activation rows to test (decode GEMV = 1)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax.quant.hlwq import HLWQWeight
    from nemojax.quant.nvfp4 import NVFP4Weight
    from pallas_kernels import hlwq as HK
    from pallas_kernels import nvfp4 as NK

    gpu = jax.default_backend() == "gpu"
    interp = not gpu
    reps = a.reps if gpu else 1
    dev = jax.devices()[0]
    bw = copy_bandwidth(1024 if gpu else 256, 20 if gpu else 3)
    print(f"[bench_kernels] device {dev.device_kind} ({jax.default_backend()}), copy bandwidth {bw / 1e9:.0f} GB/s"
          f"{'' if gpu else ' -- CPU: Pallas interpret mode, timings meaningless'}", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    for name, n, k in SHAPES:
        w = jnp.asarray(rng.standard_normal((n, k)).astype(np.float32))
        nv = NVFP4Weight.from_float(w)
        planar = NK.to_planar(nv.packed)
        hl = HLWQWeight.from_float(w, 5, path="rotated")
        hplanar = HK.to_planar(hl.codes(), 5)
        wb = w.astype(jnp.bfloat16)
        del w
        for m in (int(s) for s in a.ms.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(jnp.bfloat16)
            xr = hl.rotate(x.astype(jnp.float32)).astype(jnp.bfloat16)
            T = (lambda f, *args: loop_time(f, *args, reps=reps)) if gpu else \
                (lambda f, *args: timeit(lambda: f(*args), 1))
            t_bf16 = T(lambda x, w: x @ w.T, x, wb)
            # NVFP4
            kern = lambda: NK.nvfp4_matmul(x, planar, nv.scale, nv.scale_2, interpret=interp)  # noqa: E731
            ref_f = jax.jit(NK.nvfp4_matmul_reference)
            ref = lambda: ref_f(x, planar, nv.scale, nv.scale_2)  # noqa: E731
            err = float(jnp.abs(kern().astype(jnp.float32) - ref().astype(jnp.float32)).max()
                        / jnp.abs(ref().astype(jnp.float32)).max())
            t_k = T(lambda x, p, s, s2: NK.nvfp4_matmul(x, p, s, s2, interpret=interp), x, planar, nv.scale,
                    nv.scale_2)
            t_r = T(NK.nvfp4_matmul_reference, x, planar, nv.scale, nv.scale_2)
            nbytes = planar.nbytes + nv.scale.nbytes + x.nbytes + m * n * 2
            rows.append({"kernel": "nvfp4_matmul", "shape": name, "m": m, "n": n, "k": k, "rel_err": err,
                         "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6, "bf16_us": t_bf16 * 1e6,
                         "bytes": nbytes, "gbps": nbytes / t_k / 1e9, "pct_copy_bw": 100 * nbytes / t_k / bw})
            # HLWQ rotated
            kern = lambda: HK.hlwq_matmul(xr, hplanar, hl.norms, hl.table, 5, interpret=interp)  # noqa: E731
            href_f = jax.jit(HK.hlwq_matmul_reference, static_argnums=4)
            ref = lambda: href_f(xr, hplanar, hl.norms, hl.table, 5)  # noqa: E731
            err = float(jnp.abs(kern().astype(jnp.float32) - ref().astype(jnp.float32)).max()
                        / jnp.abs(ref().astype(jnp.float32)).max())
            t_k = T(lambda x, p, nn, t: HK.hlwq_matmul(x, p, nn, t, 5, interpret=interp), xr, hplanar, hl.norms,
                    hl.table)
            t_r = T(lambda x, p, nn, t: HK.hlwq_matmul_reference(x, p, nn, t, 5), xr, hplanar, hl.norms, hl.table)
            nbytes = hplanar.nbytes + hl.norms.nbytes + xr.nbytes + m * n * 2
            rows.append({"kernel": "hlwq_matmul", "shape": name, "m": m, "n": n, "k": k, "rel_err": err,
                         "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6, "bf16_us": t_bf16 * 1e6,
                         "bytes": nbytes, "gbps": nbytes / t_k / 1e9, "pct_copy_bw": 100 * nbytes / t_k / bw})
            # FWHT
            xp = jnp.pad(x, ((0, 0), (0, hl.k_pad - k)))
            kern = lambda: HK.fwht(xp, interpret=interp)  # noqa: E731
            ref = lambda: HK.fwht_reference(xp)  # noqa: E731
            err = float(jnp.abs(kern().astype(jnp.float32) - ref().astype(jnp.float32)).max()
                        / jnp.abs(ref().astype(jnp.float32)).max())
            t_k = T(lambda v: HK.fwht(v, interpret=interp), xp)
            t_r = T(HK.fwht_reference, xp)
            rows.append({"kernel": "fwht", "shape": name, "m": m, "n": k, "k": k, "rel_err": err,
                         "kernel_us": t_k * 1e6, "reference_us": t_r * 1e6, "bf16_us": None,
                         "bytes": 2 * xp.nbytes, "gbps": 2 * xp.nbytes / t_k / 1e9,
                         "pct_copy_bw": 100 * 2 * xp.nbytes / t_k / bw})
            print(f"[bench_kernels] {name} m={m} done", file=sys.stderr)
    res = {"device": dev.device_kind, "backend": jax.default_backend(), "copy_bw_gbps": bw / 1e9, "rows": rows}
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"device {dev.device_kind}: copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| kernel | shape | M | rel err | kernel us | jnp ref us | bf16 matmul us | GB/s | % copy BW |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bf = f"{r['bf16_us']:.1f}" if r["bf16_us"] is not None else "-"
        print(f"| {r['kernel']} | {r['shape']} {r['n']}x{r['k']} | {r['m']} | {r['rel_err']:.1e} | "
              f"{r['kernel_us']:.1f} | {r['reference_us']:.1f} | {bf} | {r['gbps']:.0f} | {r['pct_copy_bw']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
