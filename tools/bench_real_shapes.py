#!/usr/bin/env python
"""Load, prefill and decode a checkpoint of any size on this machine, with the figures of a real-shape run:
load seconds, resident memory after each stage (anonymous and file-backed apart: mapped weights are file pages),
chunked-prefill tok/s of a long random prompt, greedy decode tok/s, and the decode limit measured in the same
run (bytes a decode step must read / the memory-copy bandwidth of this machine).

    python tools/bench_real_shapes.py CKPT [--mmap] [--expert-cache N] [--prompt-len 4096] [--chunk 512]
                                           [--new-tokens 8] [--backend auto] [--disk-mb M] [--serve N] [--json]

CKPT is any Nemotron-H checkpoint folder (``tools/make_random_checkpoint.py`` writes real-shape ones). Prefill
runs the prompt through ``nemojax.model.forward`` ``--chunk`` tokens at a time into one cache (memory bounded by
the chunk, as a server prefills); decode runs ``--new-tokens`` single-token forwards (greedy). With
``--expert-cache N`` the routed experts run from host memory behind N slots per MoE layer
(``nemojax.experts.offload``); with ``--mmap`` the weights stay memory-mapped from the files.

Bytes per decode step: every non-routed parameter once (the embedding: one row), plus top-k experts per MoE
layer, at their stored size (quantized weights: their packed bytes).

``--serve N`` then runs the serving engine (``nemojax.serve.Engine``, what ``nemojax serve`` drives) on the same
loaded model: N requests of ``--serve-prompt`` random tokens submitted at once, ``--serve-new`` greedy tokens
each; start-up (compilation), TTFT and output tok/s over all N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def memory() -> dict:
    """Resident memory now (GiB): anonymous, file-backed, total; and the peak so far (ru_maxrss)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(val.split()[0]) / 2 ** 20
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


