#!/usr/bin/env python
"""A random-weight Nemotron-H checkpoint of any config.json, in the original Hugging Face layout, streaming.

    python tools/make_random_checkpoint.py CONFIG OUT [--format bf16|nvfp4|hlwq-q5|fp8|RECIPE] [--layers N]
                                           [--max-shard-size 5GB] [--seed S] [--force] [--json]

CONFIG is a config.json (or a folder holding one). OUT gets ``model-0000k-of-0000N.safetensors`` shards,
``model.safetensors.index.json`` and ``config.json`` (the input's fields, ``--layers N``: the first N layers of the
pattern), plus what nemojax's loaders read for the format: ModelOpt's ``hf_quant_config.json`` and config.json's
``quantization_config`` (nvfp4, fp8), polarengine layout B and ``polar_config.json`` (hlwq-q5). ``--format`` is
``bf16`` or a quantization recipe of ``nemojax.quant.RECIPES`` (nvfp4, fp8, hlwq-q5 ... : the same layout as
``nemojax convert --to RECIPE`` of the BF16 checkpoint of the same seed, byte for byte).

One parameter (one expert) at a time: drawn in float32, cast to bf16, quantized when the recipe selects it,
written (``nemojax.checkpoint.ShardWriter``) and dropped, so the peak memory is about the largest tensor (the
embeddings) and its quantizer's temporaries, never the model (hlwq-q5, which quantizes the embeddings and lm_head
in one piece each: ~7x the bf16 embeddings; docs/real-shapes.md). Progress on stderr (tensors done / total, GB written, ETA); at the end
the peak RSS (``resource.getrusage``) and the routing spread of each MoE router on random tokens.

Values look like a trained model's (each tensor from its own PCG64 stream keyed by ``--seed`` and its checkpoint
name, so a ``--layers N`` model holds exactly the first N layers of the full one): norm weights N(1, 0.05);
A_log = log U[1, 16]; dt_bias = softplus^-1 of dt log-uniform in [time_step_min, time_step_max] (floored at
time_step_floor); conv1d N(0, 1/sqrt(K)); linears N(0, 1/sqrt(fan_in)), the ones that write the residual stream
(out_proj, o_proj, down_proj) also scaled by 1/sqrt(layers of CONFIG) so the residual stays O(1) through the
layers; routers N(0, 1/sqrt(H)) with e_score_correction_bias N(0, 0.01) (selection spread over the experts);
embeddings N(0, 1). The tokenizer of ``nemojax/default_model`` is copied when its vocabulary fits the config's
``vocab_size``, else none is written (said on stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
import zlib

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

GB = 1e9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RESIDUAL_WRITERS = ("out_proj", "o_proj", "down_proj")  # linears whose output is added to the residual stream
BIAS_STD = 0.01  # e_score_correction_bias: small next to the spread of the router's sigmoid scores
ROUTING_TOKENS = 4096  # random tokens of the per-router spread check
_CHUNK = 1 << 24  # elements drawn per call (bounds the float32 temporaries of a large tensor)


# ------------------------------------------------------------------------------------------------ the config
def read_config(path: str, layers: int | None):
    """``(config.json dict to write, Config, layers of the input)``: the input's fields, the first ``layers``
    layers of its pattern when given (``hybrid_override_pattern`` / ``layers_block_type`` / ``num_hidden_layers``
    cut to match), any ``quantization_config`` dropped (the output's own is written with it)."""
    from nemojax.config import Config

    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(p, encoding="utf-8") as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{p}: no such config.json") from None
    except ValueError as e:
        raise SystemExit(f"{p}: not valid JSON ({e})") from None
    full = Config.from_dict(conf)  # ConfigError names the field
    conf.pop("quantization_config", None)
    if layers is not None:
        if not 1 <= layers <= full.num_hidden_layers:
            raise SystemExit(f"--layers {layers}: must be between 1 and the {full.num_hidden_layers} layers of {p}")
        if conf.get("hybrid_override_pattern") is not None:
            conf["hybrid_override_pattern"] = full.pattern[:layers]
        for key in ("layers_block_type", "layer_types"):
            if conf.get(key) is not None:
                conf[key] = list(conf[key][:layers])
        conf["num_hidden_layers"] = layers
    return conf, Config.from_dict(conf), full.num_hidden_layers


# ------------------------------------------------------------------------------------------------ the values
class Draw:
    """The trained-like random value of one parameter or expert (see the module docstring). ``conf``: the
    config.json dict (dt range); ``depth``: the number of layers the residual scaling is for."""

    def __init__(self, cfg, conf: dict, seed: int, depth: int):
        self.cfg, self.seed = cfg, seed
        self.dt_min = float(conf.get("time_step_min", conf.get("mamba_dt_min", 1e-3)))
        self.dt_max = float(conf.get("time_step_max", conf.get("mamba_dt_max", 0.1)))
        self.dt_floor = float(conf.get("time_step_floor", conf.get("mamba_dt_init_floor", 1e-4)))
        if not 0 < self.dt_min <= self.dt_max:
            raise SystemExit(f"config: time_step_min={self.dt_min}, time_step_max={self.dt_max}: need 0 < min <= max")
        self.residual = 1.0 / math.sqrt(depth)

    def rng(self, name: str) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, zlib.crc32(name.encode())]))

    def normal(self, rng, shape, std: float, mean: float = 0.0, dtype=np.float32) -> np.ndarray:
        """N(mean, std) in ``dtype``, drawn in float32 pieces of ``_CHUNK`` elements (no full float32 copy)."""
        out = np.empty(math.prod(shape), dtype)
        for i in range(0, out.size, _CHUNK):
            n = min(_CHUNK, out.size - i)
            out[i:i + n] = rng.standard_normal(n, dtype=np.float32) * np.float32(std) + np.float32(mean)
        return out.reshape(shape)

    def __call__(self, path: str, spec, dtype) -> np.ndarray:
        """The value of parameter ``path`` (``spec``: its own, or one expert's) in ``dtype``."""
        leaf, shape = path.rsplit(".", 1)[-1], spec.shape
        rng = self.rng(spec.ckpt)
        if leaf in ("norm", "norm_f"):
            return self.normal(rng, shape, 0.05, 1.0, dtype)
        if leaf == "A_log":
            return np.log(rng.uniform(1.0, 16.0, shape)).astype(dtype)
        if leaf == "dt_bias":
            dt = np.exp(rng.uniform(math.log(self.dt_min), math.log(self.dt_max), shape))
            dt = np.maximum(dt, self.dt_floor)
            return (dt + np.log(-np.expm1(-dt))).astype(dtype)  # softplus^-1
        if leaf == "conv1d":
            return self.normal(rng, shape, 1.0 / math.sqrt(shape[-1]), 0.0, dtype)
        if leaf == "e_score_correction_bias":
            return self.normal(rng, shape, BIAS_STD, 0.0, dtype)
        if leaf == "embeddings":
            return self.normal(rng, shape, 1.0, 0.0, dtype)
        if len(shape) == 2:  # the linears, the router and lm_head
            scale = self.residual if leaf in RESIDUAL_WRITERS else 1.0
            return self.normal(rng, shape, scale / math.sqrt(shape[-1]), 0.0, dtype)
        return spec.init(rng, shape).astype(dtype)  # D, conv1d bias: the block's own init


