"""Decode GEMVs written in Triton and called through jax-triton (``triton_call``): NVFP4 (``nvfp4_gemv``) and HLWQ
rotated (``hlwq_gemv``, bits <= 6), up to 8 rows, same signatures and results as
:func:`pallas_kernels.nvfp4.nvfp4_matmul_reference` / :func:`pallas_kernels.hlwq.hlwq_matmul_reference`; the
same design as the Pallas GEMVs (``nvfp4._gemv``, ``hlwq._gemv``).

Each program owns ``BN`` output columns of one row and one of ``splits`` K ranges (split-K: fp32 partials added
by XLA afterwards). The checkpoint bytes are read as int32 words through a cast pointer (inside the kernel: a
bitcast outside would be a copy, XLA's GPU compiler expands a width-changing bitcast): NVFP4 decodes two E2M1
codes per bit operation into the halves of a float16 pair; HLWQ takes codes two at a time, one ``2 bits``-bit
field indexing two pair tables (``4^bits`` entries, in L1). Activations come in a layout that makes every load
contiguous (``*_operands``), weight loads run two K steps ahead, and multiply-adds accumulate in fp32, reduced
once at the end.

``triton`` and ``jax_triton`` are imported lazily: this module imports without them. jax-triton runs only on a
GPU (it has no CPU lowering and no interpret mode); the Triton kernels themselves also run under Triton's own
interpreter (``TRITON_INTERPRET=1``, torch tensors), which is how the tests check them on a CPU host.
jax-triton versions: 0.4.x needs jax >= 0.11 (and breaks on jax 0.12.0 without the DCE-rule shim applied
below; with Triton 3.6 it needs the TMA-constant shim below); 0.3.x needs a GPU jaxlib to import.
"""
from __future__ import annotations

import functools

from .hlwq import GEMV_MAX_BITS as MAX_BITS  # HLWQ: the pair tables have 4^bits entries

__all__ = ["nvfp4_gemv", "hlwq_gemv", "nvfp4_launch", "nvfp4_operands", "hlwq_launch", "hlwq_operands", "unavailable",
           "kernels", "MAX_ROWS", "MAX_BITS"]

MAX_ROWS = 8


def unavailable() -> str | None:
    """Why the jax-triton GEMVs cannot run here (None when they can)."""
    import jax

    if jax.default_backend() != "gpu":
        return f"the jax-triton GEMVs need an NVIDIA GPU (JAX backend here: {jax.default_backend()!r})"
    try:
        _jax_triton()
    except ImportError as e:
        return f"jax-triton is not importable ({e}); pip install 'nemojax[gpu]'"
    return None


@functools.lru_cache(maxsize=None)
def kernels():
    """The ``triton.jit`` kernels (``pallas_kernels._triton_kernels``, imported on first use):
    ``{"nvfp4": ..., "hlwq": ...}``."""
    from . import _triton_kernels as K

    return {"nvfp4": K.nvfp4_gemv_kernel, "hlwq": K.hlwq_gemv_kernel}


