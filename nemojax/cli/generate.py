"""``nemojax generate``: streams text from a prompt (optionally through the chat template); prefill and decode
speed on stderr."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from ..chat import parse_response
from .errors import INT32_MAX, UsageError, int_in, load_option_error, utf8_text

__all__ = ["add_parser", "cmd_generate", "default_model_path"]

SEED_MAX = 2**32 - 1  # larger seeds would repeat smaller ones' random streams
MMAP_HELP = ("CPU only: keep the weights in the checkpoint files' read-only memory maps instead of copying them "
             "into RAM; with --expert-cache the routed experts stay on disk (the page cache is their host tier)")


def default_model_path() -> str:
    """The small trained model bundled with the package (``nemojax/default_model``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text with a Nemotron-H checkpoint (default: the bundled tiny model).")
    p.add_argument("--model", default=None, help="checkpoint folder (config.json, safetensors, tokenizer.json); "
                                                 "default: the bundled model")
    p.add_argument("--prompt", required=True, type=utf8_text, help="prompt text (a user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    p.add_argument("--system", default=None, type=utf8_text, help="system message (with --chat)")
    p.add_argument("--no-thinking", action="store_true", help="chat without the <think> reasoning block")
    p.add_argument("--max-new-tokens", type=int_in(1, INT32_MAX), default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int_in(0, INT32_MAX), default=0, help="0 = off")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                   help=f"sampling seed, 0..{SEED_MAX} (jax.random.PRNGKey keeps 32 bits)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cpu", "pallas", "triton"],
                   help="kernels for NVFP4/HLWQ matmuls: auto (cpu on a CPU, else xla), xla (reference), cpu "
                   "(4-bit decode from the packed bytes), pallas, triton (GPU + jax-triton)")
    p.add_argument("--expert-cache", type=int_in(1, INT32_MAX), default=None, metavar="N",
                   help="keep routed experts in host memory with N device slots per MoE layer")
    p.add_argument("--cache-policy", default="adaptive", help="expert-cache eviction policy: lru, lfu, "
                   "lfru-tinyserve, lfru-vllm, lfru-polarquant, adaptive (default)")
    p.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    p.set_defaults(func=cmd_generate)


def _stream_text(a, tok, parts, stops) -> tuple[list[int], str]:
    """Collect the new tokens of ``parts`` (chunks [1, n]) up to the first stop token; without ``--json`` write the
    text to stdout as it grows. Returns (tokens, the text written so far)."""
    new: list[int] = []
    shown = ""
    stop_set = set(stops)
    for part in parts:
        for t in part[0].tolist():
            if stop_set and t in stop_set:
                stop_set = {None}  # stop showing after the first stop token
            if None not in stop_set:
                new.append(t)
        if not a.json:
            txt = tok.decode(new)
            if txt.startswith(shown) and not txt.endswith("\ufffd"):
                sys.stdout.write(txt[len(shown):])
                sys.stdout.flush()
                shown = txt
    return new, shown


def _report(a, folder: str, text: str, new: list[int], shown: str, stats: dict, thinking: bool, summary) -> None:
    """The result: one JSON object with ``--json``, else the rest of the streamed text and ``summary()`` (the
    speeds) on stderr."""
    if a.json:
        res = {"model": folder, "prompt": a.prompt, "text": text, "token_ids": new, **stats}
        if a.chat:
            res.update(parse_response(text, thinking=thinking))
        print(json.dumps(res, ensure_ascii=False))
    else:
        if text[len(shown):]:
            sys.stdout.write(text[len(shown):])
        sys.stdout.write("\n")
        print(summary(), file=sys.stderr)


def _mapped(model) -> dict:
    """``{"mmap": {mapped_bytes, copied_bytes, on_disk_bytes, ...}}`` for a ``--mmap`` load, else nothing."""
    return {} if model.mapped is None else {"mmap": dataclasses.asdict(model.mapped)}


