#!/usr/bin/env python
"""Read the decode GEMVs' compiled inner loop for an H100 (sm_90) on a host without a GPU.

Each kernel is compiled to a cubin by the pip ``triton`` package (its own ptxas; no GPU, no CUDA driver): the
jax-triton GEMVs from their Triton source, the Pallas GEMVs from the Triton IR that JAX's Pallas lowering emits
for them (captured while lowering for an abstract H100). XLA compiles Pallas kernels with the Triton it bundles,
so for Pallas this is the same IR through a possibly newer Triton: a close reading, not the exact binary.

For the K loop of each kernel and shape it reports (``cuobjdump -sass`` / ``-res-usage``): registers, local
memory (spills), instructions per iteration and per weight byte, the global loads per iteration and their widths,
the weight bytes a program reads per iteration and the programs of the launch, and a rough model of the
achieved weight bandwidth on an H100 SXM (132 SMs, 4 schedulers each, ~1.75 GHz):

- an SM holds ``P`` programs (grid / 132, capped by its register file) of ``W`` warps; one K iteration of all
  of them takes ``t_issue = P * W * loop_instr / (4 * clock)`` to issue, plus the ~0.7 us DRAM latency of its
  loads, unless the loop issues the next iteration's loads first (then ``max(t_issue, latency)``);
- bandwidth = ``132 * P * weight bytes per iteration / t``.

The model reproduces what the first kernels measured on an H100 (Pallas NVFP4 GEMV on Mamba in_proj: model 32%
of copy bandwidth, measured 25-31%; the first jax-triton GEMV: model 22%, measured 18%). It knows nothing of
DRAM page effects, tails or the split-K reduction: a design aid, not a measurement.

    python tools/kernel_sass.py [--json]          # needs: pip install triton (no GPU)
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

SHAPES = [("expert up_proj", 1856, 2688), ("expert down_proj", 2688, 1856), ("mamba in_proj", 10304, 2688),
          ("q_proj", 4096, 2688)]
SMS = 132
CLOCK, LATENCY = 1.75e9, 0.7e-6  # H100 SXM sustained clock; DRAM load latency under load (approximate)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(src, num_warps: int) -> bytes:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    c = triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})
    return c.asm["cubin"]


def read_cubin(cubin: bytes) -> dict:
    """Registers, local memory and the innermost backward-branch loop of a cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    out = {"regs": int(re.search(r"REG:(\d+)", res).group(1)), "local": int(re.search(r"LOCAL:(\d+)", res).group(1)),
           "shared": int(re.search(r"SHARED:(\d+)", res).group(1))}
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for a, t in ins:
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            body = [x for b, x in ins if int(m.group(1), 16) <= b <= a]
            if len(body) > 2:
                loops.append(body)
    if not loops:
        raise RuntimeError("no K loop found in the SASS")
    body = max(loops, key=len)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
    loads = collections.Counter(re.search(r"LDG[.\w]*", x).group(0) for x in body if "LDG" in x)
    out.update(loop_instr=len(body), ops=dict(ops.most_common()), loads=dict(loads))
    return out


