"""The Triton kernels behind :mod:`pallas_kernels.triton_gemv` (imported from there on first use, so that the
package imports without triton). Module-level, so that Triton's interpreter, which re-executes a kernel's source
with its module's globals, finds the helper the HLWQ kernel calls."""
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
def hlwq_step_loads(wrow, nrow, g0, g, q, live, NG: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr):
    """One K step's loads of the HLWQ GEMV (from group ``g0``): its six word planes (planes past BITS, groups
    past the end and steps that are not ``live`` give zeros) and its block norms."""
    on = (g0 + g < NG)[None, :] & live
    p0 = tl.load(wrow + g0 * BITS, mask=on, other=0)
    p1 = tl.load(wrow + g0 * BITS + 1, mask=on, other=0)
    p2 = tl.load(wrow + g0 * BITS + 2, mask=on, other=0)
    p3 = tl.load(wrow + g0 * BITS + 3, mask=on & (BITS > 3), other=0)
    p4 = tl.load(wrow + g0 * BITS + 4, mask=on & (BITS > 4), other=0)
    p5 = tl.load(wrow + g0 * BITS + 5, mask=on & (BITS > 5), other=0)
    nrm = tl.load(nrow + g0 // 4, mask=(g0 // 4 + q < KP // 128)[None, :] & live, other=0)
    return p0, p1, p2, p3, p4, p5, nrm

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
    a0, a1, a2, a3, a4, a5, an = hlwq_step_loads(wrow, nrow, g0, g, q, True, NG, KP, BITS)
    g1 = g0 + G
    b0, b1, b2, b3, b4, b5, bn_ = hlwq_step_loads(wrow, nrow, g1, g, q, PER > 1, NG, KP, BITS)
    acc = tl.zeros((BN, G // 4), dtype=tl.float32)
    for it in range(PER):
        g2 = g0 + 2 * G
        c0, c1, c2, c3, c4, c5, cn = hlwq_step_loads(wrow, nrow, g2, g, q, it + 2 < PER, NG, KP, BITS)
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
