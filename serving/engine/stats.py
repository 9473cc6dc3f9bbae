"""Engine counters, gauges and latency histograms (the gateway's /metrics exports them)."""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), + overflow
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile q (inf if past the last bucket)."""
        target, seen = q * self.count, 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            seen += n
            if seen >= target and n:
                return bound
        return 0.0


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


@dataclass
class ReplicaState:
    """One replica as /health and /metrics show it (an in-process engine is replica 0)."""
    index: int
    healthy: bool
    restarts: int = 0
    stats: EngineStats | None = None  # None while it is out of rotation


def merge_stats(parts: list[EngineStats]) -> EngineStats:
    """Several engines' stats as one: counters and gauges summed, histograms pooled, KV usage
    over all their blocks."""
    total = EngineStats()
    for s in parts:
        for f in dataclasses.fields(EngineStats):
            mine, theirs = getattr(total, f.name), getattr(s, f.name)
            if isinstance(theirs, Histogram):
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
                mine.total += theirs.total
                mine.count += theirs.count
            elif isinstance(theirs, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            elif f.name != "kv_usage":
                setattr(total, f.name, mine + theirs)
    if total.num_kv_blocks:
        total.kv_usage = 1 - total.num_free_kv_blocks / total.num_kv_blocks
    return total
