"""The one dispatch point from quantized weight nodes to the kernels of ``pallas_kernels``.

:data:`KERNELS` maps ``(format name, backend)`` to a format's kernels on a backend: the dense linear op (``x [M, K]
@ W^T`` for a 2-D node), the grouped op of the MoE's routed experts (rows sorted by expert through a bank), and,
for a format with a shared input transform, the dense op on transformed activations. ``nemojax.ops.linear``,
the routed experts (``nemojax.blocks.moe.grouped_experts``) and ``nemojax.quant.set_backend`` ask here; a node
whose ``(format, backend)`` has no entry, or whose shape its kernels do not take, runs the format's reference
(XLA). Activations are reshaped to 2-D, the kernels run in Pallas interpret mode off a GPU, and they read the
checkpoint bytes as stored (no repacking per call).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import hlwq as hlwq_kernels
from pallas_kernels import nvfp4 as nvfp4_kernels
from pallas_kernels import triton_gemv

from .formats import format_of
from .formats import fp8
from .formats.hlwq.rows import rows_product as hlwq_rows_product
from .formats.nvfp4 import fake_quant, rows_product

__all__ = ["BACKENDS", "KERNELS", "FormatKernels", "linear", "linear_transformed", "grouped_experts",
           "backend_unavailable", "resolve_backend", "interpret", "GEMV_ROWS", "CPU_ROWS"]

BACKENDS = ("xla", "cpu", "pallas", "triton")
GEMV_ROWS = 8  # up to this many rows the "triton" backend uses the jax-triton decode GEMVs
CPU_ROWS = 64  # up to this many rows the "cpu" backend decodes NVFP4 / HLWQ / FP8 tile by tile (more: a GEMM)


def interpret() -> bool:
    """Pallas runs compiled on GPU, interpreted elsewhere."""
    return jax.default_backend() != "gpu"


def resolve_backend(backend: str) -> str:
    """``"auto"``: "cpu" when jax runs on a CPU, else "xla"; any other name unchanged."""
    if backend == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return backend


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can)."""
    return triton_gemv.unavailable() if backend == "triton" else None


@dataclasses.dataclass(frozen=True)
class FormatKernels:
    """The kernels of one format on one backend.

    linear(x [M, K], node) -> [M, N] for a 2-D node (falls back to the reference itself for shapes it does not
    take); grouped(xs [R, K], bank, sorted expert ids [R], counts [E]) -> [R, N] for a bank ``[E, N, K]`` whose
    shape ``takes(bank)``; transformed(xt [M, K'], node) -> [M, N] from the node's ``input_transform`` output."""

    linear: Callable
    grouped: Callable
    takes: Callable
    transformed: Callable | None = None


def _rows(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


# ------------------------------------------------------------------------------------------------ NVFP4
def _nvfp4_linear(x, node):
    n, k = node.shape
    if not nvfp4_kernels.supported(n, k):
        w = node.dequantize(x.dtype)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)
    x2, lead = _rows(x)
    if node.backend == "triton" and x2.shape[0] <= GEMV_ROWS:
        y = triton_gemv.nvfp4_gemv(x2, node.packed, node.scale, node.scale_2)
    else:
        y = nvfp4_kernels.nvfp4_matmul(x2, node.packed, node.scale, node.scale_2, interpret=interpret())
    return y.reshape(*lead, n)


def _nvfp4_dense(x, node):
    return _nvfp4_linear(node.fake_quant_input(x), node)


def _nvfp4_grouped(xs, node, se, counts):
    if node.mode == "w4a4":  # per-expert static activation scale, row by row
        s = jnp.take(node.input_scale, jnp.minimum(se, counts.shape[0] - 1))
        xs = fake_quant(xs, s[:, None, None])
    return nvfp4_kernels.nvfp4_grouped_matmul(xs, node.packed, node.scale, node.scale_2, counts,
                                              interpret=interpret())


def _nvfp4_takes(node) -> bool:
    return node.packed.ndim == 3 and nvfp4_kernels.supported(*node.shape[1:])


def _nvfp4_cpu(x, node):
    """The "cpu" backend: a decode-sized product reads the packed bytes only (``formats.nvfp4.rows_product``); larger
    ones are GEMMs, for which the reference's dequantize-then-product is the fast way on a CPU."""
    x2, lead = _rows(node.fake_quant_input(x))
    if x2.shape[0] > CPU_ROWS:
        return node.matmul(x)
    y = rows_product(x2, node.packed, node.scale, node.scale_2)
    return y.astype(x.dtype).reshape(*lead, node.shape[0])


def _never(node) -> bool:
    return False


# ------------------------------------------------------------------------------------------------ HLWQ
def _hlwq_rotated(xr, node):
    """``xr [..., K_pad]`` (rotated) @ ``(W H)^T`` for a 2-D HLWQ node."""
    n = node.packed.shape[0]
    if n % 16:
        return node.matmul_rotated(xr)
    x2, lead = _rows(xr)
    if node.backend == "triton" and x2.shape[0] <= GEMV_ROWS and node.bits <= hlwq_kernels.GEMV_MAX_BITS:
        y = triton_gemv.hlwq_gemv(x2, node.packed, node.norms, node.table, node.bits)
    else:
        y = hlwq_kernels.hlwq_matmul(x2, node.packed, node.norms, node.table, node.bits, interpret=interpret())
    return y.reshape(*lead, n)


def _rotate(x2, node):
    xp = jnp.pad(x2, ((0, 0), (0, node.k_pad - x2.shape[1])))
    return hlwq_kernels.fwht(xp, interpret=interpret())


def _hlwq_dense(x, node):
    """``x [..., in_features] @ W^T``: the FWHT kernel on the zero-padded input, then the rotated matmul."""
    node.check_input(x)
    x2, lead = _rows(x)
    y = _hlwq_rotated(_rotate(x2, node), node)
    return y.reshape(*lead, y.shape[-1])


