"""Host bookkeeping of one MoE layer's device cache: which expert sits in which slot, and its policy."""
from __future__ import annotations

import numpy as np

from . import make_policy

__all__ = ["SlotTable", "groups"]


class SlotTable:
    """Host bookkeeping of one layer's cache: which expert sits in which slot, and the policy."""

    def __init__(self, n_experts: int, n_slots: int, policy: str, shared: dict | None = None):
        if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or n_slots < 1:
            raise ValueError(f"expert_cache={n_slots!r}: the number of device slots per MoE layer must be >= 1")
        self.n_slots = min(int(n_slots), n_experts)
        self.policy = make_policy(policy, n_experts, shared)
        self.policy.n_slots = self.n_slots
        self.slot_of = np.full(n_experts, -1, np.int64)
        self.expert_in = np.full(self.n_slots, -1, np.int64)
        self.n_free = self.n_slots

    @property
    def residents(self) -> list[int]:
        """Resident experts in slot order."""
        return self.expert_in[self.expert_in >= 0].tolist()

    def plan(self, needed: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """``needed`` (distinct, at most n_slots) -> (hits, [(expert, slot)] to load). Pins ``needed`` first."""
        assert len(needed) <= self.n_slots
        pinned = set(needed)
        slot_of, expert_in = self.slot_of, self.expert_in
        hits, loads, residents = [], [], None
        for e in needed:
            hit = bool(slot_of[e] >= 0)
            self.policy.access(e, hit)
            if hit:
                hits.append(e)
                continue
            if self.n_free:
                slot = int(np.flatnonzero(expert_in < 0)[0])
                self.n_free -= 1
            else:
                residents = self.residents if residents is None else residents
                v = self.policy.victim(residents, pinned)
                slot = int(slot_of[v])
                slot_of[v] = -1
                self.policy.evicted(v)
                residents[residents.index(v)] = e  # same slot: the list stays in slot order
            slot_of[e] = slot
            expert_in[slot] = e
            loads.append((e, slot))
        return hits, loads

    def passes(self, needed: list[int]) -> list[list[int]]:
        """One forward's distinct ``needed`` experts -> passes of at most ``n_slots`` (the policy sees the whole set
        first and orders the passes; call :meth:`plan` on each in turn)."""
        self.policy.pin(needed)
        if len(needed) > self.n_slots:
            needed = self.policy.pass_order(list(needed), lambda e: self.slot_of[e] >= 0)
        return groups(needed, self.n_slots)


def groups(needed_in_order: list[int], n_slots: int) -> list[list[int]]:
    """Split the distinct experts a batch needs into passes of at most ``n_slots``."""
    return [needed_in_order[i:i + n_slots] for i in range(0, len(needed_in_order), n_slots)]