def nvfp4_launch(n: int, k: int, bn: int = 64, bw: int = 16, splits: int | None = None):
    """Launch geometry of the NVFP4 GEMV: (grid without the row axis, metaparameters). A step reads BN x BW int32
    words (BN = 64, BW = 16: 4 KB per program, two 16-byte loads per thread, issued two steps ahead); K splits
    bring the programs to ~4 per H100 SM (:func:`pallas_kernels.common.gemv_splits`). ``tools/kernel_sass.py``
    reads the compiled loop."""
    from .common import gemv_splits

    while n % bn:
        bn //= 2
    per, s = gemv_splits(-(-(k // 8) // bw), n // bn, splits)
    return (n // bn, s), {"N": n, "K": k, "PER": per, "BN": bn, "BW": bw}


def nvfp4_operands(x, packed, scale, scale_2):
    """The NVFP4 GEMV's operands from the checkpoint tensors (jax arrays): x [M, K] -> [M, 8, K/8] (input
    ``8 w + j`` at ``[j, w]``: a few KB, fused by XLA into x's producer), packed uint8 [N, K/2] as it is (the kernel
    reads it as int32 words), scale e4m3 as it is, scale_2 -> f32 [1]."""
    import jax.numpy as jnp

    m, k = x.shape
    return x.reshape(m, k // 8, 8).transpose(0, 2, 1), packed, scale, jnp.asarray(scale_2, jnp.float32).reshape(1)


def hlwq_launch(n: int, kp: int, bits: int, bn: int = 64, g: int | None = None, splits: int | None = None):
    """Launch geometry of the HLWQ GEMV (bits <= 6): a step reads BN rows x G groups of 32 codes (``bits`` words
    each) and their block norms, two steps ahead; K splits as for NVFP4."""
    from .common import KernelError, gemv_splits

    if bits > MAX_BITS:
        raise KernelError(f"hlwq_gemv: bits={bits}: the pair tables take at most {MAX_BITS} bits")
    while n % bn:
        bn //= 2
    ng = kp // 32
    g = g or next(c for c in (8, 4) if ng % c == 0)  # K_pad % 128 == 0: 4 always divides
    per, s = gemv_splits(-(-ng // g), n // bn, splits)
    return (n // bn, s), {"N": n, "KP": kp, "BITS": bits, "PER": per, "BN": bn, "G": g}


def hlwq_operands(xr, packed, norms, table, bits: int):
    """The HLWQ GEMV's operands (jax arrays): xr [M, K_pad] -> [M, 32, K_pad/32] (input ``32 g + i`` at ``[i, g]``),
    packed uint8 [N, K_pad*bits/8] as it is (the kernel reads it as int32 words [N, K_pad/32, bits]), norms, and
    the two pair tables ``t0[p] = level(p & mask)``, ``t1[p] = level(p >> bits)`` (levels / sqrt(128))."""
    from .hlwq import pair_tables

    m, kp = xr.shape
    t0, t1 = pair_tables(table, bits)
    return xr.reshape(m, kp // 32, 32).transpose(0, 2, 1), packed, norms, t0[0], t1[0]


@functools.lru_cache(maxsize=None)
def _jax_triton():
    import jax

    # jax-triton 0.4.1 imports two TMA-descriptor constants Triton 3.6 does not define; without them it replaces the
    # whole NVIDIA backend by a stub (and every launch fails). Our kernels pass no TMA descriptors: define them.
    try:
        import triton.backends.nvidia.driver as nv_driver

        if not hasattr(nv_driver, "TMA_TF32"):
            nv_driver.TMA_TF32 = 0
        if not hasattr(nv_driver, "TMA_DTYPE_DEVICE_TO_HOST"):
            nv_driver.TMA_DTYPE_DEVICE_TO_HOST = {}
    except ImportError:
        pass
    import jax_triton as jt

    # jax-triton 0.4.1 registers a 2-argument DCE rule; JAX 0.12 calls it with 3 (used_outputs, live_ins, eqn)
    try:
        from jax._src.interpreters import partial_eval as pe

        prim = jt.triton_lib.triton_kernel_call_p
        rule = pe.dce_rules.get(prim)
        if rule is not None and rule.__code__.co_argcount == 2 and jax.__version_info__ >= (0, 12):
            pe.dce_rules[prim] = lambda used_outputs, eqn, *rest: ([True] * len(eqn.invars), eqn)
    except (ImportError, AttributeError):
        pass
    return jt


def _check_rows(x, what):
    from .common import KernelError

    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise KernelError(f"{what}: x must be [M <= {MAX_ROWS}, K], got {list(x.shape)}")


def nvfp4_gemv(x, packed, scale, scale_2, *, bn: int = 64, bw: int = 16, splits: int | None = None,
               num_warps: int = 4):
    """jax-triton NVFP4 decode GEMV (GPU only); same signature and result as
    :func:`pallas_kernels.nvfp4.nvfp4_matmul_reference`."""
    import jax
    import jax.numpy as jnp

    from .nvfp4 import check_operands

    _check_rows(x, "nvfp4_gemv")
    n, k = check_operands(x, packed, scale, scale_2, (), "nvfp4_gemv")
    grid, meta = nvfp4_launch(n, k, bn, bw, splits=splits)
    m = x.shape[0]
    out = _jax_triton().triton_call(
        *nvfp4_operands(x, packed, scale, scale_2), kernel=kernels()["nvfp4"],
        out_shape=jax.ShapeDtypeStruct((grid[1], m, n), jnp.float32), grid=(*grid, m), num_warps=num_warps,
        num_stages=1, **meta)
    return out.sum(0).astype(x.dtype)


def hlwq_gemv(xr, packed, norms, table, bits: int, *, bn: int = 64, splits: int | None = None,
              num_warps: int = 4):
    """jax-triton HLWQ rotated decode GEMV (GPU only, bits <= 6); same signature and result as
    :func:`pallas_kernels.hlwq.hlwq_matmul_reference`."""
    import jax
    import jax.numpy as jnp

    from .hlwq import check_operands

    _check_rows(xr, "hlwq_gemv")
    n, kp = check_operands(xr, packed, norms, table, bits, (), "hlwq_gemv")
    grid, meta = hlwq_launch(n, kp, bits, bn, splits=splits)
    m = xr.shape[0]
    out = _jax_triton().triton_call(
        *hlwq_operands(xr, packed, norms, table, bits), kernel=kernels()["hlwq"],
        out_shape=jax.ShapeDtypeStruct((grid[1], m, n), jnp.float32), grid=(*grid, m), num_warps=num_warps,
        num_stages=1, **meta)
    return out.sum(0).astype(xr.dtype)
