"""Engine speed on random weights, the engine called directly (no HTTP): TTFT and decode tok/s for 1 request and
for N concurrent requests; ``--steps``: the engine's compiled steps timed one by one instead (a prefill chunk
in one cache row, and one decode step at each row count the engine compiles), median of ``--repeats``.

    PYTHONPATH=$PWD python tools/bench_engine.py --config medium --max-num-seqs 32 --chunk 256 --prompt 512 \
        --new 64 --concurrency 1 16
    PYTHONPATH=$PWD python tools/bench_engine.py --config medium --max-num-seqs 32 --chunk 256 --steps
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def measure(eng, prompts, new: int, timeout: float | None = 3600) -> dict:
    """Submit every prompt at once; wait for all -> TTFT (the first and last request's, mean), mean TPOT, overall
    output tok/s (``timeout`` seconds at most; None: no limit)."""
    from nemojax.serve import Request

    t_first, t_last, n_tok, done, lock = {}, {}, {}, threading.Event(), threading.Lock()

    def cb(o):
        now = time.perf_counter()
        with lock:
            if o.token_ids:
                t_first.setdefault(o.request_id, now)
                t_last[o.request_id] = now
                n_tok[o.request_id] = n_tok.get(o.request_id, 0) + len(o.token_ids)
            if o.finish_reason is not None and len(n_tok) == len(prompts) and all(
                    n_tok[k] == new for k in n_tok):
                done.set()

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.submit(Request(f"r{i}", p, new), cb)
    assert done.wait(timeout), f"not every request finished within {timeout} s"
    end = max(t_last.values())
    ttft = [t_first[k] - t0 for k in t_first]
    tpot = [(t_last[k] - t_first[k]) / (new - 1) for k in t_first]
    return dict(ttft_first=min(ttft), ttft_last=max(ttft), ttft_mean=float(np.mean(ttft)),
                tpot_ms=1e3 * float(np.mean(tpot)),
                tok_s=sum(n_tok.values()) / (end - t0), decode_tok_s_per_req=1 / float(np.mean(tpot)))


def time_steps(eng, repeats: int) -> None:
    """Print the median time of one prefill chunk and of one decode step over the first n rows, for each of the
    engine's row buckets (``eng`` not started: its cache and logits are used directly)."""
    import jax
    import jax.numpy as jnp

    from nemojax.sampling import SamplingParams
    from nemojax.serve import steps

    cfg, params, chunk = eng.cfg, eng.model.params, eng.chunk
    state = [eng.cache, eng.logits]

    def median_ms(fn) -> float:
        fn()  # compile
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, chunk).astype(np.int32)

    def prefill():
        state[:] = steps.prefill_chunk(params, cfg, *state, np.int32(0), tokens, np.int32(chunk))
        jax.block_until_ready(state)
        state[0] = steps.reset_row(state[0], np.int32(0))

    ms = median_ms(prefill)
    print(f"prefill chunk of {chunk} tokens in one row (and the row reset): {ms:.1f} ms ({chunk / ms * 1e3:.0f} tok/s)",
          flush=True)
    for n in eng.buckets:
        active = jnp.ones(n, bool)
        sp = SamplingParams(jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.float32))
        keys, n_gen = jnp.zeros((n, 2), jnp.uint32), jnp.zeros(n, jnp.int32)

        def decode():
            tok, state[0], state[1] = steps.decode_step(params, cfg, n, *state, active, keys, n_gen, sp)
            jax.block_until_ready(tok)

        ms = median_ms(decode)
        print(f"decode step over {n} rows: {ms:.1f} ms ({ms / n:.1f} ms per row)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="medium", choices=("tiny", "medium"))
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", action="store_true", help="time the compiled steps one by one instead")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per step with --steps")
    a = ap.parse_args()
    import sys
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import CONFIGS

    import nemojax
    from nemojax.config import Config
    from nemojax.params import init_params
    from nemojax.serve import Engine

    cfg = Config.from_dict(CONFIGS[a.config])
    model = nemojax.Model(cfg, init_params(cfg, seed=0))
    eng = Engine(model, max_num_seqs=a.max_num_seqs, max_model_len=a.prompt + a.new + 64, chunk=a.chunk,
                 prefix_cache_bytes=0)
    if a.steps:
        time_steps(eng, a.repeats)
        return
    t0 = time.perf_counter()
    eng.start()
    print(f"start (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    measure(eng, [rng.integers(3, cfg.vocab_size, a.prompt).tolist()], 4)  # first-use effects
    for c in a.concurrency:
        r = measure(eng, [rng.integers(3, cfg.vocab_size, a.prompt).tolist() for _ in range(c)], a.new)
        print(f"concurrency {c}: TTFT first {r['ttft_first']:.2f} s mean {r['ttft_mean']:.2f} s, "
              f"TPOT {r['tpot_ms']:.0f} ms ({r['decode_tok_s_per_req']:.1f} tok/s per request), "
              f"overall {r['tok_s']:.1f} tok/s", flush=True)
    eng.stop()


if __name__ == "__main__":
    main()
