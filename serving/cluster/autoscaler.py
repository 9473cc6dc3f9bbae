"""Replica autoscaling on queue depth: add a replica when the requests in flight per replica
stay above a target, drain and remove one when they fall far below it, with cooldowns so that
a burst does not make replicas come and go."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from serving.cluster.client import ClusterClient

log = logging.getLogger("herd.autoscaler")


@dataclass
class ScalePolicy:
    min_replicas: int
    max_replicas: int
    target_in_flight: float = 16.0  # per replica
    scale_down_below: float = 0.25  # of the target
    interval_s: float = 1.0
    upscale_cooldown_s: float = 10.0
    downscale_cooldown_s: float = 60.0
    drain_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas: need 1 <= min_replicas ({self.min_replicas}) <= "
                             f"max_replicas ({self.max_replicas})")


class Autoscaler:
    def __init__(self, client: ClusterClient, policy: ScalePolicy) -> None:
        self.client, self.policy = client, policy
        self._last_change = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="herd-autoscaler", daemon=True)
        self._thread.start()

    def decide(self) -> int:
        """+1, -1 or 0 replicas, from the load now and the time since the last change."""
        p = self.policy
        live = self.client.live_replicas()
        if not live:
            return 0
        load = sum(self.client.router.in_flight[i] for i in live) / len(live)
        since = time.monotonic() - self._last_change
        if load > p.target_in_flight and len(live) < p.max_replicas and since >= p.upscale_cooldown_s:
            return 1
        if (load < p.target_in_flight * p.scale_down_below and len(live) > p.min_replicas
                and since >= p.downscale_cooldown_s):
            return -1
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            change = self.decide()
            if change > 0:
                log.info("scaling up from %d replicas", len(self.client.live_replicas()))
                self.client.add_replica()
            elif change < 0:
                live = self.client.live_replicas()
                idlest = min(live, key=lambda i: self.client.router.in_flight[i])
                log.info("scaling down: draining replica %d of %d", idlest, len(live))
                self.client.remove_replica(idlest, self.policy.drain_timeout_s)
            if change:
                self._last_change = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.policy.drain_timeout_s + 30)
