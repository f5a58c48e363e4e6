#!/usr/bin/env python
"""Generation benchmark: nemojax vs transformers' NemotronHForCausalLM, greedy, same random weights, one run,
set against the machine's measured memory-bandwidth and matmul-rate limits.

What runs (defaults): the MEDIUM config (tools/benchlib.py; hidden 1024, pattern ``MEMEM*EM``, 16 experts
top-6, vocab 32000), one random fp32 checkpoint (``nemojax.checkpoint.save_params``) loaded by both sides and cast
to each ``--dtype``; batch 1 with a 512-token random prompt and 128 new greedy tokens, and batch 8 (eight such
prompts, ``--no-batch8`` to skip). Every measurement runs in a fresh worker process pinned to the same
``--threads`` core(s) (``sched_setaffinity``), one thread per library (OMP/MKL/OpenBLAS = 1,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``, ``torch.set_num_threads(1)``).

nemojax (``nemojax.generate.generate_stream(..., chunk=--chunk, timings=...)``; ``--chunk 0``, the default,
is what ``Model.generate`` does without a callback: the whole decode is one jitted ``while_loop``):

* compile, reported apart: ``prefill.lower(...).compile()`` and ``decode.lower(...).compile()`` with the
  arguments ``generate_stream`` builds (trace+lower and XLA compile seconds each), then one warm-up generate
  with the same shapes (``max_new_tokens`` chosen in the same bucket, so the same two programs run);
  ``TRACE_COUNTS`` must not move during the warm-up and the timed runs (reported);
* then ``--repeats`` timed generates (``--repeats8`` at batch 8): prefill tok/s = prompt tokens / ``prefill_s``,
  decode tok/s = B x 128 / ``decode_s``, medians. The decode loop runs 128 iterations (sample, then one
  single-token forward; the last forward's logits go unused): 128 forwards for 128 tokens.

transformers (``tools/transformers_bench.py``: eager, ``dtype=``, ``time_step_limit = (0, inf)`` as in
tests/hf_reference.py): prefill tok/s from ``model(prompt, use_cache=True, logits_to_keep=1)``, median of
``--repeats`` forwards (one at batch 8: it takes longest); decode tok/s = B x 127 / (127 timed single-token steps
of a greedy loop from a copy of the post-prefill cache, token 1 being the argmax of the prefill logits), median
of ``--repeats`` (``--repeats8``) loops: per forward the same work as nemojax's figure.

llama.cpp (``--llamacpp f32,bf16,q8_0,q4_0``; tools/llamacpp_bench.py): the same checkpoint as GGUF files,
batch 1, prefill and greedy decode timed through llama-cpp-python's C API in the same pinned workers.

Correctness: greedy tokens of both sides are compared position by position (fp32 should agree: a sanity check).

Limits, measured in the same run on the same pinned core(s) (``benchlib.measure_limits``): the memory-copy
bandwidth of ``--copy-mb`` MiB (*bytes copied per second*, the primary definition), the pure-read bandwidth
(the fastest of numpy / jax / torch read probes), decode-style GEMVs (informational) and a ``--gemm-n``^3 GEMM
rate (numpy / jax / torch, fp32 and bf16). From them:

* decode limit (tok/s) = bandwidth / bytes touched per decoded token, from the config alone
  (``benchlib.decode_bytes``: weights touched once, the expected distinct routed experts at batch B, SSM states
  and conv windows read + written, the KV cache read up to the mean length plus the new K/V). "limit" uses the
  copy bandwidth, "stricter limit" the read bandwidth (higher, so a higher tokens/s bar);
* prefill limit (tok/s) = prompt tokens x GEMM rate / prefill FLOPs (``benchlib.prefill_flops``: lm_head for
  the last position only); the GEMM rate is the best median of the run's dtype;
* targets: decode >= 80 % of the bandwidth limit in fp32, prefill >= 60 % of the matmul-rate limit.

``--breakdown`` (on by default) also times, per batch size, one jitted decode step (cache at position prompt +
new/2), every block kind and parts of it, rotating over copies of the layer's weights (together >= 4x the
last-level cache), and lm_head; on the transformers side per-layer decode times via forward hooks.

Progress goes to stderr; stdout gets markdown tables, or with ``--json`` one JSON object.

Examples::

    python tools/bench_generate.py                       # the full default run (medium, fp32 + bf16, B=1 and 8)
    python tools/bench_generate.py --dtype float32 --no-batch8 --no-breakdown
    python tools/bench_generate.py --config tiny --new-tokens 16 --prompt-len 64    # a quick smoke test
    python tools/bench_generate.py --json > bench_generate.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import llamacpp_bench  # noqa: E402
import transformers_bench  # noqa: E402
from benchlib import (CONFIGS, compare_tokens, generation_cost_markdown, generation_limits, log,  # noqa: E402
                      median_time, median_time_rotating, pct, rate, tree_nbytes)

TARGET_DECODE_FP32 = 0.80  # of the bandwidth limit
TARGET_PREFILL = 0.60  # of the matmul-rate limit


# ====================================================================================== workers
def run_worker(kind: str, spec: dict, cores: list[int], threads: int, workdir: str) -> dict:
    return benchlib.run_worker(__file__, kind, spec, cores, threads, workdir)


# ---------------------------------------------------------------------------------------------- nemojax
def _bucket_shapes(gen, T: int, new: int, chunk: int) -> tuple[int, int, int]:
    """(bucketed prompt length, bucketed new tokens, decode steps per jitted call) as generate_stream does."""
    Tb = gen.bucket(T)
    new_b = gen.bucket(new, minimum=chunk) if chunk else gen.bucket(new)
    n_steps = min(chunk, new_b) if chunk else new_b
    return Tb, new_b, n_steps


def _padded_inputs(gen, cfg, ids, Tb):
    import numpy as np
    import jax.numpy as jnp

    B, T = ids.shape
    pad = cfg.pad_token_id or 0
    idp = np.concatenate([np.full((B, Tb - T), pad, ids.dtype), ids], 1)
    mask = np.concatenate([np.zeros((B, Tb - T), np.int32), np.ones((B, T), np.int32)], 1)
    return jnp.asarray(idp, jnp.int32), jnp.asarray(mask)


def _compute_dtype(params):
    """The activation / cache dtype generate_stream uses (``nemojax.model.compute_dtype`` where it exists)."""
    from nemojax import model

    fn = getattr(model, "compute_dtype", None)
    return fn(params) if fn else params["norm_f"].dtype


def nemojax_compile(params, cfg, ids, new: int, chunk: int) -> dict:
    """AOT lower + compile of prefill and decode with the arguments generate_stream passes (same jit caches)."""
    import numpy as np
    import jax
    import jax.numpy as jnp

    from nemojax import generate as gen
    from nemojax.cache import init_cache
    from nemojax.sampling import SamplingParams

    B, T = ids.shape
    Tb, new_b, n_steps = _bucket_shapes(gen, T, new, chunk)
    idj, maskj = _padded_inputs(gen, cfg, ids, Tb)
    cache = init_cache(cfg, B, Tb + new_b, _compute_dtype(params))
    out = {"prompt_bucket": Tb, "new_bucket": new_b, "steps_per_call": n_steps}
    t0 = time.perf_counter()
    lowered = gen.prefill.lower(params, cfg, idj, maskj, cache)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out["prefill_lower_s"], out["prefill_compile_s"] = t1 - t0, t2 - t1
    state = gen.DecodeState(jnp.zeros((B, cfg.vocab_size), jnp.float32), jnp.zeros((B,), bool), jnp.int32(0),
                            jax.random.PRNGKey(0))
    sp = SamplingParams.make(0.0, 0, 1.0)
    stops = jnp.asarray(np.full((getattr(gen, "_MAX_STOP", 8),), -1, np.int32))
    pad = cfg.pad_token_id or 0
    t0 = time.perf_counter()
    lowered = gen.decode.lower(params, cfg, n_steps, cache, state, sp, jnp.int32(new), stops, jnp.int32(pad))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    out["decode_lower_s"], out["decode_compile_s"] = t1 - t0, t2 - t1
    return out


def _generate(params, cfg, ids, new, chunk):
    import numpy as np

    from nemojax.generate import generate_stream

    tm = {}
    parts = list(generate_stream(params, cfg, ids, new, chunk=chunk, timings=tm))
    return np.concatenate(parts, axis=1), tm


def _trace_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def nemojax_generation(params, cfg, ids, new: int, repeats: int, chunk: int) -> tuple[dict, object]:
    from nemojax import generate as gen

    B, T = ids.shape
    res = {"batch": B, "prompt_len": T, "new_tokens": new, "chunk": chunk, "repeats": repeats}
    res["compile"] = c = nemojax_compile(params, cfg, ids, new, chunk)
    log(f"  nemojax B={B}: prefill trace+lower {c['prefill_lower_s']:.2f} s + XLA compile "
        f"{c['prefill_compile_s']:.2f} s; decode {c['decode_lower_s']:.2f} s + {c['decode_compile_s']:.2f} s")
    # warm-up: the same compiled programs (same prompt bucket, max_new_tokens in the same bucket)
    _, new_b, _ = _bucket_shapes(gen, T, new, chunk)
    warm_new = next(w for w in range(1, new + 1) if _bucket_shapes(gen, T, w, chunk)[1] == new_b)
    before = dict(gen.TRACE_COUNTS)
    t0 = time.perf_counter()
    _, tm = _generate(params, cfg, ids, warm_new, chunk)
    res["warmup"] = {"max_new_tokens": warm_new, "wall_s": time.perf_counter() - t0, "prefill_s": tm["prefill_s"],
                     "decode_s": tm["decode_s"], "retraces": _trace_delta(before, dict(gen.TRACE_COUNTS))}
    log(f"  nemojax B={B}: warm-up generate ({warm_new} new tokens) {res['warmup']['wall_s']:.2f} s, "
        f"retraces {res['warmup']['retraces'] or 'none'}")
    before = dict(gen.TRACE_COUNTS)
    pre, dec, toks = [], [], []
    for r in range(repeats):
        t, tm = _generate(params, cfg, ids, new, chunk)
        pre.append(tm["prefill_s"])
        dec.append(tm["decode_s"])
        toks.append(t)
        log(f"  nemojax B={B} run {r + 1}/{repeats}: prefill {tm['prefill_s']:.3f} s "
            f"({tm['prompt_tokens'] / tm['prefill_s']:,.0f} tok/s), decode {tm['decode_s']:.3f} s "
            f"({tm['new_tokens'] / tm['decode_s']:,.1f} tok/s)")
    res["retraces_timed"] = _trace_delta(before, dict(gen.TRACE_COUNTS))
    res["prefill_all_s"], res["decode_all_s"] = pre, dec
    res["prefill_s"], res["decode_s"] = statistics.median(pre), statistics.median(dec)
    res["prompt_tokens"], res["generated_tokens"] = tm["prompt_tokens"], tm["new_tokens"]
    res["decode_forwards"] = new  # the loop runs one forward per emitted token (the last one's logits unused)
    res["prefill_tok_s"] = tm["prompt_tokens"] / res["prefill_s"]
    res["decode_tok_s"] = tm["new_tokens"] / res["decode_s"]
    res["decode_ms_per_step"] = res["decode_s"] / new * 1e3
    res["repeats_identical"] = all((t == toks[0]).all() for t in toks)
    res["compile_est_from_warmup_s"] = {
        "prefill": res["warmup"]["prefill_s"] - res["prefill_s"],
        "decode": res["warmup"]["decode_s"] - res["decode_s"] * warm_new / new}
    return res, toks[0]


def nemojax_breakdown(params, cfg, ids, new: int, reps: int, l3: int) -> dict:
    """Decode-step times: the whole jitted step, every block kind and parts, lm_head (weights not cached)."""
    import numpy as np
    import jax
    import jax.numpy as jnp

    from nemojax import generate as gen
    from nemojax.cache import init_cache
    from nemojax.blocks import moe as moe_mod
    from nemojax.blocks.attention import attend
    from nemojax.blocks.mlp import mlp
    from nemojax.model import block, forward, lm_head
    from nemojax.ops import linear, relu2, rms_norm

    B, T = ids.shape
    Tb, new_b, _ = _bucket_shapes(gen, T, new, 0)
    dtype = _compute_dtype(params)
    idj, maskj = _padded_inputs(gen, cfg, ids, Tb)
    _, cache = gen.prefill(params, cfg, idj, maskj, init_cache(cfg, B, Tb + new_b, dtype))
    pos = Tb + new // 2
    cache = cache.replace(pos=jnp.int32(pos), mask=cache.mask.at[:, :pos].set(1))
    res = {"cache_len": Tb + new_b, "pos": pos, "pieces": {}}
    pieces = res["pieces"]

    def note(name, s, nbytes):
        pieces[name] = {"ms": s * 1e3, "bytes": nbytes, "gbs": nbytes / s / 1e9 if nbytes else None}
        bw = f", {nbytes / 1e6:7.1f} MB -> {nbytes / s / 1e9:5.1f} GB/s" if nbytes else ""
        log(f"  nemojax B={B} decode breakdown {name:<40} {s * 1e3:8.3f} ms{bw}")

    tok = jnp.asarray(ids[:, -1], jnp.int32)
    step = jax.jit(lambda p, c, t: forward(p, cfg, t[:, None], None, c, last_only=True))
    jax.block_until_ready(step(params, cache, tok))
    s, _ = median_time(lambda: jax.block_until_ready(step(params, cache, tok)), reps)
    res["step_ms"] = s * 1e3
    note("whole decode step (jit forward, no donation)", s, None)

    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((B, 1, cfg.hidden_size)), dtype)
    kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, jnp.ones((B, 1), jnp.int32), pos, axis=1)
    posj = jnp.int32(pos)
    res["block_ms"] = {}
    for kind in dict.fromkeys(cfg.pattern):
        i0 = cfg.pattern.index(kind)
        lp = params["layers"][i0]
        layer_bytes = tree_nbytes(lp)
        ncopy = int(min(16, max(2, math.ceil(4 * l3 / layer_bytes))))
        copies = [lp] + [jax.tree.map(lambda a: a.copy(), lp) for _ in range(ncopy - 1)]
        st = cache.layers[i0]
        f = jax.jit(lambda lp, h, st, posj, kvm, kind=kind: block(lp, cfg, kind, h, None, st, posj, kvm))
        t = median_time_rotating(f, [(c, h, st, posj, kv_mask) for c in copies], reps)
        x = jax.jit(lambda w, h: rms_norm(h, w, cfg.layer_norm_epsilon))(lp["norm"], h)
        xf = x.reshape(-1, cfg.hidden_size)
        m = lp["mixer"]
        st_bytes = 2 * tree_nbytes(st)
        if kind == "E":
            w, idx = jax.jit(lambda g, b, xf: moe_mod.route(g, b, cfg, xf))(m["gate"], m["e_score_correction_bias"], xf)
            uniq = sorted(set(np.asarray(idx).reshape(-1).tolist()))
            per_exp = tree_nbytes(m["experts"]) // cfg.n_routed_experts
            touched = layer_bytes - tree_nbytes(m["experts"]) + len(uniq) * per_exp
            note(f"block E (x{cfg.pattern.count('E')}; {len(uniq)} experts touched, {ncopy} weight copies)", t,
                 touched)
            tr = median_time_rotating(jax.jit(lambda g, b, xf: moe_mod.route(g, b, cfg, xf)),
                                [(c["mixer"]["gate"], c["mixer"]["e_score_correction_bias"], xf) for c in copies], reps)
            note("  E: router (fp32 gate + top-k)", tr, tree_nbytes(m["gate"]))
            tg = median_time_rotating(jax.jit(moe_mod.grouped_experts),
                                [(xf, w, idx, c["mixer"]["experts"]["up_proj"], c["mixer"]["experts"]["down_proj"])
                                 for c in copies], reps)
            note("  E: routed experts (grouped_experts)", tg, len(uniq) * per_exp)
            # the same routed work as one GEMV pair per touched expert on pre-sliced weights: the ideal
            comb = np.zeros((xf.shape[0], len(uniq)), np.float32)
            for r_, (ws, es) in enumerate(zip(np.asarray(w), np.asarray(idx))):
                for wv, e in zip(ws, es):
                    comb[r_, uniq.index(int(e))] += wv
            combj = jnp.asarray(comb)
            # separate 2-D arrays per expert (a dot on a slice of the stacked [E, F, H] array is not a plain GEMV
            # for XLA's CPU emitter)
            sel = [([c["mixer"]["experts"]["up_proj"][e].copy() for e in uniq],
                    [c["mixer"]["experts"]["down_proj"][e].copy() for e in uniq]) for c in copies]

            def ideal(xf, comb, ups, downs):
                acc = jnp.zeros(xf.shape, jnp.float32)
                for u, (up, down) in enumerate(zip(ups, downs)):
                    acc = acc + comb[:, u:u + 1] * linear(relu2(linear(xf, up)), down).astype(jnp.float32)
                return acc

            ti = median_time_rotating(jax.jit(ideal), [(xf, combj, u, d) for u, d in sel], reps)
            note("  E: same experts as plain GEMV pairs (ideal)", ti, len(uniq) * per_exp)
            if "shared_experts" in m:
                ts_ = median_time_rotating(jax.jit(mlp), [(c["mixer"]["shared_experts"], x) for c in copies], reps)
                note("  E: shared expert", ts_, tree_nbytes(m["shared_experts"]))
        elif kind == "M":
            note(f"block M (x{cfg.pattern.count('M')}; {ncopy} weight copies)", t, layer_bytes + st_bytes)
            ti = median_time_rotating(jax.jit(linear), [(x, c["mixer"]["in_proj"]) for c in copies], reps)
            note("  M: in_proj GEMV", ti, tree_nbytes(m["in_proj"]))
            g = jnp.asarray(rng.standard_normal((B, 1, cfg.mamba_d_inner)), dtype)
            to = median_time_rotating(jax.jit(linear), [(g, c["mixer"]["out_proj"]) for c in copies], reps)
            note("  M: out_proj GEMV", to, tree_nbytes(m["out_proj"]))
            note("  M: rest (norm, conv, SSM step, gated norm, residual)", max(t - ti - to, 0.0), None)
        elif kind == "*":
            note(f"block * (x{cfg.pattern.count('*')}; {ncopy} weight copies)", t,
                 layer_bytes + tree_nbytes(st) * (pos + 1) // cache.max_len)
            nq, nkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            q = jnp.asarray(rng.standard_normal((B, 1, nq, Dh)), dtype)
            S = cache.max_len
            allowed = (jnp.arange(S)[None, None, :] <= pos) & kv_mask.astype(bool)[:, None, :]
            ta = median_time_rotating(jax.jit(attend), [(q, st["k"], st["v"], allowed)], reps * len(copies))
            note(f"  *: attend over the whole cache (S={S})", ta, tree_nbytes(st))
        else:
            note(f"block {kind} (x{cfg.pattern.count(kind)}; {ncopy} weight copies)", t, layer_bytes + st_bytes)
        res["block_ms"][kind] = t * 1e3
    lm = jax.jit(lambda p, h: lm_head(p, cfg, h))
    jax.block_until_ready(lm(params, h))
    s, _ = median_time(lambda: jax.block_until_ready(lm(params, h)), reps)
    w_lm = params["embeddings"] if cfg.tie_word_embeddings else params["lm_head"]
    note("lm_head (norm_f + GEMV)", s, tree_nbytes(w_lm))
    res["lm_head_ms"] = s * 1e3
    res["sum_blocks_ms"] = sum(res["block_ms"][k] * cfg.pattern.count(k) for k in res["block_ms"]) + res["lm_head_ms"]
    log(f"  nemojax B={B}: sum of blocks + lm_head {res['sum_blocks_ms']:.2f} ms vs whole step {res['step_ms']:.2f} ms")
    return res


def worker_nemojax(spec: dict) -> dict:
    import numpy as np
    import jax

    import nemojax

    out = benchlib.worker_common() | {"jax_version": jax.__version__, "backend": jax.default_backend(),
                                      "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    model = nemojax.load(spec["folder"], dtype=spec["dtype"], progress=False)
    jax.block_until_ready(model.params)
    out["load_s"] = time.perf_counter() - t0
    cfg, params = model.config, model.params
    prompts = np.load(spec["prompts"])
    out["runs"] = {}
    for B in spec["batches"]:
        ids = prompts[:B]
        log(f"[{spec['dtype']}] nemojax batch {B}: prompt {ids.shape[1]}, {spec['new_tokens']} new tokens")
        r, toks = nemojax_generation(params, cfg, ids, spec["new_tokens"], spec["repeats"][str(B)], spec["chunk"])
        np.save(spec["tokens"][str(B)], toks)
        if spec["breakdown"]:
            r["breakdown"] = nemojax_breakdown(params, cfg, ids, spec["new_tokens"], spec["breakdown_repeats"],
                                               spec["l3_bytes"])
        out["runs"][str(B)] = r
    return out


WORKERS = {"limits": benchlib.measure_limits, "nemojax": worker_nemojax,
           "torch": transformers_bench.generation_worker, "llamacpp": llamacpp_bench.generation_worker}


# ====================================================================================== driver

def derive(cfg, dtype: str, B: int, T: int, new: int, rj: dict, rt: dict, limits: dict) -> dict:
    d = generation_limits(cfg, dtype, B, T, new, limits)
    db, dec_lim_copy, dec_lim_read = d["decode_bytes"], d["decode_limit_tok_s"], d["decode_limit_read_tok_s"]
    pre_lim = d["prefill_limit_tok_s"]
    for side, r in (("nemojax", rj), ("transformers", rt)):
        d[f"{side}_decode_frac"] = r["decode_tok_s"] / dec_lim_copy
        d[f"{side}_decode_frac_read"] = r["decode_tok_s"] / dec_lim_read
        d[f"{side}_prefill_frac"] = r["prefill_tok_s"] / pre_lim
        d[f"{side}_decode_gbs"] = r["decode_tok_s"] / B * db["total"] / 1e9
    d["decode_speedup"] = rj["decode_tok_s"] / rt["decode_tok_s"]
    d["prefill_speedup"] = rj["prefill_tok_s"] / rt["prefill_tok_s"]
    return d


def markdown(rep: dict) -> str:
    L = []
    env, lim = rep["env"], rep["limits"]
    L.append(f"## nemojax vs transformers: generation ({rep['config']} config, greedy, prompt {rep['prompt_len']}, "
             f"{rep['new_tokens']} new tokens)\n")
    L.append(f"CPU: {env['cpu'].get('model', '?')} ({env['cpu']['cpus']} cores visible, L3 "
             f"{lim['l3_bytes'] / 2 ** 20:.0f} MiB), pinned to core(s) {rep['cores']}, {rep['threads']} thread(s) "
             f"per library; jax {env['jax']}, torch {env['torch']}, transformers {env['transformers']} "
             f"(attn={env['hf_attn']}, experts={env['hf_experts']}). nemojax decode: chunk={rep['chunk']} "
             f"({'one jitted while_loop for all tokens' if rep['chunk'] == 0 else 'jitted chunks'}).\n")
    L.append("| dtype | B | phase | nemojax tok/s | transformers tok/s | nemojax / hf | limit tok/s | nemojax % "
             "| hf % | stricter limit tok/s | nemojax % / hf % of stricter | target |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rep["results"]:
        j, t, d = r["nemojax"], r["transformers"], r["derived"]
        tgt = f">= {pct(TARGET_PREFILL)}"
        L.append(f"| {r['dtype']} | {r['batch']} | prefill | {rate(j['prefill_tok_s'])} | {rate(t['prefill_tok_s'])} "
                 f"| {d['prefill_speedup']:.2f}x | {rate(d['prefill_limit_tok_s'])} (GEMM "
                 f"{d['gemm_limit_gflops']:.0f} GFLOP/s) | {pct(d['nemojax_prefill_frac'])} "
                 f"| {pct(d['transformers_prefill_frac'])} | | | {tgt} |")
        tgt = f">= {pct(TARGET_DECODE_FP32)}" if r["dtype"] == "float32" and r["batch"] == 1 else ""
        L.append(f"| {r['dtype']} | {r['batch']} | decode | {rate(j['decode_tok_s'])} | {rate(t['decode_tok_s'])} "
                 f"| {d['decode_speedup']:.2f}x | {rate(d['decode_limit_tok_s'])} (copy BW) "
                 f"| {pct(d['nemojax_decode_frac'])} | {pct(d['transformers_decode_frac'])} "
                 f"| {rate(d['decode_limit_read_tok_s'])} (read BW) | {pct(d['nemojax_decode_frac_read'])} / "
                 f"{pct(d['transformers_decode_frac_read'])} | {tgt} |")
    L.append("")
    L.append("prefill tok/s = prompt tokens / prefill seconds (median); decode tok/s: nemojax B x "
             f"{rep['new_tokens']} tokens / decode_s ({rep['new_tokens']} loop iterations, one forward each), "
             f"transformers B x {rep['new_tokens'] - 1} / the {rep['new_tokens'] - 1} timed single-token steps "
             "(token 1 comes from the prefill logits). Decode limit = bandwidth / bytes touched per step (table "
             "below); 'limit' uses the memory-copy bandwidth (bytes copied per second), the stricter one the "
             "pure-read bandwidth. Prefill limit = prompt tokens x GEMM rate / prefill FLOPs. Targets (the "
             "generation issue): decode >= 80% of the bandwidth limit in fp32, prefill >= 60% of the "
             "matmul-rate limit.")
    b8 = [r for r in rep["results"] if r["batch"] > 1]
    if b8:
        L.append("")
        L.append("| dtype | B | nemojax decode tok/s | hf decode tok/s | nemojax / hf | nemojax B / B=1 decode "
                 "| hf B / B=1 decode | roofline tok/s (bytes at copy BW, FLOPs at GEMM rate) "
                 "| nemojax % of roofline |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in b8:
            one = next((x for x in rep["results"] if x["dtype"] == r["dtype"] and x["batch"] == 1), None)
            j, t, d = r["nemojax"], r["transformers"], r["derived"]
            rj = f"{j['decode_tok_s'] / one['nemojax']['decode_tok_s']:.2f}x" if one else ""
            rt = f"{t['decode_tok_s'] / one['transformers']['decode_tok_s']:.2f}x" if one else ""
            L.append(f"| {r['dtype']} | {r['batch']} | {rate(j['decode_tok_s'])} | {rate(t['decode_tok_s'])} "
                     f"| {d['decode_speedup']:.2f}x | {rj} | {rt} | {rate(d['decode_roofline_tok_s'])} "
                     f"| {pct(j['decode_tok_s'] / d['decode_roofline_tok_s'])} |")
    L.append("")
    L.append("Compile and correctness:\n")
    L.append("| dtype | B | prefill: trace+lower / XLA compile s | decode: trace+lower / XLA compile s "
             "| warm-up generate s (new tokens) | steady generate s | retraces warm-up / timed "
             "| greedy tokens equal to transformers | identical prefix (min over rows) | nemojax ms/step "
             "| hf ms/step |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rep["results"]:
        j, t, c = r["nemojax"], r["transformers"], r["nemojax"]["compile"]
        w = j["warmup"]
        L.append(f"| {r['dtype']} | {r['batch']} | {c['prefill_lower_s']:.2f} / {c['prefill_compile_s']:.2f} "
                 f"| {c['decode_lower_s']:.2f} / {c['decode_compile_s']:.2f} | {w['wall_s']:.2f} "
                 f"({w['max_new_tokens']}) | {j['prefill_s'] + j['decode_s']:.2f} "
                 f"| {w['retraces'] or 'none'} / {j['retraces_timed'] or 'none'} "
                 f"| {r['tokens']['match']} of {r['tokens']['total']} | {r['tokens']['identical_prefix_min']} "
                 f"| {j['decode_ms_per_step']:.2f} | {t['decode_ms_per_step']:.2f} |")
    if "batch_invariance" in rep:
        L.append("")
        L.append("nemojax batch invariance (row 0 of batch 8 vs batch 1, same prompt): "
                 + ", ".join(f"{k} {v['match']} of {v['total']}" for k, v in rep["batch_invariance"].items()) + ".")
    L.append("")
    L += benchlib.limits_markdown(lim, rep["threads"])
    L.append("")
    L += generation_cost_markdown(rep["results"])
    if any("breakdown" in r["nemojax"] for r in rep["results"]):
        L.append("")
        L.append("Decode-step breakdown (weights not cache-resident: each piece rotates over distinct weight copies "
                 "totalling >= 4x L3; 'block' = norm + mixer + residual; GB/s = bytes touched / time):\n")
        for r in rep["results"]:
            bj, bt = r["nemojax"].get("breakdown"), r["transformers"].get("breakdown")
            if not bj:
                continue
            L.append(f"{r['dtype']}, B={r['batch']}: nemojax in-loop {r['nemojax']['decode_ms_per_step']:.2f} ms/step, "
                     f"one jitted step {bj['step_ms']:.2f} ms, sum of blocks x count + lm_head "
                     f"{bj['sum_blocks_ms']:.2f} ms; transformers {r['transformers']['decode_ms_per_step']:.2f} ms/step"
                     + (f" (hooks: other {bt['other_ms']:.2f} ms)" if bt else "") + ".\n")
            L.append("| piece | nemojax ms | MB touched | nemojax GB/s | transformers ms |")
            L.append("|---|---|---|---|---|")
            for name, p in bj["pieces"].items():
                hf = ""
                if bt:
                    if name.startswith("block "):
                        hf = f"{bt['block_ms'].get(name.split()[1], float('nan')):.3f}"
                    elif name.startswith("lm_head"):
                        hf = f"{bt['lm_head_ms']:.3f}"
                    elif name.startswith("whole"):
                        hf = f"{bt['step_ms']:.3f}"
                mb = f"{p['bytes'] / 1e6:.1f}" if p["bytes"] else ""
                gbs = f"{p['gbs']:.1f}" if p["gbs"] else ""
                L.append(f"| {name} | {p['ms']:.3f} | {mb} | {gbs} | {hf} |")
            L.append("")
    L += llamacpp_bench.markdown(rep.get("llamacpp", []), rep["threads"])
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Benchmark greedy generation (prefill and decode tokens/s) of nemojax against transformers' "
                    "NemotronHForCausalLM on the same random weights, pinned to the same CPU core(s), and set both "
                    "against the machine's memory-bandwidth (decode) and GEMM-rate (prefill) limits measured in "
                    "the same run. See the module docstring for exactly what is timed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="medium",
                    help="medium = hidden 1024, 'MEMEM*EM', 16 experts top-6, vocab 32000; tiny = tests' TINY "
                         "(smoke test)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both",
                    help="weight dtype on both sides (the checkpoint is written in fp32 and cast at load)")
    ap.add_argument("--prompt-len", type=int, default=512, help="random prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate per sequence")
    ap.add_argument("--batch8", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure batch --batch8-size (decode throughput)")
    ap.add_argument("--batch8-size", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3,
                    help="batch 1: timed nemojax generates; transformers prefill forwards and decode loops")
    ap.add_argument("--repeats8", type=int, default=2,
                    help="batch 8: timed nemojax generates and transformers decode loops (transformers prefill: 1)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="nemojax decode tokens per jitted call (0: the whole decode in one call, as generate())")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one decode step, every block kind and lm_head (nemojax), per-layer decode "
                         "times via hooks (transformers)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per library; the workers are pinned to this many cores of the allowed set")
    ap.add_argument("--cores", type=str, default=None,
                    help="comma-separated CPU ids to pin to (default: the first --threads allowed cores)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (prompts use seed + 1)")
    ap.add_argument("--hf-experts-impl", default=None,
                    help="transformers experts_implementation to request (default: transformers' own choice)")
    ap.add_argument("--gemm-n", type=int, default=1024, help="GEMM size for the matmul-rate limit")
    ap.add_argument("--copy-mb", type=int, default=512, help="buffer size (MiB) for the bandwidth probes")
    ap.add_argument("--llamacpp", default="", help="also run llama.cpp (llama-cpp-python) on the same weights as "
                    f"these comma-separated GGUF types ({', '.join(llamacpp_bench.GGUF_TYPES)}), batch 1")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all results instead of tables")
    ap.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        benchlib.worker_main(WORKERS, args._worker, args._spec)
        return 0
    if min(args.prompt_len, args.new_tokens, args.repeats, args.repeats8, args.batch8_size) < 1 or args.chunk < 0:
        ap.error("--prompt-len, --new-tokens, --repeats, --repeats8 must be positive and --chunk >= 0")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (transformers' decode is timed over new_tokens - 1 steps)")
    gguf_types = llamacpp_bench.parse_types(ap, args.llamacpp, CONFIGS[args.config])
    cores = benchlib.pick_cores(ap, args.threads, args.cores)
    benchlib.set_driver_env(args.threads)

    import numpy as np

    from nemojax import Config

    cfg = Config.from_dict(CONFIGS[args.config])
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        ap.error(f"--prompt-len + --new-tokens exceeds max_position_embeddings {cfg.max_position_embeddings}")
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    batches = [1] + ([args.batch8_size] if args.batch8 and args.batch8_size > 1 else [])
    repeats = {"1": args.repeats} | {str(b): args.repeats8 for b in batches if b > 1}
    T, N = args.prompt_len, args.new_tokens
    t_start = time.perf_counter()
    rep = {"argv": sys.argv[1:], "config": args.config, "prompt_len": T, "new_tokens": N, "chunk": args.chunk,
           "cores": cores, "threads": args.threads, "batches": batches, "repeats": repeats, "results": []}
    with tempfile.TemporaryDirectory(prefix="nemojax_bench_gen_") as work:
        log(f"machine limits on core(s) {cores}")
        limits = run_worker("limits", {"gemm_n": args.gemm_n, "gemm_repeats": 10, "copy_mb": args.copy_mb,
                                       "copy_repeats": 9}, cores, args.threads, work)
        rep["limits"] = limits
        folder = os.path.join(work, "ckpt")
        log(f"[{args.config}] writing random fp32 checkpoint (seed {args.seed})")
        t0 = time.perf_counter()
        benchlib.build_checkpoint(CONFIGS[args.config], folder, args.seed)
        log(f"[{args.config}] checkpoint written in {time.perf_counter() - t0:.1f} s")
        rng = np.random.default_rng(args.seed + 1)
        prompts = rng.integers(3, cfg.vocab_size, size=(max(batches), T)).astype(np.int32)
        ppath = os.path.join(work, "prompts.npy")
        np.save(ppath, prompts)
        invariance = {}
        for dtype in dtypes:
            tok = {side: {str(b): os.path.join(work, f"tokens_{side}_{dtype}_{b}.npy") for b in batches}
                   for side in ("nemojax", "torch")}
            common = {"folder": folder, "prompts": ppath, "dtype": dtype, "batches": batches, "new_tokens": N,
                      "repeats": repeats, "chunk": args.chunk, "breakdown": args.breakdown,
                      "breakdown_repeats": 10, "l3_bytes": limits["l3_bytes"],
                      "hf_experts_impl": args.hf_experts_impl}
            rj = run_worker("nemojax", common | {"tokens": tok["nemojax"]}, cores, args.threads, work)
            rt = run_worker("torch", common | {"tokens": tok["torch"]}, cores, args.threads, work)
            rep.setdefault("workers", {})[dtype] = {
                "nemojax": {k: v for k, v in rj.items() if k != "runs"},
                "transformers": {k: v for k, v in rt.items() if k != "runs"}}
            toks = {side: {b: np.load(tok[side][str(b)]) for b in batches} for side in tok}
            for b in batches:
                j, t = rj["runs"][str(b)], rt["runs"][str(b)]
                res = {"dtype": dtype, "batch": b, "nemojax": j, "transformers": t,
                       "tokens": compare_tokens(toks["nemojax"][b], toks["torch"][b]),
                       "derived": derive(cfg, dtype, b, T, N, j, t, limits)}
                d = res["derived"]
                log(f"[{dtype} B={b}] prefill tok/s nemojax {j['prefill_tok_s']:,.0f} / hf {t['prefill_tok_s']:,.0f} "
                    f"(limit {d['prefill_limit_tok_s']:,.0f}); decode tok/s nemojax {j['decode_tok_s']:,.1f} / hf "
                    f"{t['decode_tok_s']:,.1f} (limit {d['decode_limit_tok_s']:,.1f} copy BW, "
                    f"{d['decode_limit_read_tok_s']:,.1f} read BW); greedy tokens equal "
                    f"{res['tokens']['match']}/{res['tokens']['total']}")
                rep["results"].append(res)
            if len(batches) > 1:
                invariance[dtype] = compare_tokens(toks["nemojax"][batches[1]][:1], toks["nemojax"][1])
        if invariance:
            rep["batch_invariance"] = invariance
        if gguf_types:
            rep["llamacpp"] = llamacpp_bench.run(run_worker, gguf_types, folder, ppath, rep, work)
    w = rep["workers"][dtypes[0]]
    rep["env"] = {"cpu": benchlib.cpu_info(), "jax": w["nemojax"]["jax_version"],
                  "torch": w["transformers"]["torch_version"],
                  "transformers": w["transformers"]["transformers_version"],
                  "hf_attn": w["transformers"]["attn_implementation"],
                  "hf_experts": w["transformers"]["experts_implementation"]}
    rep["wall_s"] = time.perf_counter() - t_start
    log(f"done in {rep['wall_s']:.0f} s")
    print(json.dumps(rep, indent=1) if args.json else markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