def _triton_cases(n: int, k: int):
    """(name, cubin, warps, programs, weight bytes per program per iteration, prefetch) of the jax-triton GEMVs."""
    from triton.compiler import ASTSource

    from pallas_kernels import triton_gemv as TG

    kern = TG.kernels.__wrapped__()
    grid, meta = TG.nvfp4_launch(n, k)
    fn = kern["nvfp4"]
    sig = dict(zip(fn.arg_names, ("*bf16", "*u8", "*fp8e4nv", "*fp32", "*fp32"))) | {m: "constexpr" for m in meta}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # XLA buffers are 16-byte aligned
    yield ("triton nvfp4_gemv", _compile(ASTSource(fn, sig, constexprs=dict(meta), attrs=attrs), 4), 4,
           grid[0] * grid[1], meta["BN"] * meta["BW"] * 4.5, True)
    grid, meta = TG.hlwq_launch(n, -(-k // 128) * 128, 5)  # K_pad
    fn = kern["hlwq"]
    sig = dict(zip(fn.arg_names, ("*bf16", "*u8", "*fp16", "*fp32", "*fp32", "*fp32"))) | {m: "constexpr" for m in meta}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    yield ("triton hlwq_gemv", _compile(ASTSource(fn, sig, constexprs=dict(meta), attrs=attrs), 4), 4,
           grid[0] * grid[1], meta["BN"] * meta["G"] * 20.5, True)  # G groups: 20 bytes + 1/4 of a 2-byte norm


def _pallas_ttir(fn, *args, **kw) -> str:
    """The Triton IR of the (last) Pallas kernel in ``fn`` lowered for an abstract H100."""
    from jax._src.pallas.triton import pallas_call_registration as R

    from pallas_kernels.lowering import lower_for_h100

    seen = []
    orig = R.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        res = orig(*a, **k)
        seen.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    R.lowering.lower_jaxpr_to_triton_module = capture
    try:
        lower_for_h100(fn, *args, **kw)
    finally:
        R.lowering.lower_jaxpr_to_triton_module = orig
    return seen[-1]


def _pallas_cases(n: int, k: int):
    import jax
    import jax.numpy as jnp

    from nemojax.formats.hlwq import HLWQWeight
    from nemojax.formats.nvfp4 import NVFP4Weight
    from pallas_kernels import hlwq as HK, nvfp4 as NK

    x = jnp.zeros((1, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32)
    node = NVFP4Weight.from_float(w)
    ttir = _pallas_ttir(NK.nvfp4_matmul, x, node.packed, node.scale, node.scale_2)
    geo = NK.gemv_launch(n, k)
    yield ("pallas nvfp4 gemv", _compile_ttir(ttir), 4, n // geo["bn"] * geo["splits"], geo["bn"] * geo["bw"] * 4.5,
           True)
    h = HLWQWeight.from_float(w, 5)
    ttir = _pallas_ttir(functools.partial(HK.hlwq_matmul, bits=5), h.rotate(x), h.packed, h.norms, h.table)
    geo = HK.gemv_launch(n, h.k_pad, 5)
    yield ("pallas hlwq gemv", _compile_ttir(ttir), 4, n // geo["bn"] * geo["splits"], geo["bn"] * geo["G"] * 20.5,
           True)  # G groups of 32 codes: 20 bytes + a quarter of a 2-byte block norm


def _compile_ttir(ttir: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        return _compile(path, 4)


def analyse(name, cubin, warps, programs, step_bytes, prefetch) -> dict:
    r = read_cubin(cubin)
    r["kernel"] = name
    by_regs = 65536 // (32 * warps * (-(-r["regs"] // 8) * 8))
    per_sm = min(programs / SMS, by_regs)
    t_issue = per_sm * warps * r["loop_instr"] / (4 * CLOCK)
    t = max(t_issue, LATENCY) if prefetch else t_issue + LATENCY
    r.update(programs=programs, programs_per_sm=round(per_sm, 2), regs_allow=by_regs, prefetch=prefetch,
             weight_bytes_per_iter=step_bytes, instr_per_weight_byte=round(r["loop_instr"] * 32 * warps / step_bytes, 2),
             model_GBps=round(SMS * per_sm * step_bytes / t / 1e9))
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    ap.add_argument("--pallas", action=argparse.BooleanOptionalAction, default=True,
                    help="also the Pallas GEMVs (their Triton IR through pip triton)")
    ap.add_argument("--shape", action="append", help="only this shape (repeatable): " +
                    ", ".join(repr(s[0]) for s in SHAPES))
    args = ap.parse_args(argv)
    shapes = [s for s in SHAPES if not args.shape or s[0] in args.shape]
    if not shapes:
        ap.error(f"--shape: none of {args.shape} is one of {[s[0] for s in SHAPES]}")
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernel_sass: needs the triton package (pip install triton); no GPU needed", file=sys.stderr)
        return 2
    rows = []
    for label, n, k in shapes:
        cases = list(_triton_cases(n, k))
        if args.pallas:
            cases += list(_pallas_cases(n, k))
        for case in cases:
            r = analyse(*case)
            r.update(shape=label, N=n, K=k)
            rows.append(r)
            if not args.json:
                print(f"{label:17s} {r['kernel']:18s} regs {r['regs']:3d} local {r['local']} | loop "
                      f"{r['loop_instr']:4d} instr, {r['instr_per_weight_byte']:5.1f}/B, loads {r['loads']} | "
                      f"{r['programs']} programs, {r['programs_per_sm']}/SM, prefetch {r['prefetch']} | model "
                      f"{r['model_GBps']} GB/s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