def log(msg: str) -> None:
    print(f"[real shapes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step_bytes(model) -> float:
    """Bytes one batch-1 decode step reads: non-routed parameters once (embedding: one row), top-k experts."""
    import jax

    cfg, params = model.config, model.params
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        nb = leaf.nbytes
        if "'embeddings'" in name:
            nb = nb // cfg.vocab_size
        elif "'experts'" in name:  # resident bank [E, ...]: top-k of its experts
            nb = nb * cfg.num_experts_per_tok // cfg.n_routed_experts
        total += nb
    if model.experts is not None and getattr(model.experts, "host_driven", False):
        total += sum(cfg.num_experts_per_tok * layer.expert_bytes for layer in model.experts.layers.values())
    return float(total)


def disk_bandwidth(ckpt: str, nbytes: int) -> dict:
    """Sequential read rate of the largest shard's first ``nbytes`` (GB/s), its pages dropped first
    (``posix_fadvise(DONTNEED)``: only pages no process maps leave the cache, so call this before loading)."""
    shards = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    path = max(shards, key=os.path.getsize)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = min(nbytes, os.fstat(fd).st_size)
        os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
        t0, off = time.perf_counter(), 0
        while off < n:
            off += len(os.pread(fd, min(64 << 20, n - off), off))
        dt = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"file": os.path.basename(path), "nbytes": n, "s": dt, "gb_s": n / dt / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--mmap", action="store_true", help="keep the weights memory-mapped from the files")
    ap.add_argument("--expert-cache", type=int, default=None, help="device slots per MoE layer (offload)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backend", default="auto", help="quantized matmuls' kernels (nemojax.load backend=)")
    ap.add_argument("--disk-mb", type=int, default=0,
                    help="also measure the disk's read bandwidth on this many MiB of the largest shard (its pages "
                         "dropped from the page cache first): the limit when weights stream from disk")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--copy-mb", type=int, default=1024, help="buffer for the bandwidth probe (MiB)")
    ap.add_argument("--serve", type=int, default=0, help="then N concurrent requests through the serving engine")
    ap.add_argument("--serve-prompt", type=int, default=128, help="prompt tokens per --serve request")
    ap.add_argument("--serve-new", type=int, default=8, help="new tokens per --serve request")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if min(a.prompt_len, a.chunk, a.new_tokens) < 1:
        ap.error("--prompt-len, --chunk and --new-tokens must be >= 1")

    import jax
    import jax.numpy as jnp
    import numpy as np

    import nemojax
    from nemojax.cache import init_cache
    from nemojax.model import forward, forward_jit

    rep = {"ckpt": os.path.abspath(a.ckpt), "mmap": a.mmap, "expert_cache": a.expert_cache, "dtype": a.dtype,
           "backend": a.backend,
           "prompt_len": a.prompt_len, "chunk": a.chunk, "new_tokens": a.new_tokens, "cpus": os.cpu_count()}
    rep["bandwidth"] = benchlib.copy_bandwidth(a.copy_mb, 3)
    if a.disk_mb:
        rep["disk"] = disk_bandwidth(a.ckpt, a.disk_mb << 20)
        log(f"disk read {rep['disk']['gb_s']:.2f} GB/s")
    rep["memory_start"] = memory()
    log(f"loading {a.ckpt} (mmap={a.mmap})")
    t0 = time.perf_counter()
    kw = {"mmap": True} if a.mmap else {}
    model = nemojax.load(a.ckpt, dtype=a.dtype, progress=False, backend=a.backend, **kw)
    if a.expert_cache is not None:
        model = model.offload(a.expert_cache)
    jax.block_until_ready(model.params)
    rep["load_s"] = time.perf_counter() - t0
    rep["memory_loaded"] = memory()
    log(f"loaded in {rep['load_s']:.1f} s; {rep['memory_loaded']}")
    cfg = model.config
    host = model.experts is not None and model.experts.host_driven
    run = (lambda *x, **k: forward(*x, experts=model.experts, **k)) if host else forward_jit
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, a.prompt_len)).astype(np.int32)
    cache = init_cache(cfg, 1, a.prompt_len + a.new_tokens, dtype=jnp.dtype(a.dtype))
    t0 = time.perf_counter()
    firsts = []
    for i in range(0, a.prompt_len, a.chunk):
        c0 = time.perf_counter()
        logits, cache = run(model.params, cfg, jnp.asarray(ids[:, i:i + a.chunk]), None, cache, last_only=True)
        jax.block_until_ready(logits)
        firsts.append(time.perf_counter() - c0)
        log(f"prefill {min(i + a.chunk, a.prompt_len)}/{a.prompt_len} tokens, chunk {firsts[-1]:.1f} s")
    rep["prefill_s"] = time.perf_counter() - t0
    rep["prefill_chunk_s"] = firsts
    rep["prefill_tok_s"] = a.prompt_len / rep["prefill_s"]
    rep["memory_prefill"] = memory()
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
    steps = []
    for i in range(a.new_tokens):
        t1 = time.perf_counter()
        logits, cache = run(model.params, cfg, tok, None, cache, last_only=True)
        tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        jax.block_until_ready(tok)
        steps.append(time.perf_counter() - t1)
        log(f"decode step {i + 1}/{a.new_tokens}: {steps[-1]:.2f} s")
    timed = steps[1:] or steps  # the first step compiles
    rep["decode_step_s"] = steps
    rep["decode_tok_s"] = 1.0 / float(np.median(timed))
    rep["memory_end"] = memory()
    rep["step_bytes"] = step_bytes(model)
    bw = rep["bandwidth"]["nbytes"] / rep["bandwidth"]["s_median"]  # bytes copied per second
    rep["decode_limit_tok_s"] = bw / rep["step_bytes"]
    rep["decode_frac"] = rep["decode_tok_s"] / rep["decode_limit_tok_s"]
    if host:
        rep["routed_step_bytes"] = float(sum(cfg.num_experts_per_tok * layer.expert_bytes
                                             for layer in model.experts.layers.values()))
    if a.disk_mb and host:  # every routed expert of a step read from disk: the floor when nothing is cached
        rep["decode_limit_disk_tok_s"] = rep["disk"]["gb_s"] * 1e9 / rep["routed_step_bytes"]
    if host:
        rep["expert_cache_stats"] = model.experts.stats.summary()
        rep["expert_slot_bytes"] = model.experts.slot_bytes  # allocated when a forward first needs them
    del cache, logits
    if a.serve:
        rep["serve"] = serve(model, a.serve, a.serve_prompt, a.serve_new, min(a.chunk, a.serve_prompt))
        rep["memory_end"] = memory()
    if a.json:
        print(json.dumps(rep, indent=1, default=float))
        return 0
    m = rep["memory_end"]
    print(f"| checkpoint | mmap | expert cache | load s | RSS after load (anon / file) GiB | peak RSS GiB "
          f"| prefill {a.prompt_len} tok/s | decode tok/s | limit tok/s | % of limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ml = rep["memory_loaded"]
    print(f"| {os.path.basename(rep['ckpt'])} | {a.mmap} | {a.expert_cache} | {rep['load_s']:.1f} "
          f"| {ml['RssAnon']:.2f} / {ml['RssFile']:.2f} | {m['peak']:.2f} | {rep['prefill_tok_s']:.1f} "
          f"| {rep['decode_tok_s']:.3f} | {rep['decode_limit_tok_s']:.2f} | {100 * rep['decode_frac']:.0f}% |")
    print(f"\nbytes per decode step {rep['step_bytes'] / 1e9:.2f} GB; copy bandwidth {bw / 1e9:.1f} GB/s")
    if "decode_limit_disk_tok_s" in rep:
        print(f"routed experts per step {rep['routed_step_bytes'] / 1e9:.2f} GB; disk read {rep['disk']['gb_s']:.2f} "
              f"GB/s: {rep['decode_limit_disk_tok_s']:.3f} tok/s with every routed expert read from disk")
    if a.serve:
        r = rep["serve"]
        print(f"\nserving engine, {a.serve} requests x ({a.serve_prompt} prompt + {a.serve_new} new tokens): start "
              f"{r['start_s']:.1f} s, TTFT first / last {r['ttft_first']:.1f} / {r['ttft_last']:.1f} s, "
              f"{r['tok_s']:.3f} output tok/s (every request its {a.serve_new} tokens); peak RSS {m['peak']:.2f} GiB")
    return 0


def serve(model, n: int, prompt: int, new: int, chunk: int) -> dict:
    """``n`` requests submitted at once to a started ``Engine`` (``bench_engine.measure``): start-up s, TTFTs,
    output tok/s."""
    import numpy as np

    from bench_engine import measure
    from nemojax.serve import Engine

    eng = Engine(model, max_num_seqs=n, max_model_len=prompt + new + 8, chunk=chunk, prefix_cache_bytes=0)
    t0 = time.perf_counter()
    eng.start()
    start_s = time.perf_counter() - t0
    log(f"serving engine started in {start_s:.1f} s")
    rng = np.random.default_rng(1)
    try:
        return {"start_s": start_s, **measure(eng, [rng.integers(3, model.config.vocab_size, prompt).tolist()
                                                    for _ in range(n)], new, timeout=None)}
    finally:
        eng.stop()

if __name__ == "__main__":
    sys.exit(main())
