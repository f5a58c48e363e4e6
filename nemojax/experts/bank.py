"""A routed-expert bank kept as one pytree per expert (e.g. read-only views of the checkpoint files, ``nemojax.load(...,
mmap=True)``), stacked only where needed: the experts a cache fetches (``nemojax.experts.offload``), or the whole
bank when the model runs with resident experts."""
from __future__ import annotations

import mmap

import jax
import numpy as np

__all__ = ["HostBank", "drop_mapped_pages", "will_need"]


class HostBank:
    """``experts``: E pytrees of one expert each (a NumPy array [N, K], or a quantized node with NumPy leaves), all of
    one structure. ``stack()`` -> the whole bank pytree (leaves [E, ...], a copy)."""

    def __init__(self, experts: list):
        if not experts:
            raise ValueError("a HostBank needs at least one expert")
        self.experts = list(experts)

    def __len__(self) -> int:
        return len(self.experts)

    def stack(self):
        return jax.tree.map(lambda *a: np.stack(a), *self.experts)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for x in self.experts for a in jax.tree_util.tree_leaves(x))

    def __repr__(self) -> str:
        return f"HostBank({len(self)} experts, {self.nbytes} bytes)"


def _advise(a, advice: str) -> None:
    """``madvise(advice)`` on the whole file mapping ``a`` is a view of; no-op for other arrays or platforms."""
    while isinstance(a, np.ndarray):
        mm = getattr(a, "_mmap", None) if isinstance(a, np.memmap) else None
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, advice):
            try:
                mm.madvise(getattr(mmap, advice))
            except (OSError, ValueError):  # a closed map, or a platform without it
                pass
            return
        a = a.base


def will_need(a) -> None:
    """Ask the kernel to read the file mapping ``a`` is a view of into the page cache now, in the background
    (``madvise(MADV_WILLNEED)``): the reads of several experts then overlap each other and the products, instead of
    faulting in page by page when a product first touches them. No-op for other arrays."""
    _advise(a, "MADV_WILLNEED")


def drop_mapped_pages(a) -> None:
    """Unmap the resident pages of the file mapping ``a`` is a view of (``madvise(MADV_DONTNEED)``), once its bytes
    were copied: the kernel's page cache keeps them (the next read is a minor fault), but they stop counting in
    this process's resident set, which would otherwise grow by every expert ever read. No-op for other arrays."""
    _advise(a, "MADV_DONTNEED")