def _generate_offloaded(a, model, tok, ids, kw, thinking, folder, load_s) -> int:
    """``generate --expert-cache N``: host loop per token, experts fetched into N device slots per MoE layer; the
    text streams token by token."""
    off = model.offload(a.expert_cache, a.cache_policy)
    t0 = time.perf_counter()
    new, shown = _stream_text(a, tok, off.generate_stream([ids], a.max_new_tokens, **{**kw, "chunk": 1}),
                              kw["stop_token_ids"])
    dt = time.perf_counter() - t0
    ost = off.experts.stats.summary()
    text = tok.decode(new)
    stats = {"prompt_tokens": len(ids), "new_tokens": len(new), "load_s": round(load_s, 3), **_mapped(off),
             "generate_s": round(dt, 3), "expert_cache": a.expert_cache, "cache_policy": a.cache_policy,
             **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in ost.items()}}
    _report(a, folder, text, new, shown, stats, thinking,
            lambda: f"[expert cache {a.expert_cache}/layer ({a.cache_policy}): hit rate {ost['hit_rate']:.1%}, "
                    f"{ost['bytes_per_token'] / 1e6:.2f} MB moved per token, {ost['wait_s']:.2f} s waiting"
                    + (f", {ost['in_place']} expert products read in place" if ost["in_place"] else "") + " | "
                    f"{len(new)} tokens in {dt:.1f} s]")
    return 0


def cmd_generate(a) -> int:
    from ..sampling import check_sampling

    try:
        check_sampling(a.temperature, a.top_k, a.top_p)
    except ValueError as e:
        raise UsageError(str(e).replace("top_p", "--top-p").replace("top_k", "--top-k")
                         .replace("temperature", "--temperature", 1)) from None
    if a.expert_cache is not None:
        from ..experts.policies import POLICIES

        if a.cache_policy not in POLICIES:
            raise UsageError(f"--cache-policy {a.cache_policy!r}: unknown; choose one of {', '.join(POLICIES)}")
    folder = a.model or default_model_path()
    if not os.path.isdir(folder):
        raise UsageError(f"--model {folder}: not a folder" if a.model else
                         f"the bundled default model is missing at {folder}; pass --model DIR")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise UsageError(f"{folder}: no config.json (not a Hugging Face model folder)")

    from .. import api
    from ..tokenizer import Tokenizer

    t0 = time.perf_counter()
    try:
        tok = Tokenizer(folder)
        model = api.load(folder, dtype=a.dtype, backend=a.backend, mmap=a.mmap)
    except ValueError as e:  # an unavailable --backend, --mmap off the CPU
        err = load_option_error(e)
        if err is None:
            raise
        raise err from None
    load_s = time.perf_counter() - t0
    thinking = not a.no_thinking
    if a.chat:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + \
            [{"role": "user", "content": a.prompt}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=thinking)
        stops = tok.stop_token_ids
    else:
        prompt, stops = a.prompt, list(model.config.eos_token_id)
    ids = tok.encode(prompt)
    if not ids:
        raise UsageError("--prompt encodes to no tokens")
    ctx = model.config.max_position_embeddings
    if len(ids) + a.max_new_tokens > ctx:
        raise UsageError(f"prompt of {len(ids)} tokens + --max-new-tokens {a.max_new_tokens} exceeds the model's "
                         f"context of {ctx} tokens")
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_token_ids=stops[:8],
              chunk=8)
    if a.expert_cache is not None:
        return _generate_offloaded(a, model, tok, ids, kw, thinking, folder, load_s)
    # compile (and warm up) on the same shapes first, so the speeds below are steady-state
    t0 = time.perf_counter()
    for _ in model.generate_stream([ids], a.max_new_tokens, warmup=True, **kw):
        pass
    compile_s = time.perf_counter() - t0
    timings: dict = {}
    new, shown = _stream_text(a, tok, model.generate_stream([ids], a.max_new_tokens, timings=timings, **kw), stops)
    out_text = tok.decode(new)
    n_new = len(new)
    pre_tps = timings["prompt_tokens"] / max(timings["prefill_s"], 1e-9)
    dec_tps = max(1, n_new) / max(timings["decode_s"], 1e-9)
    stats = {"prompt_tokens": len(ids), "new_tokens": n_new, "load_s": round(load_s, 3), **_mapped(model),
             "compile_s": round(compile_s, 3), "prefill_s": round(timings["prefill_s"], 4),
             "decode_s": round(timings["decode_s"], 4), "prefill_tok_s": round(pre_tps, 1),
             "decode_tok_s": round(dec_tps, 1)}
    _report(a, folder, out_text, new, shown, stats, thinking,
            lambda: f"[prefill {len(ids)} tok: {pre_tps:.1f} tok/s | decode {n_new} tok: {dec_tps:.1f} tok/s | "
                    f"load {load_s:.1f} s, compile {compile_s:.1f} s]")
    return 0
