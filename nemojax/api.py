"""The convenience handle: ``nemojax.load(path) -> Model`` with ``.config``, ``.params``, ``.experts`` and
``.logits`` / ``.generate`` / ``.generate_stream`` / ``.offload``."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .generate import generate, generate_stream
from .blocks.moe import RoutedExperts
from .model import forward, forward_jit
from .checkpoint import CheckpointError, MapReport, load_params, resolve_dtype, stack_banks
from .experts.bank import HostBank
from .kernels import resolve_backend

__all__ = ["Model", "load"]


class Model:
    """A loaded model: ``config`` (static), ``params`` (the pytree) and ``experts``, how its MoE blocks run their
    routed experts (None: resident on the device; :meth:`offload` returns a model whose routed experts live in
    host memory behind a device cache, a ``nemojax.experts.offload.OffloadedExperts`` that holds the slots and
    their ``stats``); ``mapped``: for ``load(..., mmap=True)``, what was memory-mapped and what copied
    (``nemojax.checkpoint.MapReport``). Holds no other state.

    ``params`` built with routed-expert banks left in the checkpoint files (``HostBank``, ``load(...,
    mmap=True)``) are stacked into RAM on first use of ``params`` (:meth:`logits`, :meth:`generate`, a serving
    engine); :meth:`offload` takes them as they are, so the experts stay on disk behind the device cache."""

    def __init__(self, config: Config, params: dict, experts: RoutedExperts | None = None,
                 mapped: MapReport | None = None):
        self.config, self.experts, self.mapped = config, experts, mapped
        self.params = params

    @property
    def params(self) -> dict:
        """The parameter pytree (routed-expert banks still in the files are stacked into RAM here, once)."""
        if self._views:
            self._params, self._views = stack_banks(self._params), False
        return self._params

    @params.setter
    def params(self, params: dict) -> None:
        self._params = params
        self._views = any(isinstance(x, HostBank) for x in jax.tree.leaves(params))

    def replace(self, **changes) -> "Model":
        """A new Model with some of ``config``, ``params``, ``experts``, ``mapped`` replaced (``dataclasses.replace``
        style; this model is left as it is)."""
        fields = {"config": self.config, "params": self._params, "experts": self.experts, "mapped": self.mapped}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Model.replace: unknown field(s) {sorted(unknown)}; fields are {list(fields)}")
        return Model(**(fields | changes))

    def __repr__(self) -> str:
        return f"Model(config={self.config!r}, experts={self.experts!r}, mapped={self.mapped!r})"

    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids [B, T] (or [T]), attention_mask [B, T] (1 = token, 0 = left pad) -> float32 [B, T, V]."""
        ids = _as_ids(input_ids, self.config)
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
            mask = mask.astype(jnp.int32)
        run = forward if self.experts is not None and self.experts.host_driven else forward_jit
        return run(self.params, self.config, ids, mask, experts=self.experts)

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, attention_mask=None, stop_token_ids=None,
                 callback=None, **kw) -> np.ndarray:
        """New token ids [B, max_new_tokens] (pad id after a sequence stops).

        input_ids: [B, T] array (left-padded, with ``attention_mask``) or a list of token lists of any lengths.
        temperature 0 is greedy; top_k 0 and top_p 1 are off. ``callback(chunk)`` streams [B, n] chunks.
        """
        return generate(self.params, self.config, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, attention_mask=attention_mask, stop_token_ids=stop_token_ids,
                        callback=callback, experts=self.experts, **kw)

    def generate_stream(self, input_ids, max_new_tokens: int, **kw):
        """Iterator over [B, n] chunks of new tokens; keyword arguments as :meth:`generate`."""
        return generate_stream(self.params, self.config, input_ids, max_new_tokens, experts=self.experts, **kw)

    def offload(self, expert_cache: int, policy: str = "adaptive", *, prefetch: bool = True, device=None) -> Model:
        """This model with its routed experts in host memory and ``expert_cache`` device slots per MoE layer
        (``nemojax.experts.offload``); this model is left as it is. ``policy``: the slots' eviction policy, one of
        lru, lfu, lfru-tinyserve, lfru-vllm, lfru-polarquant, adaptive (``nemojax.experts.policies``);
        ``prefetch``: put the next MoE layer's predicted experts ahead of use. The returned model's
        ``experts.stats`` (``OffloadStats``; ``.summary()``: hit rate, bytes per token, transfer wait, predictor
        accuracy) counts over its forwards (``experts.reset_stats()`` starts anew)."""
        if self.experts is not None and self.experts.host_driven:
            raise ValueError("the routed experts are offloaded already: offload the resident model")
        from .experts.offload import offload_experts

        params, experts = offload_experts(self._params, self.config, expert_cache, policy, prefetch,
                                          device)  # banks still on disk stay there
        return Model(self.config, params, experts, self.mapped)


