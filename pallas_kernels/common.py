"""Shared kernel plumbing."""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["poisoned_call"]


def poisoned_call(poison: bool, kernel, *, in_specs, out_specs, out_shape, **kw):
    """``pl.pallas_call(kernel, ...)``; with ``poison`` the output buffer starts as NaN (an extra input aliased to
    the output), so a tile the kernel never writes shows up in tests instead of reading as stale memory."""
    if not poison:
        return pl.pallas_call(kernel, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kw)
    n_in = len(in_specs)

    def body(*refs):
        return kernel(*refs[:n_in], refs[-1])  # drop the aliased poison input

    call = pl.pallas_call(body, in_specs=[*in_specs, out_specs], out_specs=out_specs, out_shape=out_shape,
                          input_output_aliases={n_in: 0}, **kw)
    return lambda *args: call(*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
