#!/usr/bin/env python
"""Measure the host memory that ``nemojax.load`` needs for a large checkpoint.

Generates a random Nemotron-H checkpoint (all four block types, original ``backbone.*`` naming with one
tensor per expert, sharded with ``model.safetensors.index.json``) in a temporary folder, shard by shard so
that generation itself holds at most one shard in memory. Then, for each requested dtype, a fresh Python
process imports jax, records its RSS, runs ``nemojax.load(path, dtype=...)`` and reports

* the checkpoint's bytes on disk and the loaded parameters' bytes (sum of ``nbytes`` over the pytree),
* the peak RSS of the loading process above its RSS before loading: from ``getrusage(RUSAGE_SELF).ru_maxrss``
  and from ``VmHWM`` in ``/proc/self/status`` (reset just before loading through ``/proc/self/clear_refs``
  where the kernel allows it, so import-time peaks do not count),
* the sampled peak of ``RssAnon`` (heap / XLA buffers) and ``RssFile`` (page-cache pages of the memory-mapped
  checkpoint: they count in RSS while mapped, but are clean, shared and reclaimable, not private memory),
* the largest single tensor (checkpoint tensor and loaded parameter) and the ratio
  ``peak / (params + largest tensor)``: a loader that converts one tensor at a time stays near 1.

Example::

    python tools/measure_load_memory.py                      # ~1.3 GB bf16 checkpoint, loads to bf16 and fp32
    python tools/measure_load_memory.py --size-gb 2 --json   # machine-readable result on stdout

Progress messages go to stderr; the report (text or ``--json``) to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

GB = 1e9
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[measure_load_memory] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- config
def make_config(n_experts: int, hidden: int, vocab: int, pattern: str):
    from nemojax import Config

    return Config.from_dict(dict(
        vocab_size=vocab, hidden_size=hidden, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern),
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=n_experts, num_experts_per_tok=min(6, n_experts), moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, intermediate_size=4096, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
    ))


def checkpoint_bytes(cfg, dtype="bfloat16") -> int:
    """Bytes of all tensors on disk (weights in ``dtype``, A_log / D / e_score_correction_bias in fp32)."""
    from nemojax.params import is_spec, leaf_dtype, param_specs
    import jax

    return sum(math.prod(s.shape) * np.dtype(leaf_dtype(s, dtype)).itemsize
               for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))


def pick_experts(target_bytes: float, hidden: int, vocab: int, pattern: str) -> int:
    """Smallest multiple of 8 experts whose bf16 checkpoint reaches ``target_bytes``."""
    e = 8
    while checkpoint_bytes(make_config(e, hidden, vocab, pattern)) < target_bytes:
        e += 8
        if e > 4096:
            raise SystemExit(f"cannot reach {target_bytes / GB:.2f} GB with pattern {pattern!r}: add 'E' layers")
    return e


# ----------------------------------------------------------------------------------------------- generation
def _random_tensor(rng: np.random.Generator, leaf: str, shape, dtype) -> np.ndarray:
    """Random values (never zeros) with per-kind statistics; built in float32 then cast."""
    if leaf == "A_log":
        a = np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    elif leaf in ("D", "norm", "norm_f"):
        a = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
        fan_in = shape[-1] if len(shape) > 1 else 1
        a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / math.sqrt(max(fan_in, 1)))
    return a.astype(dtype, copy=False)


def iter_checkpoint_tensors(cfg, seed: int, dtype="bfloat16"):
    """``(checkpoint name, array)`` one tensor at a time, original naming (one tensor per expert)."""
    from nemojax.params import leaf_dtype, param_specs, tree_paths

    for i, (path, spec) in enumerate(tree_paths(param_specs(cfg))):
        rng = np.random.default_rng([seed, i])
        leaf = path.rsplit(".", 1)[-1]
        dt = np.dtype(leaf_dtype(spec, dtype))
        if spec.stacked:
            for e in range(spec.shape[0]):
                yield spec.ckpt.format(e=e), _random_tensor(rng, leaf, spec.shape[1:], dt)
        else:
            yield spec.ckpt, _random_tensor(rng, leaf, spec.ckpt_shape or spec.shape, dt)


def write_checkpoint(cfg, folder: str, shard_bytes: int, seed: int) -> dict:
    """Write config.json, shards and the index; holds at most one shard of tensors in memory."""
    from nemojax.checkpoint import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    shards: list[list[str]] = []
    cur, size, total, n = [], 0, 0, 0
    largest = ("", 0)

    def flush():
        k = len(shards) + 1
        tmp = os.path.join(folder, f"shard-{k:05d}.tmp")
        save_file(cur, tmp, metadata={"format": "pt"})
        shards.append([tmp, [name for name, _ in cur]])
        log(f"  wrote shard {k} ({size / GB:.2f} GB, {len(cur)} tensors, {total / GB:.2f} GB so far)")

    for name, a in iter_checkpoint_tensors(cfg, seed):
        if cur and size + a.nbytes > shard_bytes:
            flush()
            cur, size = [], 0
        cur.append((name, a))
        size += a.nbytes
        total += a.nbytes
        n += 1
        if a.nbytes > largest[1]:
            largest = (name, a.nbytes)
    if cur:
        flush()
    cur = []
    weight_map = {}
    for k, (tmp, names) in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, os.path.join(folder, fname))
        weight_map.update({name: fname for name in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return {"tensors": n, "shards": len(shards), "tensor_bytes": total, "largest_ckpt_tensor": largest[0],
            "largest_ckpt_tensor_bytes": largest[1]}


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


# ----------------------------------------------------------------------------------------------- child
_CHILD = r"""
import json, os, resource, sys, threading, time
REPO, PATH, DTYPE = sys.argv[1:4]
sys.path.insert(0, REPO)

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out

