"""Decode GEMVs written in Triton and called through jax-triton (``triton_call``): NVFP4 (``nvfp4_gemv``) and HLWQ
rotated (``hlwq_gemv``), up to 8 rows, same signatures and results as
:func:`pallas_kernels.nvfp4.nvfp4_matmul_reference` / :func:`pallas_kernels.hlwq.hlwq_matmul_reference`.

Each program owns ``BN`` output columns of one row and one of ``splits`` K ranges (split-K: fp32 partials added
by XLA afterwards), reads the checkpoint bytes as stored (ModelOpt nibbles; LSB-first ``bits``-bit codes),
decodes in registers (E2M1 codes and E4M3 scales by bit moves into float16; the Lloyd-Max level by a load from
the 2^bits-entry table, which stays in L1) and accumulates multiply-adds in fp32, reducing once at the end.

``triton`` and ``jax_triton`` are imported lazily: this module imports without them. jax-triton runs only on a
GPU (it has no CPU lowering and no interpret mode); the Triton kernels themselves also run under Triton's own
interpreter (``TRITON_INTERPRET=1``, torch tensors), which is how the tests check them on a CPU host.
jax-triton versions: 0.4.x needs jax >= 0.11 (and breaks on jax 0.12.0 without the DCE-rule shim applied
below; with Triton 3.6 it needs the TMA-constant shim below); 0.3.x needs a GPU jaxlib to import.
"""
from __future__ import annotations

import functools

__all__ = ["nvfp4_gemv", "hlwq_gemv", "nvfp4_launch", "nvfp4_operands", "hlwq_launch", "unavailable", "kernels",
           "MAX_ROWS"]

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
        """x [M, 8, K/8] (input 8 w + j at [j, w]); w int32 [N, K/8] (the packed bytes read as little-endian
        words: 8 codes, code j = input 8 w + j); s e4m3 [N, K/16] (as uint8 bits); s2 f32 [1]; o f32 [S, M, N].
        Grid (N / BN, S, M); a step covers BW words (8 BW inputs) of BN rows; a ragged last step is masked."""
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
    def hlwq_gemv_kernel(x_ptr, p_ptr, nrm_ptr, t_ptr, o_ptr, N: tl.constexpr, KP: tl.constexpr,
                         BITS: tl.constexpr, PER: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr):
        """x [M, KP] rotated; p uint8 [N, KP*BITS/8] LSB-first; nrm f16 [N, KP/128]; t f32 [2^BITS] (already
        / sqrt(128)); o f32 [S, M, N]. Grid (N / BN, S, M); a step covers BQ groups of 8 codes."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        m = tl.program_id(2)
        n = pid_n * BN + tl.arange(0, BN)
        q = tl.arange(0, BQ)
        acc = tl.zeros((BN, BQ), dtype=tl.float32)
        row = p_ptr + n[:, None] * (KP * BITS // 8)
        for st in range(PER):
            g = (pid_s * PER + st) * BQ + q  # groups of 8 codes (BITS bytes)
            nrm = tl.load(nrm_ptr + n[:, None] * (KP // 128) + (g // 16)[None, :]).to(tl.float32)
            part = tl.zeros((BN, BQ), dtype=tl.float32)
            for i in tl.static_range(8):  # code i: bits [BITS i, BITS i + BITS) of the group's bytes
                v = tl.load(row + (g * BITS + (BITS * i) // 8)[None, :]).to(tl.int32) >> ((BITS * i) % 8)
                if (BITS * i) % 8 + BITS > 8:
                    nxt = tl.load(row + (g * BITS + (BITS * i) // 8 + 1)[None, :]).to(tl.int32)
                    v = v | (nxt << (8 - (BITS * i) % 8))
                w = tl.load(t_ptr + (v & ((1 << BITS) - 1)))
                part += w * tl.load(x_ptr + m * KP + 8 * g + i).to(tl.float32)[None, :]
            acc += part * nrm
        tl.store(o_ptr + (pid_s * tl.num_programs(2) + m) * N + n, tl.sum(acc, axis=1))

    return {"nvfp4": nvfp4_gemv_kernel, "hlwq": hlwq_gemv_kernel}


def nvfp4_launch(n: int, k: int, bn: int = 64, bw: int = 16, splits: int | None = None):
    """Launch geometry of the NVFP4 GEMV: (grid without the row axis, metaparameters). A step reads BN x BW
    int32 words (BN = 64, BW = 16: 4 KB per program, two 16-byte loads per thread, issued two steps ahead); splits bring the programs to at least ~4 per H100 SM (its register file holds 8 at this
    kernel's 56-63 registers). ``tools/kernel_sass.py`` reads the compiled loop."""
    while n % bn:
        bn //= 2
    steps = -(-(k // 8) // bw)
    want = splits or -(-PROGRAMS // (n // bn))
    per = min(steps, max(2, steps // max(1, want)))  # >= 2 steps, so the prefetch overlaps something
    return (n // bn, -(-steps // per)), {"N": n, "K": k, "PER": per, "BN": bn, "BW": bw}


def nvfp4_operands(x, packed, scale, scale_2):
    """The NVFP4 GEMV's operands from the checkpoint tensors (jax arrays): x [M, K] -> [M, 8, K/8] (input
    ``8 w + j`` at ``[j, w]``: a few KB, fused by XLA into x's producer), packed uint8 [N, K/2] -> int32 words
    [N, K/8] (a bitcast), scale e4m3 -> its uint8 bits, scale_2 -> f32 [1]."""
    import jax
    import jax.numpy as jnp

    m, k = x.shape
    n = packed.shape[0]
    return (x.reshape(m, k // 8, 8).transpose(0, 2, 1), jax.lax.bitcast_convert_type(
        packed.reshape(n, k // 8, 4), jnp.int32), jax.lax.bitcast_convert_type(scale, jnp.uint8),
        jnp.asarray(scale_2, jnp.float32).reshape(1))


def hlwq_launch(n: int, kp: int, bits: int, bn: int = 64, bq: int = 16, splits: int | None = None):
    """Launch geometry of the HLWQ GEMV."""
    steps = kp // (8 * bq)
    per = steps // _splits(steps, n // bn, splits)
    return (n // bn, steps // per), {"N": n, "KP": kp, "BITS": bits, "PER": per, "BN": bn, "BQ": bq}


PROGRAMS = 528  # ~4 programs per H100 SM (132 SMs)


def _splits(steps: int, col_blocks: int, want: int | None) -> int:
    """A divisor of ``steps`` (every split gets the same K range) near ``want`` (default: ~2 programs per H100
    SM)."""
    want = want or -(-264 // col_blocks)
    return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= max(1, want))


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
    """jax-triton HLWQ rotated decode GEMV (GPU only); same signature and result as
    :func:`pallas_kernels.hlwq.hlwq_matmul_reference`."""
    import jax
    import jax.numpy as jnp

    from .hlwq import _check, _scaled

    _check_rows(xr, "hlwq_gemv")
    n, kp = _check(xr, packed, norms, table, bits, (), "hlwq_gemv")
    bn = bn if n % bn == 0 else 16
    grid, meta = hlwq_launch(n, kp, bits, bn, splits=splits)
    m = xr.shape[0]
    out = _jax_triton().triton_call(
        xr, packed, norms, _scaled(table).reshape(-1), kernel=kernels()["hlwq"],
        out_shape=jax.ShapeDtypeStruct((grid[1], m, n), jnp.float32), grid=(*grid, m), num_warps=num_warps,
        num_stages=2, **meta)
    return out.sum(0).astype(xr.dtype)
