#!/usr/bin/env python
"""Expert-offload benchmark: policy hit rates on routing traces, decode speed with the cache, and a PCIe model
of the real 30B-A3B on a 24 GB GPU.

1. Hit rate and misses (bytes) per token for every policy and cache size on
   * synthetic traces at the real scale (128 experts, top-6, 23 MoE layers): Zipf popularity + temporal locality;
   * a trace recorded from the bundled trained model (16 experts, top-2, 3 MoE layers) answering chat prompts.
2. Decode tok/s with the cache vs fully resident (random weights, ``--config medium`` by default).
3. The 30B model: per-token transfer time = misses/token x bytes/expert / PCIe bandwidth on top of the
   resident compute time, for the BF16 cache 8 of the vLLM expert-offload pull request (its LFRU) and for 4.5-bit
   (NVFP4) / 5-bit (HLWQ Q5) experts with ``adaptive`` at the same VRAM; compared with that pull request's reported
   16.4 tok/s.

    python tools/bench_offload.py [--tokens 400] [--config medium] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for p in (_REPO, _HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

SIZES = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
# the real 30B-A3B: bytes per routed expert in each format, non-expert weights in GB
EXPERT_BYTES = {"bf16": 19.96e6, "nvfp4": 1856 * 2688 * 2 * (0.5 + 1 / 16) + 8, "hlwq-q5": 6.50e6}
NON_EXPERT_GB = 4.40
FULL_BF16_TOKS = 54.5  # vLLM expert-offload PR, resident BF16 (92 GB), tok/s
VLLM_CACHE8_TOKS = 16.4  # vLLM expert-offload PR, cache 8, LFRU, BF16 slots
PCIE = {"pcie4": 25e9, "pcie5": 50e9}  # pinned host->device bytes/s (x16, typical achieved)


def log(msg):
    print(f"[bench_offload] {msg}", file=sys.stderr, flush=True)


def policy_table(trace, n_experts, sizes, policies):
    from nemojax.experts.policies.simulate import simulate

    rows = []
    for n in sizes:
        if n > n_experts:
            continue
        rows.append({"slots": n, **{p: simulate(trace, n_experts, n, p) for p in policies}})
    return rows


def recorded_trace(max_new: int, n_prompts: int = 24):
    """Per-token routing of the bundled model answering ``n_prompts`` arithmetic chat prompts in turn (batch 1)."""
    import numpy as np

    from nemojax import api
    from nemojax.tokenizer import Tokenizer

    folder = os.path.join(_REPO, "nemojax", "default_model")
    model, tok = api.load(folder, progress=False), Tokenizer(folder)
    rng = np.random.default_rng(1)
    qs = []
    for i in range(n_prompts):
        a, b = (int(v) for v in rng.integers(10, 999, 2))
        qs.append(f"Which is larger, {a} or {b}?" if i % 4 == 3 else f"What is {a} {'+-*'[i % 4]} {b}?")
    per_token = []
    off = model.offload(model.config.n_routed_experts, "lru", prefetch=False)
    for n, q in enumerate(qs, 1):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
        rec: list = []
        off.experts.trace = rec  # (layer, expert ids) per MoE block of each forward
        off.generate([ids], max_new, stop_token_ids=tok.stop_token_ids[:8])
        off.experts.trace = None
        layers = sorted({i for i, _ in rec})
        for t in range(1, len(rec) // len(layers)):  # skip the prefill forward
            per_token.append([[e for row in rec[t * len(layers) + j][1] for e in row] for j in range(len(layers))])
        log(f"recorded prompt {n}/{len(qs)}: {len(per_token)} tokens")
    return per_token, model.config.n_routed_experts


def decode_speed(cfg_name: str, slots: list[int], new: int):
    import jax
    import numpy as np

    import benchlib
    from nemojax.config import Config
    from nemojax.generate import generate
    from nemojax.experts.offload import offload_experts
    from nemojax.params import init_params

    cfg = Config.from_dict(benchlib.CONFIGS[cfg_name])
    params = init_params(cfg, 0, dtype="float32")  # fp32: the offloaded tokens must equal the resident ones
    prompt = [list(np.random.default_rng(0).integers(3, cfg.vocab_size, 32))]
    generate(params, cfg, prompt, new)  # compile
    t0 = time.perf_counter()
    ref = generate(params, cfg, prompt, new)
    resident = new / (time.perf_counter() - t0)
    rows = [{"slots": "resident", "tok_s": resident}]
    for n in slots:
        off_params, experts = offload_experts(params, cfg, n, "adaptive")
        generate(off_params, cfg, prompt, 4, experts=experts)  # compile the pieces
        experts.reset_stats()
        t0 = time.perf_counter()
        out = generate(off_params, cfg, prompt, new, experts=experts)
        dt = time.perf_counter() - t0
        rows.append({"slots": n, "tok_s": new / dt, "same_tokens": bool((out == ref).all()),
                     **experts.stats.summary()})
        log(f"decode with {n} slots: {new / dt:.1f} tok/s")
    del jax
    return rows


def non_expert_bytes(fmt: str) -> float:
    """Weights other than the routed experts of the 30B-A3B (the real config's shapes), as its checkpoints
    store them: bf16; NVFP4 as published for Nano (Mamba in/out projections except the 6 before an attention
    layer, and the shared experts, in NVFP4; attention, embeddings, lm_head, routers bf16); HLWQ Q5 layout B
    (every linear incl. embeddings / lm_head: 5-bit codes + an fp16 norm per 128; routers bf16)."""
    h, v = 2688, 131072
    mamba = 10304 * h + h * 4096  # in_proj + out_proj, per Mamba layer
    emb, attn, shared, router = 2 * v * h, 6 * (2 * 4096 * h + 2 * 256 * h), 23 * 2 * 3712 * h, 23 * 128 * h
    total = emb + 23 * mamba + attn + shared + router
    if fmt == "bf16":
        return 2.0 * total
    if fmt == "nvfp4":
        q = 17 * mamba + shared
        return q * (0.5 + 1 / 16) + 2.0 * (total - q)
    if fmt == "hlwq-q5":
        return (total - router) * (5 / 8 + 2 / 128) + 2.0 * router
    raise ValueError(fmt)


def pcie_model(trace, synthetic_rows):
    """Modeled decode tok/s of the 30B on a 24 GB card from simulated misses/token (128 experts, 23 layers).

    Per token: resident compute + misses x bytes per expert / bandwidth + the policy's host time choosing victims
    (measured by the simulator on this machine; its end-of-forward bookkeeping is assumed to overlap the device).
    The vLLM expert-offload pull request: BF16 slots, cache 8, its LFRU (what it reports 16.4 tok/s with; LRU also
    given). ``adaptive`` at equal VRAM, two ways: ``slots`` — the same 3.67 GB of expert slots (non-expert weights
    left aside); ``vram`` — the same weight memory as the pull request's (non-expert bf16 + 8 BF16 slots = 8.08 GB)
    with the 4-5-bit checkpoint as published, whose non-expert weights are quantized too."""
    from nemojax.experts.policies.simulate import simulate

    by = {r["slots"]: r for r in synthetic_rows}

    def sim(n, policy):
        if n not in by:
            by[n] = {"slots": n}
        if policy not in by[n]:
            by[n][policy] = simulate(trace, 128, n, policy)
        return by[n][policy]

    def seconds(n, policy, fmt, bw):  # per token: compute + misses over the link + the policy's decisions on the host
        r = sim(n, policy)
        return t_compute + r["misses_per_token"] * EXPERT_BYTES[fmt] / bw + r["decide_us"] * 1e-6

    t_compute = 1.0 / FULL_BF16_TOKS
    slot_bytes = 8 * 23 * EXPERT_BYTES["bf16"]  # the vLLM PR's slot memory at cache 8 (BF16)
    weight_bytes = non_expert_bytes("bf16") + slot_bytes
    out = []
    for link, bw in PCIE.items():
        vllm = 1 / seconds(8, "lfru-vllm", "bf16", bw)
        row = {"link": link, "vllm_lfru8_bf16_modeled": vllm,
               "vllm_lru8_bf16_modeled": 1 / seconds(8, "lru", "bf16", bw)}
        for fmt in ("nvfp4", "hlwq-q5"):
            for way, budget in (("slots", slot_bytes), ("vram", weight_bytes - non_expert_bytes(fmt))):
                n = int(budget // (23 * EXPERT_BYTES[fmt]))
                tps = {p: 1 / seconds(n, p, fmt, bw) for p in ("adaptive", "lfru-polarquant")}
                row[f"{fmt}_{way}"] = {"slots": n, "hit_rate": by[n]["adaptive"]["hit_rate"], "tok_s": tps["adaptive"],
                                       "decide_ms": by[n]["adaptive"]["decide_us"] / 1e3,
                                       "polarquant_lfru_tok_s": tps["lfru-polarquant"],
                                       "vs_vllm_modeled": tps["adaptive"] / vllm,
                                       "vs_vllm_reported": tps["adaptive"] / VLLM_CACHE8_TOKS}
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=400, help="synthetic trace length (tokens)")
    ap.add_argument("--layers", type=int, default=23)
    ap.add_argument("--repeat", type=float, default=0.45, help="synthetic temporal locality (P(pick repeats))")
    ap.add_argument("--config", default="medium", choices=["tiny", "medium"], help="decode-speed config")
    ap.add_argument("--new", type=int, default=32, help="decode tokens for the speed run")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from nemojax.experts.policies import POLICIES
    from nemojax.experts.policies.simulate import synthetic_trace

    pols = list(POLICIES)
    log(f"synthetic trace: {a.tokens} tokens x {a.layers} layers, 128 experts top-6 (Zipf 0.8, repeat {a.repeat})")
    syn_trace = synthetic_trace(a.tokens, a.layers, 128, 6, repeat=a.repeat, seed=0)
    syn = policy_table(syn_trace, 128, SIZES, pols)
    log("recording routing from the bundled model ...")
    tr, e = recorded_trace(60)
    rec = policy_table(tr, e, [1, 2, 3, 4, 6, 8, 12], pols)
    speed = [] if a.skip_speed else decode_speed(a.config, [4, 8], a.new)
    log("30B model: simulating the slot counts of equal VRAM ...")
    model = pcie_model(syn_trace, syn)
    res = {"synthetic": syn, "recorded": rec, "recorded_tokens": len(tr), "decode": speed, "pcie_model": model}
    if a.json:
        print(json.dumps(res))
        return 0
    for name, rows in (("synthetic 128 experts top-6 x23 layers", syn), (f"recorded ({len(tr)} tokens)", rec)):
        print(f"\nhit rate, {name}")
        print("| slots | " + " | ".join(pols) + " |")
        print("|---" * (len(pols) + 1) + "|")
        for r in rows:
            print(f"| {r['slots']} | " + " | ".join(f"{r[p]['hit_rate']:.3f}" for p in pols) + " |")
        print("policy host time choosing victims, ms per token (all layers): " + "; ".join(
            f"{r['slots']} slots " + " / ".join(f"{r[p]['decide_us'] / 1e3:.2f}" for p in pols) for r in rows))
    if speed:
        print(f"\ndecode, {a.config} config, fp32, batch 1, {a.new} tokens (CPU: host copies, no PCIe)")
        for r in speed:
            extra = (f" hit {r['hit_rate']:.2f}, {r['bytes_per_token'] / 1e6:.2f} MB/token, wait {r['wait_s']:.3f} s, "
                     f"predictor P/R {r['predictor_precision']:.2f}/{r['predictor_recall']:.2f}, same tokens "
                     f"{r['same_tokens']}" if r["slots"] != "resident" else "")
            print(f"  {r['slots']}: {r['tok_s']:.1f} tok/s{extra}")
    print("\n30B-A3B on a 24 GB card (modeled: resident compute 1/54.5 s per token + misses x bytes / PCIe + the "
          "policy's host time choosing victims); "
          "equal VRAM as the vLLM PR's cache 8: 'slots' = same 3.67 GB of slots, 'vram' = same 8.08 GB of weights")
    for r in model:
        print(f"  {r['link']}: vLLM PR BF16 cache 8 LFRU {r['vllm_lfru8_bf16_modeled']:.1f} tok/s "
              f"(LRU {r['vllm_lru8_bf16_modeled']:.1f})")
        for fmt in ("nvfp4", "hlwq-q5"):
            for way in ("slots", "vram"):
                m = r[f"{fmt}_{way}"]
                print(f"    {fmt:8s} {way:5s} {m['slots']:3d} slots hit {m['hit_rate']:.3f}: {m['tok_s']:.1f} tok/s = "
                      f"{m['vs_vllm_modeled']:.2f}x the modeled vLLM PR, {m['vs_vllm_reported']:.2f}x the reported "
                      f"16.4 (policy {m['decide_ms']:.2f} ms/token; polarquant's LFRU here "
                      f"{m['polarquant_lfru_tok_s']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
