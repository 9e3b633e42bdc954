"""The GPU expert cache: which experts are resident, under a hard byte budget that transfers respect too.

Bytes are reserved when a transfer is issued, not when it lands, so residency plus bytes in flight
never exceed the budget. Pinned experts (a placement plan) are never evicted; the rest of the budget
is dynamic, evicted least recently used (``lru``) or least frequently used (``lfu``), optionally with
a separate slot count per layer (the mixtral-offloading design). LFU counts may decay: with
``lfu_decay`` d < 1 each step (``step``) scales every count by d before the step's uses add to them,
an activation window whose half-life is log(0.5) / log(d) steps.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

from moedge._errors import MoedgeError

ExpertKey = tuple[int, int]  # (layer, expert)


def check_budget(budget: int, sizes: dict[ExpertKey, int]) -> None:
    """One clear error when a non-zero budget cannot hold even the largest expert."""
    largest = max(sizes.values(), default=0)
    if 0 < budget < largest:
        raise MoedgeError(
            f"GPU budget {budget:,} bytes is smaller than the largest expert ({largest:,} bytes): "
            f"give at least {largest:,} bytes (--gpu-budget {largest / 2**20:.2f}MiB) or 0 for CPU only"
        )


class ExpertCache:
    """Experts resident on the GPU (with the time each is ready) within ``budget`` bytes."""

    def __init__(
        self,
        budget: int,
        sizes: dict[ExpertKey, int],
        *,
        pinned: Iterable[ExpertKey] = (),
        eviction: str | None = "lru",
        per_layer_slots: int | None = None,
        lfu_decay: float = 1.0,
        on_admit: Callable[[ExpertKey], None] | None = None,
        on_evict: Callable[[ExpertKey], None] | None = None,
    ) -> None:
        if eviction not in (None, "lru", "lfu"):
            raise MoedgeError(f"unknown eviction {eviction!r}: use lru or lfu")
        if not 0.0 < lfu_decay <= 1.0:
            raise MoedgeError(f"LFU decay must lie in (0, 1], got {lfu_decay}")
        check_budget(budget, sizes)
        self.budget = int(budget)
        self.sizes = sizes
        self.eviction = eviction
        self.per_layer_slots = per_layer_slots
        self.lfu_decay = float(lfu_decay)
        self.on_admit = on_admit
        self.on_evict = on_evict
        self.ready: dict[ExpertKey, float] = {}  # resident or in flight -> time its weights are usable
        self.recency: collections.OrderedDict[ExpertKey, None] = collections.OrderedDict()
        self.frequency: dict[ExpertKey, float] = {}  # uses, decayed by lfu_decay per step
        self.pinned: set[ExpertKey] = set()
        self.used = 0
        self.peak = 0
        for key in pinned:
            self.pin(key)

    def pin(self, key: ExpertKey) -> None:
        """Make ``key`` resident for good (a placement plan; ready from the start)."""
        if key in self.pinned:
            return
        if self.used + self.sizes[key] > self.budget:
            raise MoedgeError(f"placement does not fit the budget of {self.budget:,} bytes at expert {key}")
        self.pinned.add(key)
        self._insert(key, 0.0)

    def _insert(self, key: ExpertKey, ready: float) -> None:
        self.ready[key] = ready
        self.recency[key] = None
        self.used += self.sizes[key]
        self.peak = max(self.peak, self.used)
        assert self.used <= self.budget, "expert cache over budget"
        if self.on_admit is not None:
            self.on_admit(key)

    def __contains__(self, key: object) -> bool:
        return key in self.ready

    def is_ready(self, key: ExpertKey, now: float) -> bool:
        """Resident with its transfer finished by ``now``."""
        t = self.ready.get(key)
        return t is not None and t <= now

    def step(self) -> None:
        """A forward step begins: with an LFU decay below 1, every use count shrinks by it (older uses
        weigh less); with 1 (plain counts) nothing changes."""
        if self.lfu_decay != 1.0:
            for key in self.frequency:
                self.frequency[key] *= self.lfu_decay

    def touch(self, key: ExpertKey) -> None:
        """Record a use of ``key`` (recency and frequency)."""
        self.frequency[key] = self.frequency.get(key, 0.0) + 1.0
        if key in self.recency:
            self.recency.move_to_end(key)

    def _victims(self, layer: int, now: float, protect: set[ExpertKey]) -> list[ExpertKey]:
        candidates = [
            k
            for k in self.recency
            if k not in self.pinned
            and k not in protect
            and self.ready[k] <= now
            and (self.per_layer_slots is None or k[0] == layer)
        ]
        if self.eviction == "lfu":
            candidates.sort(key=lambda k: self.frequency.get(k, 0.0))  # stable: LRU among equals
        return candidates

    def admit(self, key: ExpertKey, ready: float, *, now: float, protect: set[ExpertKey]) -> bool:
        """Reserve room for ``key`` (usable at ``ready``), evicting unprotected finished entries; False if none."""
        if key in self.ready:
            return True
        if self.eviction is None:
            return False
        size = self.sizes[key]
        victims = self._victims(key[0], now, protect)
        in_layer = sum(1 for k in self.ready if k[0] == key[0] and k not in self.pinned)
        needed = []
        free = self.budget - self.used
        slots_over = in_layer + 1 - self.per_layer_slots if self.per_layer_slots is not None else 0
        for victim in victims:
            if free >= size and slots_over <= 0:
                break
            needed.append(victim)
            free += self.sizes[victim]
            slots_over -= 1
        if free < size or slots_over > 0:
            return False
        for victim in needed:
            self.evict(victim)
        self._insert(key, ready)
        return True

    def evict(self, key: ExpertKey) -> None:
        """Drop ``key`` from the GPU."""
        if key in self.pinned:
            raise MoedgeError(f"expert {key} is pinned by the placement plan")
        del self.ready[key]
        del self.recency[key]
        self.used -= self.sizes[key]
        if self.on_evict is not None:
            self.on_evict(key)
