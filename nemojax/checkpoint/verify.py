"""Whether a checkpoint works: load every tensor (shapes and dtypes checked) and run one forward pass on a few
tokens, checking the logits are finite (``nemojax verify``)."""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..model import forward_jit
from .read import MapReport, load_params
from .source import CheckpointError

__all__ = ["verify_checkpoint"]


def verify_checkpoint(d: str, base: str | None = None, tokens: int = 8, mmap: bool = False) -> dict:
    """Load + one forward pass; ``{"ok": bool, "error": str | None, "logits_std", ...}``. Raises on unusable input
    (ConfigError / CheckpointError / QuantError; ValueError for ``mmap=True`` off the CPU) so the caller can tell
    bad input from a failed check. ``mmap``: load as ``load_params(..., mmap=True)`` (``"mapped_bytes"`` /
    ``"copied_bytes"`` in the result)."""
    if not os.path.isdir(d):
        raise CheckpointError(f"{os.fspath(d)}: not a folder")
    t0 = time.perf_counter()
    cfg = Config.from_json(d)
    report = MapReport()
    params = load_params(d, cfg, "bfloat16", base=base, mmap=mmap, report=report)
    load_s = time.perf_counter() - t0
    ids = (np.arange(tokens, dtype=np.int64) * 7 + 3) % cfg.vocab_size
    t0 = time.perf_counter()
    logits = np.asarray(forward_jit(params, cfg, jnp.asarray(ids[None, :], jnp.int32)))
    fwd_s = time.perf_counter() - t0
    finite = bool(np.isfinite(logits).all())
    want = (1, tokens, cfg.vocab_size)
    ok = finite and tuple(logits.shape) == want
    err = None
    if not finite:
        err = f"{int((~np.isfinite(logits)).sum())} non-finite logit(s)"
    elif tuple(logits.shape) != want:
        err = f"logits have shape {list(logits.shape)}, expected {list(want)}"
    return {"path": os.path.abspath(d), "ok": ok, "error": err, "tokens": tokens,
            "logits_shape": list(logits.shape), "finite": finite,
            "logits_std": float(np.std(logits)) if finite else None, "load_s": round(load_s, 3),
            "forward_s": round(fwd_s, 3),
            **({"mapped_bytes": report.mapped_bytes, "copied_bytes": report.copied_bytes} if mmap else {})}
