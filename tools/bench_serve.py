#!/usr/bin/env python
"""Serving benchmark: ``nemojax serve`` (and ``transformers serve`` on the same weights, where it runs) under
concurrent OpenAI-API clients.

Model: the MEDIUM config (tools/benchlib.py) with random fp32 weights written as a checkpoint folder, with the
bundled model's tokenizer (1024 ids). The lm_head rows of ids the tokenizer does not have, and of its special
tokens, are zeroed, so greedy decoding picks ordinary decodable tokens: every streamed token carries text (TTFT and
TPOT are seen by the client) and no request stops before ``--out-tokens``.

Workloads (each request streams, greedy, ``stream_options.include_usage``; the output token count is the usage
figure where the server sends one, else the text chunks):

* completions at concurrency 1, 8, 16, 32 (``--concurrency``): ``--requests`` prompts per level of random
  token text, lengths uniform in [``--min-prompt``, ``--max-prompt``] (64-1024), ``--out-tokens`` (128) each;
  per level: output tokens/s (completion tokens / wall seconds), TTFT p50/p99 (request sent -> first text
  chunk), TPOT p50/p99 ((last chunk - first chunk) / (tokens - 1)), and for nemojax the prefix-cache hit rate
  over the level (``/metrics``: hits / queries, tokens);
* multi-turn chat (``--turns`` turns of ``--conversations`` conversations, run one after another): turn k+1
  sends the whole conversation so far, so its prompt extends turn k's; its TTFT is set against a cold prefill of
  a prompt of the same length that shares no prefix with anything cached (the same messages behind a system
  message of the same length that no earlier prompt had), measured right after it.

``transformers serve`` (its CLI, the same checkpoint folder, ``--device cpu``, fp32) is run without and with
``--continuous-batching`` (``--transformers none|plain|cb|both``) where the command exists; the table says which.
It needs ``accelerate`` importable (e.g. ``pip install --target DIR accelerate`` and ``PYTHONPATH=DIR``).

Progress goes to stderr; the markdown tables go to stdout and ``--out FILE``. ``--quick``: a smoke run at tiny
sizes (the TINY config, prompts of 16-48 tokens, 8 output tokens, concurrency 1 and 4, 2 turns).

Examples::

    python tools/bench_serve.py --out bench_serve.md               # the full run (long on a CPU)
    python tools/bench_serve.py --quick --transformers none        # a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import log  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SPECIAL_IDS = 16  # the bundled tokenizer's special tokens lie below this id


def build_model(cfg_name: str, folder: str, seed: int) -> None:
    """Random fp32 checkpoint of ``cfg_name`` with the bundled tokenizer; lm_head rows past its ids and of its
    special tokens zeroed (greedy decoding then writes ordinary, decodable tokens and never stops early)."""
    import numpy as np
    from nemojax import Config
    from nemojax.checkpoint import save_params
    from nemojax.cli import default_model_path
    from nemojax.params import init_params_numpy
    from nemojax.tokenizer import Tokenizer

    src = default_model_path()
    n_tok = Tokenizer(src).vocab_size
    d = dict(benchlib.CONFIGS[cfg_name])
    d["vocab_size"] = max(d["vocab_size"], n_tok)
    d["eos_token_id"] = [4, 2]  # the bundled tokenizer's <|im_end|> and </s>
    cfg = Config.from_dict(d)
    params = init_params_numpy(cfg, seed=seed, dtype="float32")
    params["lm_head"] = np.array(params["lm_head"])
    params["lm_head"][n_tok:] = 0.0  # logit 0: below the best of ~1000 random logits, never the argmax
    params["lm_head"][:SPECIAL_IDS] = 0.0  # nor a special token: no request stops before its last token
    save_params(params, cfg, folder, naming="original")
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, f), folder)


def pctl(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class ServerProc:
    """A server subprocess on 127.0.0.1:port; waits for /health (engine warm-up included)."""

    def __init__(self, label: str, argv: list[str], port: int, env: dict, timeout: float):
        import httpx

        self.label, self.url = label, f"http://127.0.0.1:{port}"
        log(f"starting {label}: {' '.join(argv)}")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench_serve_", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {self.proc.returncode}: {self.last_error()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    log(f"{label} up after {time.perf_counter() - t0:.1f} s")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{label} did not answer /health within {timeout} s")

    def last_error(self) -> str:
        """The last exception line of the server's log (``ValueError: ...``), else its last line."""
        time.sleep(1)  # a traceback is logged after the 500 answer went out
        with open(self.log.name) as f:
            lines = [line.strip() for line in f if line.strip()]
        errs = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
        return (errs or lines or [""])[-1][:300]

    def metrics(self) -> dict:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        r = httpx.get(self.url + "/metrics", timeout=10)
        if r.status_code != 200:
            return {}
        return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def timed_stream(client, model: str, out_tokens: int, *, prompt=None, messages=None) -> dict:
    """One streamed request: ttft, tpot (seconds), completion tokens, cached tokens."""
    kw = dict(model=model, max_tokens=out_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True})
    t0 = time.perf_counter()
    if messages is not None:
        stream = client.chat.completions.create(messages=messages, **kw)
    else:
        stream = client.completions.create(prompt=prompt, **kw)
    first = last = None
    n_chunks, usage, text = 0, None, []
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        if not ch.choices:
            continue
        c = ch.choices[0]
        piece = (c.delta.content or getattr(c.delta, "reasoning_content", None) or "") if messages is not None \
            else (c.text or "")
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            n_chunks += 1
            text.append(piece)
    n = usage.completion_tokens if usage is not None else n_chunks
    cached = 0
    if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
        cached = usage.prompt_tokens_details.cached_tokens or 0
    return {"ttft": (first or time.perf_counter()) - t0, "tpot": (last - first) / (n - 1) if first and n > 1
            else float("nan"), "tokens": n, "cached": cached, "text": "".join(text)}