# ------------------------------------------------------------------------------------------------ routing
def routing_spread(gate: np.ndarray, bias: np.ndarray, norm: np.ndarray, cfg, seed: int) -> dict:
    """The router (gate [E, H], bias [E], the block's norm weight [H]) on ``ROUTING_TOKENS`` random tokens
    (RMS-normed Gaussians): ``{"used": fraction of experts ever selected, "max_over_mean": max expert load / mean
    load}``."""
    import jax.numpy as jnp

    from nemojax.blocks.moe import route

    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    x = rng.standard_normal((ROUTING_TOKENS, gate.shape[1]), dtype=np.float32)
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + cfg.layer_norm_epsilon) * norm.astype(np.float32)
    _, idx = route(jnp.asarray(gate, jnp.float32), jnp.asarray(bias, jnp.float32), cfg, jnp.asarray(x))
    load = np.bincount(np.asarray(idx).reshape(-1), minlength=gate.shape[0])
    return {"used": float(np.mean(load > 0)), "max_over_mean": float(load.max() / load.mean())}


# ------------------------------------------------------------------------------------------------ the writer
class Progress:
    """Tensors done / total, GB written and the ETA (by elements drawn) on stderr, at most once a second."""

    def __init__(self, total: int, elements: int, enabled: bool):
        self.total, self.elements, self.enabled = total, elements, enabled
        self.done = self.done_elements = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, elements: int, written: int) -> None:
        self.done += 1
        self.done_elements += elements
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 1.0 or self.done == self.total):
            self.last = now
            el = now - self.t0
            eta = el * (self.elements - self.done_elements) / max(self.done_elements, 1)
            print(f"\r{self.done}/{self.total} tensors, {written / GB:.2f} GB written, {el:.0f} s, ETA {eta:.0f} s",
                  end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)


