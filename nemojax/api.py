"""The convenience handle: ``nemojax.load(path) -> Model`` with ``.config``, ``.params`` and ``.logits``."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .generate import generate, generate_stream
from .model import forward_jit
from .weights import CheckpointError, load_params, resolve_dtype

__all__ = ["Model", "load"]


@dataclasses.dataclass
class Model:
    """A loaded model: ``config`` (static) and ``params`` (the pytree). Holds no other state."""

    config: Config
    params: dict

    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids [B, T] (or [T]), attention_mask [B, T] (1 = token, 0 = left pad) -> float32 [B, T, V]."""
        ids = _as_ids(input_ids, self.config)
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
            mask = mask.astype(jnp.int32)
        return forward_jit(self.params, self.config, ids, mask)

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, attention_mask=None, stop_token_ids=None,
                 callback=None, expert_cache: int | None = None, policy: str = "ours",
                 offload_stats: dict | None = None, **kw) -> np.ndarray:
        """New token ids [B, max_new_tokens] (pad id after a sequence stops).

        input_ids: [B, T] array (left-padded, with ``attention_mask``) or a list of token lists of any lengths.
        temperature 0 is greedy; top_k 0 and top_p 1 are off. ``callback(chunk)`` streams [B, n] chunks.
        expert_cache: routed experts stay in host memory with this many device slots per MoE layer
        (``nemojax.offload``; ``policy`` one of lru, lfu, lfru-tinyserve, lfru-fork, lfru-polarquant, ours);
        ``offload_stats`` (a dict) then receives hit rate, bytes per token, transfer wait and predictor accuracy.
        """
        if expert_cache is not None:
            from .offload import OffloadStats, generate_offloaded, offload_experts

            key = (expert_cache, policy)
            if getattr(self, "_offload_key", None) != key:
                self._offload = offload_experts(self.params, self.config, expert_cache, policy)
                self._offload_key = key
            st = OffloadStats()
            out = generate_offloaded(self._offload, self.config, input_ids, max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, attention_mask=attention_mask,
                                     stop_token_ids=stop_token_ids, stats=st, **kw)
            if callback is not None:
                callback(out)
            if offload_stats is not None:
                offload_stats.update(st.summary())
            return out
        return generate(self.params, self.config, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, attention_mask=attention_mask, stop_token_ids=stop_token_ids,
                        callback=callback, **kw)

    def generate_stream(self, input_ids, max_new_tokens: int, **kw):
        """Iterator over [B, n] chunks of new tokens; keyword arguments as :meth:`generate`."""
        return generate_stream(self.params, self.config, input_ids, max_new_tokens, **kw)


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
         backend: str = "xla") -> Model:
    """Load a Hugging Face Nemotron-H checkpoint folder (config.json + safetensors).

    dtype: weight dtype ('bfloat16', 'float32', 'float16'); A_log, D and e_score_correction_bias stay fp32.
    nvfp4_mode: for ModelOpt NVFP4 checkpoints, "w4a16" (weight-only; what Hopper runs) or "w4a4" (activations
    quantized per 16 with the checkpoint's input_scale; what Blackwell computes).
    hlwq_path: for polarengine (HLWQ) checkpoints, "dequant" (rebuild W, one matmul) or "rotated" (rotate the
    activations once per 128-block, codebook lookup x norm); base: the BF16 checkpoint an HLWQ checkpoint was
    made from (it supplies the e_score_correction_bias those checkpoints drop); dequantize: load every
    quantized weight as a plain ``dtype`` array. backend: the quantized matmuls' kernels, "xla" (reference),
    "pallas" or "triton" (``nemojax.quant.set_backend``).
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
    if backend != "xla":
        from . import quant

        quant.set_backend({}, backend)  # a bad or unavailable backend fails before the weights are read
    params = load_params(path, cfg, dt, progress=progress, nvfp4_mode=nvfp4_mode, hlwq_path=hlwq_path, base=base,
                         dequantize=dequantize)
    if backend != "xla":
        params = quant.set_backend(params, backend)
    return Model(cfg, params)