def run_level(srv: ServerProc, model: str, prompts: list[str], conc: int, out_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    m0 = srv.metrics()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        res = list(pool.map(lambda p: timed_stream(client, model, out_tokens, prompt=p), prompts))
    wall = time.perf_counter() - t0
    m1 = srv.metrics()
    q = m1.get("nemojax:prefix_cache_queries_total", 0) - m0.get("nemojax:prefix_cache_queries_total", 0)
    h = m1.get("nemojax:prefix_cache_hits_total", 0) - m0.get("nemojax:prefix_cache_hits_total", 0)
    ttft, tpot = [r["ttft"] for r in res], [r["tpot"] for r in res if r["tpot"] == r["tpot"]]
    out = {"server": srv.label, "concurrency": conc, "requests": len(res), "tokens": sum(r["tokens"] for r in res),
           "wall_s": wall, "tok_s": sum(r["tokens"] for r in res) / wall,
           "ttft_p50": pctl(ttft, 0.5), "ttft_p99": pctl(ttft, 0.99), "tpot_p50": pctl(tpot, 0.5),
           "tpot_p99": pctl(tpot, 0.99), "prefix_hit_rate": h / q if q else None}
    log(f"{srv.label} c={conc}: {out['tok_s']:.1f} tok/s, TTFT p50 {out['ttft_p50'] * 1e3:.0f} ms, "
        f"TPOT p50 {out['tpot_p50'] * 1e3:.1f} ms")
    return out


def run_multiturn(srv: ServerProc, model: str, tok, rng: random.Random, a) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    rows = []
    for conv in range(a.conversations):
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": random_text(tok, rng, a.first_turn_tokens)}]
        for turn in range(1, a.turns + 1):
            warm = timed_stream(client, model, a.turn_out_tokens, messages=msgs)
            # the same messages behind a system message of the same length that no earlier prompt had: nothing
            # past the template's first few tokens is shared with anything cached (the cold runs of earlier turns
            # included), so this is a cold prefill of the same length
            cold_msgs = [dict(m) for m in msgs]
            cold_msgs[0]["content"] = f"{conv:02d}{turn:02d} " + cold_msgs[0]["content"][5:]
            cold = timed_stream(client, model, a.turn_out_tokens, messages=cold_msgs)
            rows.append({"server": srv.label, "conversation": conv, "turn": turn, "warm_ttft": warm["ttft"],
                         "cold_ttft": cold["ttft"], "cached": warm["cached"], "cold_cached": cold["cached"]})
            log(f"{srv.label} conversation {conv} turn {turn}: TTFT {warm['ttft'] * 1e3:.0f} ms "
                f"(cached {warm['cached']}) vs cold {cold['ttft'] * 1e3:.0f} ms (cached {cold['cached']})")
            msgs = msgs + [{"role": "assistant", "content": warm["text"]},
                           {"role": "user", "content": random_text(tok, rng, a.turn_tokens)}]
    return rows


def warm_up(srv: ServerProc, model: str, tok, a) -> None:
    """One completion and one chat request first (first-use costs: template compile, connection setup)."""
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    rng = random.Random(2)
    timed_stream(client, model, 4, prompt=random_text(tok, rng, a.min_prompt))
    timed_stream(client, model, 4, messages=[{"role": "user", "content": random_text(tok, rng, a.min_prompt)}])


def random_text(tok, rng: random.Random, n: int) -> str:
    """Text that encodes to ``n`` tokens (rarely a token or two off): random ordinary token ids decoded (special
    ids excluded), then cut or extended until its own encoding has ``n`` (decoded random ids re-encode to ~1.3x
    as many tokens, so the text of ``n`` random ids would be a longer prompt than its name)."""
    text = tok.decode([rng.randrange(SPECIAL_IDS, tok.vocab_size) for _ in range(n)], skip_special_tokens=True)
    for _ in range(16):
        ids = tok.encode(text)
        if len(ids) == n:
            break
        if len(ids) > n:
            text = tok.decode(ids[:n], skip_special_tokens=True)
        else:
            text += tok.decode([rng.randrange(SPECIAL_IDS, tok.vocab_size) for _ in range(n - len(ids))],
                               skip_special_tokens=True)
    return text


def markdown(levels: list[dict], turns: list[dict], notes: list[str]) -> str:
    ms = lambda x: "n/a" if x != x else (f"{x * 1e3:.1f}" if x < 0.01 else f"{x * 1e3:.0f}")  # noqa: E731
    lines = ["| server | concurrency | requests | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | "
             "TPOT p99 (ms) | prefix hit rate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in levels:
        hit = "n/a" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.1%}"
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | "
                     f"{ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['tpot_p50'])} | {ms(r['tpot_p99'])} | "
                     f"{hit} |")
    if turns:
        lines += ["", "| server | turn | TTFT p50 (ms) | cold prefill TTFT p50 (ms) | cached prompt tokens (mean) |",
                  "|---|---|---|---|---|"]
        for label in dict.fromkeys(t["server"] for t in turns):
            for k in sorted({t["turn"] for t in turns}):
                ts = [t for t in turns if t["server"] == label and t["turn"] == k]
                lines.append(f"| {label} | {k} | {ms(statistics.median(t['warm_ttft'] for t in ts))} | "
                             f"{ms(statistics.median(t['cold_ttft'] for t in ts))} | "
                             f"{statistics.mean(t['cached'] for t in ts):.0f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def transformers_cmd() -> list[str] | None:
    """The ``transformers serve`` command of this Python's environment, or None."""
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    if not os.path.exists(exe):
        return None
    r = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True)
    return [exe, "serve"] if r.returncode == 0 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="medium", choices=sorted(benchlib.CONFIGS))
    ap.add_argument("--concurrency", default="1,8,16,32")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-turn-tokens", type=int, default=512)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--turn-out-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--transformers", default="both", choices=["none", "plain", "cb", "both"])
    ap.add_argument("--gpu", action="store_true", help="let jax use the accelerator (default: CPU)")
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--quick", action="store_true", help="a smoke run at tiny sizes")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--json", default=None, help="also write the raw results as JSON here")
    a = ap.parse_args(argv)
    if a.quick:
        a.config, a.concurrency, a.min_prompt, a.max_prompt, a.out_tokens = "tiny", "1,4", 16, 48, 8
        a.conversations, a.turns, a.first_turn_tokens, a.turn_tokens, a.turn_out_tokens = 1, 2, 48, 16, 4
        a.max_num_seqs, a.chunk = 4, 16
    concs = [int(c) for c in a.concurrency.split(",") if c.strip()]  # "" : the multi-turn workload only
    benchlib.set_driver_env(a.threads)
    env = benchlib.worker_env(a.threads)
    if a.gpu:
        env.pop("JAX_PLATFORMS", None)
    from nemojax.tokenizer import Tokenizer

    rng = random.Random(0)
    work = tempfile.mkdtemp(prefix="bench_serve_")
    try:
        folder = os.path.join(work, "model")
        log(f"writing the {a.config} checkpoint to {folder}")
        build_model(a.config, folder, seed=0)
        tok = Tokenizer(folder)
        max_len = a.max_prompt + a.out_tokens + 64
        max_len = max(max_len, a.first_turn_tokens + a.turns * (a.turn_tokens + a.turn_out_tokens) * 2 + 256)
        with open(os.path.join(folder, "config.json")) as f:
            ctx = json.load(f).get("max_position_embeddings", 4096)
        max_len = min(max_len, ctx)
        n_req = {c: a.requests or max(8, 2 * c) for c in concs}
        prompts = {c: [random_text(tok, rng, rng.randint(a.min_prompt, a.max_prompt)) for _ in range(n_req[c])]
                   for c in concs}
        servers = [("nemojax serve", [sys.executable, "-m", "nemojax", "serve", "--model", folder, "--port",
                                      str(a.port), "--max-num-seqs", str(a.max_num_seqs), "--max-model-len",
                                      str(max_len), "--chunk", str(a.chunk), "--dtype", a.dtype,
                                      "--served-model-name", "bench", "--log-level", "warning"], "bench")]
        notes = [f"config {a.config}, random fp32 weights ({a.dtype} compute), bundled tokenizer; prompts "
                 f"{a.min_prompt}-{a.max_prompt} tokens, {a.out_tokens} output tokens, greedy, streamed",
                 f"nemojax serve: --max-num-seqs {a.max_num_seqs} --chunk {a.chunk} --max-model-len {max_len}; "
                 f"{a.threads} CPU thread(s)" + (" (accelerator allowed)" if a.gpu else "")]
        tf = transformers_cmd() if a.transformers != "none" else None
        if a.transformers != "none" and tf is None:
            notes.append("transformers serve: not available in this environment (no `transformers serve`)")
        for mode in (("plain", "cb") if a.transformers == "both" else (a.transformers,)):
            if tf is None:
                break
            extra = ["--continuous-batching"] if mode == "cb" else ["--no-continuous-batching"]
            how = "--continuous-batching" if mode == "cb" else "no continuous batching"
            servers.append((f"transformers serve ({how})",
                            tf + [folder, "--device", "cuda" if a.gpu else "cpu", "--dtype", a.dtype, "--host",
                                  "127.0.0.1", "--port", str(a.port + 1 + len(servers)), "--log-level", "warning"]
                            + extra, folder))
        levels, turns = [], []
        for i, (label, argv_, model_name) in enumerate(servers):
            port = int(argv_[argv_.index("--port") + 1])
            try:
                srv = ServerProc(label, argv_, port, env, a.startup_timeout)
            except RuntimeError as e:
                log(f"{label}: {e}")
                notes.append(f"{label}: could not be run here ({e})")
                continue
            try:
                warm_up(srv, model_name, tok, a)
                for c in concs:
                    levels.append(run_level(srv, model_name, prompts[c], c, a.out_tokens))
                turns += run_multiturn(srv, model_name, tok, random.Random(1), a)
            except Exception as e:  # a server that fails mid-run: report, go on with the next
                why = f"{type(e).__name__}: {str(e)[:200]}; server log: {srv.last_error()}"
                log(f"{label} failed: {why}")
                notes.append(f"{label}: failed during the run ({why})")
            finally:
                srv.close()
        md = markdown(levels, turns, notes)
        print(md)
        if a.out:
            with open(a.out, "w") as f:
                f.write(md)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"levels": levels, "turns": turns, "notes": notes}, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
