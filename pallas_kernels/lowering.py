"""Lowering a kernel for an NVIDIA H100 on a host without a GPU (an abstract CUDA device), so code the GPU backend
rejects fails on CPU CI. Lowering stops at StableHLO with the kernel embedded; register and shared-memory limits
are only checked by a compile on a real GPU."""
from __future__ import annotations

import jax

__all__ = ["lower_for_h100"]


def lower_for_h100(fn, *args, **kwargs) -> str:
    """``fn`` (a jitted function) lowered for CUDA on an abstract H100; returns the StableHLO text."""
    from jax._src.mesh import AbstractDevice  # private: kept in this one function

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args]
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn, static_argnames=tuple(kwargs)).trace(*specs, **kwargs).lower(
            lowering_platforms=("cuda",))
    return lowered.as_text()