def _as_ids(input_ids, cfg: Config) -> jax.Array:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, length] with length >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    return jnp.asarray(ids, jnp.int32)


def load(path: str | os.PathLike, *, dtype="bfloat16", nvfp4_mode: str = "w4a16", hlwq_path: str = "dequant",
         base: str | os.PathLike | None = None, dequantize: bool = False, progress: bool | None = None,
         backend: str = "xla", mmap: bool = False, **run_options) -> Model:
    """Load a Hugging Face Nemotron-H checkpoint folder (config.json + safetensors).

    dtype: weight dtype ('bfloat16', 'float32', 'float16'); A_log, D and e_score_correction_bias stay fp32.
    nvfp4_mode: for ModelOpt NVFP4 checkpoints, "w4a16" (weight-only; what Hopper runs) or "w4a4" (activations
    quantized per 16 with the checkpoint's input_scale; what Blackwell computes).
    hlwq_path: for polarengine (HLWQ) checkpoints, "dequant" (rebuild W, one matmul) or "rotated" (rotate the
    activations once per 128-block, codebook lookup x norm); base: the BF16 checkpoint an HLWQ checkpoint was
    made from (it supplies the e_score_correction_bias those checkpoints drop); dequantize: load every
    quantized weight as a plain ``dtype`` array. backend: the quantized matmuls' kernels, "xla" (reference),
    "cpu", "pallas", "triton" or "auto" ("cpu" on a CPU, else "xla"; ``nemojax.quant.set_backend``). run_options: the run options of other registered formats
    (``QuantFormat.run_options``), e.g. ``fp8_mode="w8a8"`` for ModelOpt FP8 checkpoints with ``input_scale``
    ("w8a16", the default, is weight-only).
    mmap: (CPU only; ValueError elsewhere, and for an orbax folder) keep every weight stored as it is used in the
    files' read-only memory maps instead of copying it into RAM (``Model.mapped`` counts the bytes); the routed
    experts stay per-expert views of the files until first used: :meth:`Model.offload` keeps them there (the
    page cache is their host tier), a resident forward stacks them into RAM (a copy of every bank). The files
    must not be rewritten in place while mapped (docs/real-shapes.md, "Memory-mapped weights").
    """
    dt = resolve_dtype(dtype)
    if not os.path.isdir(path):  # else Config.from_json would parse a *.safetensors file as JSON
        raise CheckpointError(f"{os.fspath(path)}: not a folder (expected a checkpoint folder with config.json "
                              f"and *.safetensors files)")
    cfg = Config.from_json(path)
    if progress is None:
        progress = os.isatty(2)
    if hlwq_path not in ("dequant", "rotated"):
        raise ValueError(f"hlwq_path={hlwq_path!r}: expected 'dequant' or 'rotated'")
    backend = resolve_backend(backend)
    if backend != "xla":
        from . import quant

        quant.set_backend({}, backend)  # a bad or unavailable backend fails before the weights are read
    report = MapReport() if mmap else None
    params = load_params(path, cfg, dt, progress=progress, nvfp4_mode=nvfp4_mode, hlwq_path=hlwq_path, base=base,
                         dequantize=dequantize, mmap=mmap, bank_views=mmap, report=report, **run_options)
    if backend != "xla":
        params = quant.set_backend(params, backend)
        params = jax.tree.map(lambda x: HostBank([quant.set_backend(e, backend) for e in x.experts])
                              if isinstance(x, HostBank) else x, params)
    return Model(cfg, params, mapped=report)