import jax
import jax.numpy as jnp
import numpy as np
import nemojax
jax.devices()                                   # initialise the backend before the baseline
jax.block_until_ready(jnp.ones(8) + 1)
base = status()
maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:                                            # reset VmHWM to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm_reset = status()["VmHWM"] <= base["VmRSS"] + (8 << 20)
except OSError:
    hwm_reset = False
base = status()

peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        s = status()
        for k in peaks:
            peaks[k] = max(peaks[k], s[k])
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
model = nemojax.load(PATH, dtype=DTYPE, progress=False)
leaves = jax.tree.leaves(model.params)
jax.block_until_ready(leaves)
dt = time.perf_counter() - t0
stop.set(); t.join()
after = status()
maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# spot check: the embedding and the last expert of the first MoE layer equal the file's bytes
from nemojax.checkpoint import Checkpoint
ck = Checkpoint(PATH)
ok = True
emb = np.asarray(model.params["embeddings"])
ok &= bool(np.array_equal(emb, np.asarray(ck.get("backbone.embeddings.weight"), emb.dtype)))
li = model.config.pattern.index("E")
E = model.config.n_routed_experts
up = np.asarray(model.params["layers"][li]["mixer"]["experts"]["up_proj"][E - 1])
name = f"backbone.layers.{li}.mixer.experts.{E - 1}.up_proj.weight"
ok &= bool(np.array_equal(up, np.asarray(ck.get(name), up.dtype)))
largest = max(leaves, key=lambda x: x.nbytes)
print(json.dumps({
    "dtype": DTYPE, "load_seconds": dt, "param_bytes": int(sum(x.nbytes for x in leaves)),
    "param_leaves": len(leaves), "largest_param_bytes": int(largest.nbytes),
    "largest_param_shape": list(largest.shape), "rss_before": base["VmRSS"],
    "rss_anon_before": base["RssAnon"], "rss_file_before": base["RssFile"],
    "maxrss_before": maxrss_before, "maxrss_after": maxrss_after, "vmhwm_reset": hwm_reset,
    "vmhwm_after": after["VmHWM"], "rss_after": after["VmRSS"], "rss_anon_after": after["RssAnon"],
    "rss_file_after": after["RssFile"], "sampled_peak": peaks, "values_match_file": ok,
    "backend": jax.default_backend(),
}))
"""


def measure(path: str, dtype: str, platform: str | None) -> dict:
    env = dict(os.environ)
    if platform:
        env["JAX_PLATFORMS"] = platform
    proc = subprocess.run([sys.executable, "-c", _CHILD, _REPO, path, dtype], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"loading subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    base = r["rss_before"]
    r["peak_maxrss_delta"] = r["maxrss_after"] - base
    r["peak_vmhwm_delta"] = r["vmhwm_after"] - base
    r["peak_anon_delta"] = r["sampled_peak"]["RssAnon"] - r["rss_anon_before"]
    r["peak_file_delta"] = r["sampled_peak"]["RssFile"] - r["rss_file_before"]
    r["final_rss_delta"] = r["rss_after"] - base
    if r["maxrss_before"] > r["maxrss_after"] - 1:
        r["note"] = "ru_maxrss did not grow during loading (the import peak was higher); use VmHWM"
    return r


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size-gb", type=float, default=1.3,
                    help="target checkpoint size in GB (bf16 on disk); sets the number of experts (default 1.3)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (overrides --size-gb)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument("--pattern", default="MEM*EMEM-E", help="layer pattern over M, E, *, - (default MEM*EMEM-E)")
    ap.add_argument("--shard-mb", type=float, default=256, help="max shard size in MiB (default 256)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="comma-separated load dtypes, each measured in a fresh process (default bfloat16,float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="measure this existing checkpoint folder instead")
    ap.add_argument("--tmpdir", default=None, help="where to create the temporary checkpoint folder")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint (its path is reported)")
    ap.add_argument("--platform", default="cpu",
                    help="JAX_PLATFORMS for the loading process (default cpu; '' keeps the environment's)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = ap.parse_args(argv)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    from nemojax.checkpoint import resolve_dtype

    for d in dtypes:
        resolve_dtype(d, "--dtypes")
    result: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": []}
    tmp = None
    try:
        if args.checkpoint:
            path = args.checkpoint
            from nemojax import Config

            cfg = Config.from_json(path)
        else:
            experts = args.experts or pick_experts(args.size_gb * GB, args.hidden, args.vocab, args.pattern)
            cfg = make_config(experts, args.hidden, args.vocab, args.pattern)
            tmp = tempfile.mkdtemp(prefix="nemojax_loadmem_", dir=args.tmpdir)
            path = os.path.join(tmp, "ckpt")
            need = checkpoint_bytes(cfg)
            free = shutil.disk_usage(tmp).free
            if need * 1.1 > free:
                raise SystemExit(f"not enough disk space in {tmp}: need {need / GB:.2f} GB, {free / GB:.2f} GB free")
            log(f"generating a {need / GB:.2f} GB checkpoint ({cfg.num_hidden_layers} layers {cfg.pattern!r}, "
                f"{experts} experts, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}) in {path}")
            t0 = time.perf_counter()
            result["generation"] = write_checkpoint(cfg, path, int(args.shard_mb * MiB), args.seed)
            result["generation"]["seconds"] = time.perf_counter() - t0
            log(f"generated in {result['generation']['seconds']:.1f} s")
        result["checkpoint"] = {"path": path, "bytes_on_disk": folder_bytes(path), "pattern": cfg.pattern,
                                "n_routed_experts": cfg.n_routed_experts, "hidden_size": cfg.hidden_size,
                                "vocab_size": cfg.vocab_size}
        from nemojax.checkpoint import Checkpoint

        ck = Checkpoint(path)
        big = max(ck.names, key=lambda n: int(np.prod(ck.shape(n))) * ck.dtype(n).itemsize)
        result["checkpoint"]["largest_tensor"] = big
        result["checkpoint"]["largest_tensor_bytes"] = int(np.prod(ck.shape(big))) * ck.dtype(big).itemsize
        result["checkpoint"]["files"] = len({ck.file_of(n) for n in ck.names})
        result["checkpoint"]["tensors"] = len(ck.names)
        del ck
        for d in dtypes:
            log(f"loading with dtype={d} in a fresh process ...")
            r = measure(path, d, args.platform or None)
            one = max(r["largest_param_bytes"], result["checkpoint"]["largest_tensor_bytes"])
            r["largest_tensor_bytes"] = one
            r["ratio_vmhwm"] = r["peak_vmhwm_delta"] / (r["param_bytes"] + one)
            r["ratio_maxrss"] = r["peak_maxrss_delta"] / (r["param_bytes"] + one)
            r["ratio_anon"] = r["peak_anon_delta"] / (r["param_bytes"] + one)
            result["runs"].append(r)
            log(f"  done in {r['load_seconds']:.1f} s: peak {r['peak_vmhwm_delta'] / GB:.3f} GB above baseline "
                f"for {r['param_bytes'] / GB:.3f} GB of parameters")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"removed {tmp}")
        elif tmp:
            log(f"kept {path}")

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(report(result))
    return 0 if all(r["values_match_file"] for r in result["runs"]) else 1


def report(result: dict) -> str:
    c = result["checkpoint"]
    g = lambda b: f"{b / GB:8.3f} GB"  # noqa: E731
    lines = [f"checkpoint: {c['bytes_on_disk'] / GB:.3f} GB on disk, {c['tensors']} tensors in {c['files']} files "
             f"(pattern {c['pattern']!r}, {c['n_routed_experts']} experts/MoE layer, hidden {c['hidden_size']}, "
             f"vocab {c['vocab_size']})",
             f"largest checkpoint tensor: {c['largest_tensor']} ({c['largest_tensor_bytes'] / GB:.3f} GB)"]
    for r in result["runs"]:
        lines += [
            "",
            f"nemojax.load(dtype={r['dtype']!r}) on {r['backend']}: {r['load_seconds']:.1f} s, values match file: "
            f"{r['values_match_file']}",
            f"  parameters (sum of nbytes)       {g(r['param_bytes'])}  ({r['param_leaves']} leaves)",
            f"  largest parameter                {g(r['largest_param_bytes'])}  {r['largest_param_shape']}",
            f"  RSS before load (jax imported)   {g(r['rss_before'])}",
            f"  peak - before, VmHWM             {g(r['peak_vmhwm_delta'])}  ratio {r['ratio_vmhwm']:.3f}"
            f"{'' if r['vmhwm_reset'] else '  (VmHWM not reset: includes the import peak)'}",
            f"  peak - before, ru_maxrss         {g(r['peak_maxrss_delta'])}  ratio {r['ratio_maxrss']:.3f}",
            f"  sampled peak RssAnon - before    {g(r['peak_anon_delta'])}  ratio {r['ratio_anon']:.3f}",
            f"  sampled peak RssFile - before    {g(r['peak_file_delta'])}  (mapped page-cache pages)",
            f"  RSS after load - before          {g(r['final_rss_delta'])}  "
            f"(anon {g(r['rss_anon_after'] - r['rss_anon_before'])}, "
            f"file {g(r['rss_file_after'] - r['rss_file_before'])})",
            f"  ratio = peak / (params + largest tensor {r['largest_tensor_bytes'] / GB:.3f} GB)",
        ]
        if r.get("note"):
            lines.append(f"  note: {r['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