def tokenizer_fits(vocab_size: int) -> tuple[bool, str]:
    """Whether nemojax/default_model's tokenizer fits a vocabulary of ``vocab_size`` (and why)."""
    from nemojax.tokenizer import Tokenizer

    n = Tokenizer(os.path.join(_REPO, "nemojax", "default_model")).vocab_size
    if n <= vocab_size:
        return True, f"tokenizer: nemojax/default_model's ({n} tokens) copied"
    return False, f"tokenizer: none written (nemojax/default_model's has {n} tokens, the config's vocab_size is " \
                  f"{vocab_size})"


def make_checkpoint(config: str, out: str, fmt: str = "bf16", layers: int | None = None,
                    max_shard_bytes: int = 5 * 10**9, seed: int = 0, force: bool = False,
                    progress: bool = True) -> dict:
    """Write the random checkpoint (see the module docstring); returns a summary dict (counts, bytes, seconds,
    tensors/s, GB/s, peak RSS, routing spread per MoE layer)."""
    import jax.numpy as jnp

    from nemojax import quant as qlib
    from nemojax.checkpoint.convert import Quantize, pieces, write_piece
    from nemojax.checkpoint.output import atomic_output
    from nemojax.checkpoint.write import ShardWriter, write_quant_configs
    from nemojax.params import leaf_dtype, param_specs, tree_paths

    conf, cfg, depth = read_config(config, layers)
    if fmt != "bf16" and fmt not in qlib.RECIPES:
        raise SystemExit(f"--format {fmt!r}: expected bf16 or one of {', '.join(qlib.RECIPES)}")
    if max_shard_bytes <= 0:
        raise SystemExit(f"--max-shard-size must be > 0, got {max_shard_bytes}")
    quantize = Quantize(cfg, qlib.resolve_recipe(fmt) if fmt != "bf16" else None)
    draw = Draw(cfg, conf, seed, depth)
    bf16 = jnp.dtype(jnp.bfloat16)
    specs = tree_paths(param_specs(cfg))
    work = [(path, s, e) for path, spec in specs for s, e in pieces(spec)]
    bar = Progress(len(work), sum(math.prod(s.shape) for _, s, _ in work), progress)
    entries: dict = {}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with atomic_output(out, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        try:
            for path, spec, e in work:
                w = draw(path, spec, np.dtype(leaf_dtype(spec, bf16)))
                write_piece(writer, entries, path, spec, quantize(path, w, e))
                del w
                bar.update(math.prod(spec.shape), writer.total)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_quant_configs(tmp, conf, cfg, entries, kv_fp8=False)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(conf, f, indent=2)
        fits, tok_note = tokenizer_fits(cfg.vocab_size)
        if fits:
            for name in TOKENIZER_FILES:
                shutil.copy2(os.path.join(_REPO, "nemojax", "default_model", name), os.path.join(tmp, name))
        n_tensors = sum(len(names) for _, names in writer.shards)
    seconds = time.perf_counter() - t0
    table = dict(specs)
    drawn = lambda k: draw(k, table[k], np.dtype(leaf_dtype(table[k], bf16)))  # noqa: E731  (= what was written)
    routers = {i: routing_spread(*(drawn(f"layers.{i}.{p}") for p in ("mixer.gate", "mixer.e_score_correction_bias",
                                                                       "norm")), cfg, seed)
               for i in cfg.layer_indices("E")}
    shard_sizes = [os.path.getsize(os.path.join(out, f)) for f in files]
    largest = max(math.prod(s.shape) * np.dtype(leaf_dtype(s, bf16)).itemsize for _, s, _ in work)
    res = {"output": os.path.abspath(out), "format": fmt, "layers": cfg.num_hidden_layers, "pattern": cfg.pattern,
           "parameters": len(work), "tensors": n_tensors, "shards": len(files), "tensor_bytes": writer.total,
           "largest_shard_bytes": max(shard_sizes), "max_shard_bytes": max_shard_bytes,
           "seconds": round(seconds, 2), "tensors_per_s": round(n_tensors / seconds, 1),
           "gb_per_s": round(writer.total / GB / seconds, 3),
           "largest_tensor_bytes": largest, "baseline_rss_bytes": baseline,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "routing": routers, "tokenizer": fits, "tokenizer_note": tok_note}
    if routers:
        res["routing_min_used"] = min(r["used"] for r in routers.values())
        res["routing_max_over_mean"] = max(r["max_over_mean"] for r in routers.values())
    return res


def main(argv=None) -> int:
    from nemojax.cli.convert import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("config", metavar="CONFIG", help="config.json (or a folder holding one)")
    ap.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    ap.add_argument("--format", default="bf16", help="bf16 (default), nvfp4, fp8, hlwq-q5 or another recipe")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers of the pattern")
    ap.add_argument("--max-shard-size", type=parse_size, default="5GB", dest="max_shard_bytes",
                    help="maximum safetensors shard size (default 5GB; e.g. 500MB, 2GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = ap.parse_args(argv)
    from nemojax.checkpoint import ConvertError

    try:
        r = make_checkpoint(a.config, a.out, a.format, a.layers, a.max_shard_bytes, a.seed, a.force,
                            not a.no_progress)
    except (ConvertError, ValueError) as e:
        print(f"make_random_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(r["tokenizer_note"], file=sys.stderr)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['output']}: {r['format']}, {r['layers']} layers {r['pattern']!r}, {r['tensors']} tensors, "
          f"{r['tensor_bytes'] / GB:.3f} GB in {r['shards']} shard(s) (largest {r['largest_shard_bytes'] / GB:.3f} GB)"
          f"\n  {r['seconds']:.1f} s: {r['tensors_per_s']:.0f} tensors/s, {r['gb_per_s']:.3f} GB/s; peak RSS "
          f"{r['peak_rss_bytes'] / GB:.2f} GB ({r['baseline_rss_bytes'] / GB:.2f} GB before writing; largest tensor "
          f"{r['largest_tensor_bytes'] / GB:.3f} GB as bf16)")
    if r["routing"]:
        print(f"  routing on {ROUTING_TOKENS} random tokens, {len(r['routing'])} MoE layer(s): experts used >= "
              f"{100 * r['routing_min_used']:.1f}%, max expert load <= {r['routing_max_over_mean']:.2f}x the mean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
