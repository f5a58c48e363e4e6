#!/usr/bin/env python
"""Measure the host memory of a streaming ``nemojax convert`` (``convert_checkpoint``) on a large checkpoint.

Generates a random BF16 Nemotron-H checkpoint (``tools/measure_load_memory.py``'s generator: sharded, original
naming, one tensor per expert) in a temporary folder, then converts it in a fresh process with
``convert_checkpoint(src, dst, --to)`` and reports the peak RSS above the process's RSS before converting
(``VmHWM``, reset through ``/proc/self/clear_refs``; sampled ``RssAnon`` / ``RssFile`` peaks), next to the
checkpoint size and the largest parameter (a stacked expert bank).

Example::

    python tools/measure_convert_memory.py --size-gb 2.2 --to nvfp4 --json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for p in (_REPO, _HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

GB = 1e9

_CHILD = r"""
import json, os, sys, threading, time
REPO, SRC, DST, TO, SHARD, QUANT = sys.argv[1:7]
sys.path.insert(0, REPO)

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

import jax, jax.numpy as jnp
from nemojax.checkpoint import convert_checkpoint
jax.block_until_ready(jnp.ones(8) + 1)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status()
peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        s = status()
        for k in peaks:
            peaks[k] = max(peaks[k], s[k])
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
res = convert_checkpoint(SRC, DST, TO, max_shard_bytes=int(SHARD), progress=False, quant=QUANT or None)
dt = time.perf_counter() - t0
stop.set(); t.join()
after = status()
print(json.dumps({"result": res, "seconds": dt, "vmhwm_reset": reset, "rss_before": base["VmRSS"],
                  "anon_before": base["RssAnon"], "file_before": base["RssFile"], "vmhwm_after": after["VmHWM"],
                  "sampled_peak": peaks, "backend": jax.default_backend()}))
"""


def main(argv=None) -> int:
    import measure_load_memory as mlm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.2, help="target BF16 checkpoint size in GB (default 2.2)")
    ap.add_argument("--to", default="nvfp4", choices=["nvfp4", "hlwq-q5", "hlwq-q5-converged", "orbax"])
    ap.add_argument("--quant", default="", help="with --to orbax: quantize on the way (nvfp4, hlwq-q5, ...)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--pattern", default="MEM*EMEM-E")
    ap.add_argument("--shard-mb", type=float, default=256, help="input shard size in MiB")
    ap.add_argument("--out-shard-mb", type=float, default=5000, help="output --max-shard-size in MB (default 5000)")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the converting process (default cpu)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    experts = mlm.pick_experts(a.size_gb * GB, a.hidden, a.vocab, a.pattern)
    cfg = mlm.make_config(experts, a.hidden, a.vocab, a.pattern)
    tmp = tempfile.mkdtemp(prefix="nemojax_convmem_", dir=a.tmpdir)
    try:
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        mlm.log(f"generating a {mlm.checkpoint_bytes(cfg) / GB:.2f} GB checkpoint ({experts} experts) in {src}")
        gen = mlm.write_checkpoint(cfg, src, int(a.shard_mb * mlm.MiB), 0)
        from nemojax.params import is_spec, param_specs
        import jax
        import math

        largest = max(math.prod(s.shape) * 2 for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))
        env = dict(os.environ)
        if a.platform:
            env["JAX_PLATFORMS"] = a.platform
        mlm.log(f"converting to {a.to} in a fresh process ...")
        proc = subprocess.run([sys.executable, "-c", _CHILD, _REPO, src, dst, a.to, str(int(a.out_shard_mb * 1e6)), a.quant],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"conversion failed:\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["checkpoint_bytes"] = mlm.folder_bytes(src)
        r["output_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
        r["largest_param_bytes_bf16"] = largest
        r["largest_ckpt_tensor_bytes"] = gen["largest_ckpt_tensor_bytes"]
        r["peak_vmhwm_delta"] = r["vmhwm_after"] - r["rss_before"]
        r["peak_anon_delta"] = r["sampled_peak"]["RssAnon"] - r["anon_before"]
        r["peak_file_delta"] = r["sampled_peak"]["RssFile"] - r["file_before"]
        r["ratio_vmhwm_to_checkpoint"] = r["peak_vmhwm_delta"] / r["checkpoint_bytes"]
        r["ratio_anon_to_checkpoint"] = r["peak_anon_delta"] / r["checkpoint_bytes"]
        r["experts"] = experts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        g = lambda b: f"{b / GB:.3f} GB"  # noqa: E731
        to = a.to + (f" ({a.quant})" if a.quant else "")
        print(f"bf16 -> {to}: checkpoint {g(r['checkpoint_bytes'])} -> {g(r['output_bytes'])} "
              f"in {r['seconds']:.1f} s ({r['backend']})\n"
              f"  peak RSS above baseline (VmHWM, memory-mapped file pages included): {g(r['peak_vmhwm_delta'])} "
              f"({100 * r['ratio_vmhwm_to_checkpoint']:.1f}% of the checkpoint)\n"
              f"  sampled peak RssAnon: {g(r['peak_anon_delta'])}, RssFile: {g(r['peak_file_delta'])}\n"
              f"  largest parameter (bf16 expert bank): {g(r['largest_param_bytes_bf16'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