def _hlwq_grouped(xs, node, se, counts):
    y = hlwq_kernels.hlwq_grouped_matmul(_rotate(xs, node), node.packed, node.norms, node.table, counts, node.bits,
                                         interpret=interpret())
    return y.astype(xs.dtype)


def _hlwq_takes(node) -> bool:
    return node.packed.ndim == 3 and node.packed.shape[1] % 16 == 0


def _hlwq_transformed(xr, node):
    if xr.shape[-1] != node.k_pad:  # the node's own check and message
        return node.matmul_rotated(xr)
    return _hlwq_rotated(xr, node)


def _hlwq_cpu_rotated(xr, node, dtype):
    x2, lead = _rows(xr)
    y = hlwq_rows_product(x2, node.packed, node.norms, node.table, node.bits)
    return y.astype(dtype).reshape(*lead, node.packed.shape[0])


def _hlwq_cpu(x, node):
    """The "cpu" backend: a decode-sized product rotates x once (float32) and reads the packed codes only
    (``formats.hlwq.rows``); larger ones run the reference, a GEMM after decoding."""
    node.check_input(x)
    if x.size // x.shape[-1] > CPU_ROWS:
        return node.matmul(x)
    return _hlwq_cpu_rotated(node.rotate(x.astype(jnp.float32)), node, x.dtype)


def _hlwq_cpu_transformed(xr, node):
    if xr.shape[-1] != node.k_pad or xr.size // xr.shape[-1] > CPU_ROWS:
        return node.matmul_rotated(xr)
    return _hlwq_cpu_rotated(xr, node, xr.dtype)


# ------------------------------------------------------------------------------------------------ FP8
def _fp8_cpu(x, node):
    """The "cpu" backend: a decode-sized product reads the one-byte codes only (``formats.fp8.rows_product``;
    W8A8 fake-quantizes x first, as the reference does); larger ones, and inputs the reference refuses, run the
    reference."""
    x2, lead = _rows(x)
    if (x2.shape[0] > CPU_ROWS or node.mode not in fp8.MODES or x.shape[-1] != node.shape[-1]
            or (node.mode == "w8a8" and node.input_scale is None)):
        return node.matmul(x)
    if node.mode == "w8a8":
        x2 = fp8.fake_quant(x2, node.input_scale)
    y = fp8.rows_product(x2, node.weight, node.weight_scale)
    return y.astype(x.dtype).reshape(*lead, node.shape[0])


_NVFP4 = FormatKernels(_nvfp4_dense, _nvfp4_grouped, _nvfp4_takes)
_HLWQ = FormatKernels(_hlwq_dense, _hlwq_grouped, _hlwq_takes, _hlwq_transformed)
#: (format name, backend) -> its kernels ("triton" differs from "pallas" in the decode GEMVs only)
KERNELS: dict[tuple[str, str], FormatKernels] = {
    (fmt, backend): kern for fmt, kern in (("nvfp4", _NVFP4), ("hlwq", _HLWQ)) for backend in ("pallas", "triton")}
# "cpu": plain XLA written for XLA:CPU. The routed experts run the XLA loop of the MoE (grouped: never), whose
# per-expert products come back here as 2-D nodes.
KERNELS[("nvfp4", "cpu")] = FormatKernels(_nvfp4_cpu, None, _never)
KERNELS[("hlwq", "cpu")] = FormatKernels(_hlwq_cpu, None, _never, _hlwq_cpu_transformed)
KERNELS[("fp8", "cpu")] = FormatKernels(_fp8_cpu, None, _never)


def _kernels(node) -> FormatKernels | None:
    fmt = format_of(node)
    return None if fmt is None else KERNELS.get((fmt.name, node.backend))


def linear(x: jax.Array, node) -> jax.Array:
    """``x [..., K] @ W^T`` for a quantized node: its backend's kernel for a 2-D node, else its reference."""
    kern = _kernels(node)
    if kern is None or len(node.shape) != 2:
        return node.matmul(x)
    return kern.linear(x, node)


def linear_transformed(xt: jax.Array, node, dtype=None) -> jax.Array:
    """``x @ W^T`` from ``xt = node.input_transform()(x)``, in ``dtype`` (default xt's)."""
    kern = _kernels(node)
    if kern is None or kern.transformed is None or len(node.shape) != 2:
        return node.matmul_transformed(xt, dtype)
    return kern.transformed(xt, node).astype(jnp.dtype(dtype or xt.dtype))


def grouped_experts(x, weights, idx, up, down, activation):
    """The MoE's routed experts with the grouped kernels: ``sum_k weights[t, k] * down_e(activation(up_e x_t))``
    with ``e = idx[t, k]`` (same contract as ``nemojax.blocks.moe.grouped_experts``: x [T, H]; weights, idx
    [T, k]; ids >= E are dropped) -> [T, H] fp32, or None if a bank's format, backend or shape is not one the
    kernels take (the caller then runs its XLA loop)."""
    ku, kd = _kernels(up), _kernels(down)
    if ku is None or kd is None or not (ku.takes(up) and kd.takes(down)):
        return None
    T, _ = x.shape
    k = idx.shape[1]
    E = jax.tree.leaves(up)[0].shape[0]
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    se = flat_e[order]
    tok = (jnp.arange(T * k, dtype=jnp.int32) // k)[order]
    sw = weights.reshape(-1)[order].astype(jnp.float32)
    counts = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    h = activation(ku.grouped(x[tok], up, se, counts))
    y = kd.grouped(h, down, se, counts).astype(jnp.float32)
    return jnp.zeros((T, y.shape[1]), jnp.float32).at[tok].add(y * sw[:, None])
