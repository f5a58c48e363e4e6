"""``nemojax serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health``, ``/metrics``), a drop-in for ``vllm serve MODEL --tool-call-parser qwen3_coder
--reasoning-parser nemotron_v3``."""
from __future__ import annotations

import os
import sys

from .errors import INT32_MAX, UsageError, int_in, load_option_error, need_folders
from .generate import MMAP_HELP, default_model_path

__all__ = ["add_parser", "cmd_serve", "parse_mesh"]


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"D,E,T"`` -> (data, expert, tensor) device counts; UsageError naming ``--mesh`` otherwise."""
    parts = text.split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(f"--mesh {text!r}: expected three positive integers D,E,T (data, expert, tensor)")
    return dims


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a Nemotron-H checkpoint over the OpenAI chat and completions API "
                                   "(default: the bundled tiny model).")
    p.add_argument("--model", default=None, help="checkpoint folder; default: the bundled model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_in(0, 65535), default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--max-num-seqs", type=int_in(1, INT32_MAX), default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-model-len", type=int_in(2, INT32_MAX), default=None,
                   help="prompt + output token limit per request (default: the engine's, at most the model's "
                        "context)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="attention KV cache dtype: auto (the weights' dtype, or FP8 with calibrated scales), fp8")
    p.add_argument("--prefix-cache-gb", type=float, default=1.0, help="host memory for the prefix cache (GB)")
    p.add_argument("--chunk", type=int_in(1, INT32_MAX), default=64, help="prefill chunk in tokens (default 64)")
    p.add_argument("--max-waiting", type=int_in(0, INT32_MAX), default=256, help="queued requests before answering 503")
    p.add_argument("--expert-cache", type=int_in(1, INT32_MAX), default=None, metavar="N",
                   help="keep routed experts in host memory with N device slots per MoE layer")
    p.add_argument("--cache-policy", default="adaptive", help="expert-cache eviction policy: lru, lfu, "
                   "lfru-tinyserve, lfru-vllm, lfru-polarquant, adaptive (default)")
    p.add_argument("--mesh", default=None, metavar="D,E,T", help="device mesh (data, expert, tensor)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--backend", default="auto", choices=["auto", "xla", "cpu", "pallas", "triton"],
                   help="kernels for NVFP4/HLWQ matmuls: auto (cpu on a CPU, else xla), xla (reference), cpu "
                   "(4-bit decode from the packed bytes), pallas, triton (GPU + jax-triton)")
    p.add_argument("--mmap", action="store_true", help=MMAP_HELP)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _check(a) -> None:
    """UsageError for values no engine can take, naming the option (integer ranges are checked by argparse)."""
    if a.prefix_cache_gb < 0:
        raise UsageError(f"--prefix-cache-gb must be >= 0, got {a.prefix_cache_gb}")
    if a.expert_cache is not None:
        from ..experts.policies import POLICIES

        if a.cache_policy not in POLICIES:
            raise UsageError(f"--cache-policy {a.cache_policy!r}: unknown; choose one of {', '.join(POLICIES)}")
    if a.mesh is not None and parse_mesh(a.mesh) != (1, 1, 1):
        raise UsageError(f"--mesh {a.mesh}: the serving engine runs on one device; sharded serving is not "
                         f"supported yet (use --mesh 1,1,1 or leave it out)")


def cmd_serve(a) -> int:
    _check(a)
    folder = a.model or default_model_path()
    need_folders(folder)

    from .. import api
    from ..formats.kv import FP8
    from ..tokenizer import Tokenizer

    try:  # an unusable checkpoint or tokenizer is a named error that main reports as bad input
        tok, model = Tokenizer(folder), api.load(folder, dtype=a.dtype, backend=a.backend, mmap=a.mmap)
    except ValueError as e:
        err = load_option_error(e)  # an unavailable --backend, --mmap off the CPU
        if err is None:
            raise
        raise err from None
    ctx = model.config.max_position_embeddings
    if a.max_model_len is not None and a.max_model_len > ctx:
        raise UsageError(f"--max-model-len {a.max_model_len} exceeds the model's context of {ctx} tokens")
    if a.expert_cache is not None:
        model = model.offload(a.expert_cache, a.cache_policy)

    from ..serve.engine import Engine
    from ..serve.server import serve

    try:
        engine = Engine(model, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, chunk=a.chunk,
                        prefix_cache_bytes=int(a.prefix_cache_gb * (1 << 30)),
                        kv_dtype=FP8 if a.kv_cache_dtype == "fp8" else None, max_waiting=a.max_waiting)
    except (ValueError, NotImplementedError) as e:  # an option this engine cannot run
        raise UsageError(f"the serving engine refused the options: {e}") from None
    max_len = engine.max_model_len  # the engine's default when --max-model-len is not given
    name = a.served_model_name or (a.model or os.path.basename(folder))
    print(f"nemojax serve: {name} on http://{a.host}:{a.port}/v1 (max {a.max_num_seqs} sequences, "
          f"{max_len} tokens each)", file=sys.stderr)
    serve(engine, tok, served_model_name=name, max_model_len=max_len, api_key=a.api_key, host=a.host,
          port=a.port, log_level=a.log_level)
    return 0
