"""Eviction policies of the per-layer expert cache (``nemojax.experts.offload``): the registry ``POLICIES`` and
:func:`make_policy`. The baselines (LRU, LFU, the LFRU variants) are in :mod:`.baseline`, the default ``adaptive``
ensemble in :mod:`.adaptive`, the slot table in :mod:`.slots` and the trace simulator in :mod:`.simulate`."""
from __future__ import annotations

from .adaptive import Adaptive
from .baseline import LFU, LRU, LFRUPolarquant, LFRUTinyserve, LFRUVllm, Policy

__all__ = ["POLICIES", "make_policy"]

POLICIES = {c.name: c for c in (LRU, LFU, LFRUTinyserve, LFRUVllm, LFRUPolarquant, Adaptive)}


def make_policy(name: str, n_experts: int, shared: dict | None = None) -> Policy:
    """Policy ``name`` for one layer of ``n_experts``; ``shared``: a dict the policies of one model's MoE layers
    share (``adaptive`` pools its candidates' evidence there)."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r}: unknown; choose one of {sorted(POLICIES)}")
    return POLICIES[name](n_experts, shared)
