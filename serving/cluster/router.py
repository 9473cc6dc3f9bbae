"""Which replica serves a request: by prefix affinity (requests that begin alike go where that
beginning is already in the prefix cache), else by load (the less busy of two random replicas)."""

from __future__ import annotations

import random
from collections import OrderedDict


class Router:
    def __init__(self, num_replicas: int, prefix_tokens: int = 64, affinity: bool = True,
                 max_imbalance: int = 8, seed: int = 0, max_prefixes: int = 100_000) -> None:
        """`prefix_tokens`: how much of the prompt keys affinity (a shared system prompt, not
        each user's question); a replica keeps its affinity until it has `max_imbalance` more
        requests in flight than the least busy one."""
        self.in_flight = [0] * num_replicas
        self.healthy = [True] * num_replicas
        self.prefix_tokens, self.affinity, self.max_imbalance = prefix_tokens, affinity, max_imbalance
        self._owner: OrderedDict[int, int] = OrderedDict()  # prefix key -> replica, LRU
        self._max_prefixes = max_prefixes
        self._rng = random.Random(seed)

    def pick(self, prompt_ids: list[int], exclude: set[int] = frozenset()) -> int:
        live = [i for i, ok in enumerate(self.healthy) if ok and i not in exclude]
        if not live:
            raise RuntimeError("no healthy replica")
        key = hash(tuple(prompt_ids[:self.prefix_tokens])) if len(prompt_ids) >= self.prefix_tokens else None
        least = min(self.in_flight[i] for i in live)
        if self.affinity and key is not None:
            owner = self._owner.get(key)
            if owner in live and self.in_flight[owner] - least < self.max_imbalance:
                self._owner.move_to_end(key)
                return owner
        a, b = self._rng.sample(live, 2) if len(live) > 1 else (live[0], live[0])
        choice = a if self.in_flight[a] <= self.in_flight[b] else b
        if self.affinity and key is not None:
            self._owner[key] = choice
            self._owner.move_to_end(key)
            if len(self._owner) > self._max_prefixes:
                self._owner.popitem(last=False)
        return choice

    def add_replica(self) -> None:
        self.in_flight.append(0)
        self.healthy.append(True)

    def started(self, replica: int) -> None:
        self.in_flight[replica] += 1

    def finished(self, replica: int) -> None:
        self.in_flight[replica] -= 1
