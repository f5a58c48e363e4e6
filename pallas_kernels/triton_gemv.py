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
    """The ``triton.jit`` kernels (built on first use): ``{"nvfp4": ..., "hlwq": ...}``."""
    import triton
    import triton.language as tl

    @triton.jit
    def nvfp4_gemv_kernel(x_ptr, w_ptr, s_ptr, s2_ptr, o_ptr, N: tl.constexpr, K: tl.constexpr,
                          PER: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
        """x [M, 8, K/8] (input 8 w + j at [j, w]); w uint8 [N, K/2] (the checkpoint bytes, read here as
        little-endian int32 words [N, K/8]: 8 codes, code j = input 8 w + j); s e4m3 [N, K/16] (read as their bits);
        s2 f32 [1]; o f32 [S, M, N].
        Grid (N / BN, S, M); a step covers BW words (8 BW inputs) of BN rows; a ragged last step is masked."""
        # the checkpoint's arrays read through cast pointers (free here; a bitcast outside would be a copy):
        w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the packed bytes as little-endian words
        s_ptr = s_ptr.to(tl.pointer_type(tl.uint8))  # the e4m3 scales as their bits
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        m = tl.program_id(2)
        KW: tl.constexpr = K // 8
        n = pid_n * BN + tl.arange(0, BN)
        c = tl.arange(0, BW)
        g = tl.arange(0, BW // 2)
        wrow = w_ptr + n[:, None] * KW + c[None, :]
        srow = s_ptr + n[:, None] * (K // 16) + g[None, :]
        xrow = x_ptr + m * K + c
        c0 = pid_s * PER * BW
        # loads run two steps ahead (ptxas issues a load late in the step that requests it, so one step ahead
        # would leave its latency exposed at the start of the next); past the split's end they are masked off
        w = tl.load(wrow + c0, mask=(c0 + c < KW)[None, :], other=0)
        sb = tl.load(srow + c0 // 2, mask=(c0 // 2 + g < K // 16)[None, :], other=0)
        c1 = c0 + BW
        w1 = tl.load(wrow + c1, mask=((c1 + c < KW) & (PER > 1))[None, :], other=0)
        sb1 = tl.load(srow + c1 // 2, mask=((c1 // 2 + g < K // 16) & (PER > 1))[None, :], other=0)
        acc = tl.zeros((BN, BW // 2), dtype=tl.float32)
        for i in range(PER):
            c2 = c0 + 2 * BW
            w2 = tl.load(wrow + c2, mask=((c2 + c < KW) & (i + 2 < PER))[None, :], other=0)
            sb2 = tl.load(srow + c2 // 2, mask=((c2 // 2 + g < K // 16) & (i + 2 < PER))[None, :], other=0)
            # E4M3 (positive) read as float16 after a 7-bit shift is its value / 2^8
            s = ((sb.to(tl.int32) & 127) << 7).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            xm = c0 + c < KW
            part = tl.zeros((BN, BW), dtype=tl.float32)
            for j in tl.static_range(4):
                # nibbles j and j + 4 (inputs 8 w + j, 8 w + j + 4) moved at once into the two float16 halves of
                # a word: 3 magnitude bits to the exponent / mantissa boundary, the sign to the sign bit; each
                # half read as float16 is the E2M1 value / 2^14
                if j < 3:
                    h = ((w << (9 - 4 * j)) & 0x0E000E00) | ((w << (12 - 4 * j)) & -2147450880)  # 0x80008000
                else:
                    h = ((w >> 3) & 0x0E000E00) | (w & -2147450880)
                lo = (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                hi = ((h >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                part += lo * tl.load(xrow + j * KW + c0, mask=xm, other=0).to(tl.float32)[None, :]
                part += hi * tl.load(xrow + (j + 4) * KW + c0, mask=xm, other=0).to(tl.float32)[None, :]
            acc += tl.sum(tl.reshape(part, (BN, BW // 2, 2)), axis=2) * s
            w, sb, w1, sb1, c0 = w1, sb1, w2, sb2, c1
            c1 = c0 + BW
        y = tl.sum(acc, axis=1) * (tl.load(s2_ptr) * 4194304.0)  # 2^22 = 2^14 (E2M1) * 2^8 (E4M3)
        tl.store(o_ptr + (pid_s * tl.num_programs(2) + m) * N + n, y)

    @triton.jit
    def hlwq_gemv_kernel(x_ptr, w_ptr, n_ptr, t0_ptr, t1_ptr, o_ptr, N: tl.constexpr, KP: tl.constexpr,
                         BITS: tl.constexpr, PER: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
        """x [M, 32, KP/32] rotated (input 32 g + i at [i, g]); w uint8 [N, KP*BITS/8] (the LSB-first bytes, read
        here as int32 words [N, KP/32, BITS]: BITS words per group of 32 codes); n f16 [N, KP/128]; t0 / t1 f32
        [4^BITS] (pair tables, already / sqrt(128)); o f32 [S, M, N]. Grid (N / BN, S, M); a step covers G groups
        (a ragged last step masked); BITS <= 6."""
        w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the LSB-first bytes as little-endian words: free here
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        m = tl.program_id(2)
        NG: tl.constexpr = KP // 32
        n = pid_n * BN + tl.arange(0, BN)
        g = tl.arange(0, G)
        q = tl.arange(0, G // 4)
        wrow = w_ptr + n[:, None] * (NG * BITS) + g[None, :] * BITS
        nrow = n_ptr + n[:, None] * (KP // 128) + q[None, :]
        xrow = x_ptr + m * KP + g
        zero = tl.zeros((BN, G), dtype=tl.int32)
        # the step's BITS word planes a0..a5 (planes past BITS stay zero) and its norms; b*, c*: the next two steps,
        # loaded two steps ahead (ptxas issues a load late in the step that requests it)
        g0 = pid_s * PER * G
        on = (g0 + g < NG)[None, :]
        onn = (g0 // 4 + q < KP // 128)[None, :]
        a0 = tl.load(wrow + g0 * BITS, mask=on, other=0)
        a1 = tl.load(wrow + g0 * BITS + 1, mask=on, other=0)
        a2 = tl.load(wrow + g0 * BITS + 2, mask=on, other=0)
        a3 = tl.load(wrow + g0 * BITS + 3, mask=on & (BITS > 3), other=0)
        a4 = tl.load(wrow + g0 * BITS + 4, mask=on & (BITS > 4), other=0)
        a5 = tl.load(wrow + g0 * BITS + 5, mask=on & (BITS > 5), other=0)
        an = tl.load(nrow + g0 // 4, mask=onn, other=0)
        g1 = g0 + G
        on = (g1 + g < NG)[None, :] & (PER > 1)
        onn = (g1 // 4 + q < KP // 128)[None, :] & (PER > 1)
        b0 = tl.load(wrow + g1 * BITS, mask=on, other=0)
        b1 = tl.load(wrow + g1 * BITS + 1, mask=on, other=0)
        b2 = tl.load(wrow + g1 * BITS + 2, mask=on, other=0)
        b3 = tl.load(wrow + g1 * BITS + 3, mask=on & (BITS > 3), other=0)
        b4 = tl.load(wrow + g1 * BITS + 4, mask=on & (BITS > 4), other=0)
        b5 = tl.load(wrow + g1 * BITS + 5, mask=on & (BITS > 5), other=0)
        bn_ = tl.load(nrow + g1 // 4, mask=onn, other=0)
        acc = tl.zeros((BN, G // 4), dtype=tl.float32)
        for it in range(PER):
            g2 = g0 + 2 * G
            on = (g2 + g < NG)[None, :] & (it + 2 < PER)
            onn = (g2 // 4 + q < KP // 128)[None, :] & (it + 2 < PER)
            c0 = tl.load(wrow + g2 * BITS, mask=on, other=0)
            c1 = tl.load(wrow + g2 * BITS + 1, mask=on, other=0)
            c2 = tl.load(wrow + g2 * BITS + 2, mask=on, other=0)
            c3 = tl.load(wrow + g2 * BITS + 3, mask=on & (BITS > 3), other=0)
            c4 = tl.load(wrow + g2 * BITS + 4, mask=on & (BITS > 4), other=0)
            c5 = tl.load(wrow + g2 * BITS + 5, mask=on & (BITS > 5), other=0)
            cn = tl.load(nrow + g2 // 4, mask=onn, other=0)
            part = tl.zeros((BN, G), dtype=tl.float32)
            for i in tl.static_range(0, 32, 2):  # codes i, i + 1: one 2*BITS-bit field indexes both pair tables
                if (BITS * i) // 32 == 0:
                    lo, hi = a0, a1
                elif (BITS * i) // 32 == 1:
                    lo, hi = a1, a2
                elif (BITS * i) // 32 == 2:
                    lo, hi = a2, a3
                elif (BITS * i) // 32 == 3:
                    lo, hi = a3, a4
                elif (BITS * i) // 32 == 4:
                    lo, hi = a4, a5
                else:
                    lo, hi = a5, zero
                v = (lo.to(tl.uint32, bitcast=True) >> ((BITS * i) % 32)).to(tl.int32, bitcast=True)
                if (BITS * i) % 32 + 2 * BITS > 32:
                    v = v | (hi << (32 - (BITS * i) % 32))
                idx = v & ((1 << (2 * BITS)) - 1)
                xm = g0 + g < NG
                part += tl.load(t0_ptr + idx) * tl.load(xrow + i * NG + g0, mask=xm, other=0).to(tl.float32)[None, :]
                part += tl.load(t1_ptr + idx) * tl.load(xrow + (i + 1) * NG + g0, mask=xm, other=0).to(tl.float32)[None, :]
            acc += tl.sum(tl.reshape(part, (BN, G // 4, 4)), axis=2) * an.to(tl.float32)
            a0, a1, a2, a3, a4, a5, an = b0, b1, b2, b3, b4, b5, bn_
            b0, b1, b2, b3, b4, b5, bn_ = c0, c1, c2, c3, c4, c5, cn
            g0 = g1
            g1 = g0 + G
        tl.store(o_ptr + (pid_s * tl.num_programs(2) + m) * N + n, tl.sum(acc, axis=1))

    return {"nvfp4": nvfp4_gemv_kernel, "hlwq": hlwq_gemv_kernel}


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

    from .nvfp4 import _check

    _check_rows(x, "nvfp4_gemv")
    n, k = _check(x, packed, scale, scale_2, (), "nvfp4_gemv")
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

    from .hlwq import _check

    _check_rows(xr, "hlwq_gemv")
    n, kp = _check(xr, packed, norms, table, bits, (), "hlwq_gemv")
    grid, meta = hlwq_launch(n, kp, bits, bn, splits=splits)
    m = xr.shape[0]
    out = _jax_triton().triton_call(
        *hlwq_operands(xr, packed, norms, table, bits), kernel=kernels()["hlwq"],
        out_shape=jax.ShapeDtypeStruct((grid[1], m, n), jnp.float32), grid=(*grid, m), num_warps=num_warps,
        num_stages=1, **meta)
    return out.sum(0).astype(xr.dtype)
