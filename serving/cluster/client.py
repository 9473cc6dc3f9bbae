"""The gateway's engine when herd runs as a Ray cluster: several replicas (each one or more
tensor-parallel actors) behind the same EngineClient interface as the in-process engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import ray
from ray.exceptions import RayActorError

from models.llama4.tokenizer import Tokenizer
from serving.cluster.replica import Replica
from serving.cluster.router import Router
from serving.engine.async_engine import EngineDeadError
from serving.engine.engine import PromptInput, tokenize_prompt
from serving.engine.outputs import ModelCard, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats, ReplicaState, merge_stats

log = logging.getLogger("herd.cluster")


class ClusterClient:
    tool_call_parser: str | None = None  # how the gateway reads tool calls (None: from the chat template)

    def __init__(self, replicas: list[Replica], tokenizer: Tokenizer, router: Router | None = None,
                 make_replica: Callable[[], Replica] | None = None) -> None:
        """`make_replica` rebuilds a replica whose actor died (None: it stays out of rotation)."""
        self.replicas = replicas
        self.tokenizer = tokenizer
        self.router = router or Router(len(replicas))
        self.make_replica = make_replica
        self.restarts = [0] * len(replicas)
        self.retired = [False] * len(replicas)  # removed by scale-down; their slots stay empty
        self._cards = ray.get(replicas[0].leader.models.remote())
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.autoscaler = None  # set by whoever starts one; stopped by shutdown()

    def models(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """A replica that dies before the request's first output is taken out of rotation and
        the request goes to another; one that dies mid-stream ends it with EngineDeadError."""
        ids, text = tokenize_prompt(self.tokenizer, prompt)
        tried: set[int] = set()
        while True:
            try:
                i = self.router.pick(ids, exclude=tried)
            except RuntimeError as e:
                raise EngineDeadError(f"no replica can take the request: {e}") from None
            tried.add(i)
            yielded, died = False, False
            attempt = self._on_replica(i, ids, text, params, request_id)
            try:
                async for item in attempt:
                    if isinstance(item, _Died):
                        died = True
                        break
                    yielded = True
                    yield item
            finally:
                await attempt.aclose()
            if not died:
                return
            if yielded:
                raise EngineDeadError(f"replica {i} died while streaming this request; retry it")
            # nothing was sent yet: the request goes to another replica

    async def _on_replica(self, i: int, ids, text, params, request_id):
        self.router.started(i)
        self._in_flight[request_id] = i
        stream = self.replicas[i].leader.generate_stream.options(num_returns="streaming").remote(
            {"prompt_token_ids": ids, "prompt": text}, params, request_id)
        finished = False
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        except RayActorError as e:
            self._replica_died(i, e)
            finished = True
            yield _Died()
        finally:
            self._in_flight.pop(request_id, None)
            self.router.finished(i)
            if not finished:  # the caller left early: the replica's request ends at once
                ray.cancel(stream)

    def _replica_died(self, i: int, error: BaseException) -> None:
        """Out of rotation at once; rebuilt in the background when there is a way to."""
        with self._lock:
            if not self.router.healthy[i] or self.retired[i]:
                return
            self.router.healthy[i] = False
        log.warning("replica %d died (%s); out of rotation", i, type(error).__name__)
        if self.make_replica is not None:
            threading.Thread(target=self._restart, args=(i,), name=f"herd-restart-{i}", daemon=True).start()

    def _restart(self, i: int) -> None:
        self.replicas[i].kill()
        while not self._closed:
            try:
                self.replicas[i] = self.make_replica()
                break
            except Exception as e:  # noqa: BLE001 - e.g. no resources yet: try again
                log.warning("replica %d failed to restart (%s); retrying", i, e)
                time.sleep(1.0)
        else:
            return
        self.restarts[i] += 1
        self.router.healthy[i] = True
        log.info("replica %d is back in rotation", i)

    async def abort(self, request_id: str) -> None:
        i = self._in_flight.get(request_id)
        if i is not None:
            await self.replicas[i].leader.abort.remote(request_id)

    def replica_stats(self) -> list[EngineStats | None]:
        """Each replica's stats; None for one out of rotation."""
        healthy = list(self.router.healthy)
        got = ray.get([r.leader.stats.remote() for r, ok in zip(self.replicas, healthy) if ok])
        it = iter(got)
        return [next(it) if ok else None for ok in healthy]

    def replica_states(self) -> list[ReplicaState]:
        return [ReplicaState(i, s is not None, self.restarts[i], s) for i, s in enumerate(self.replica_stats())
                if not self.retired[i]]

    def live_replicas(self) -> list[int]:
        return [i for i, ok in enumerate(self.router.healthy) if ok and not self.retired[i]]

    def add_replica(self) -> int:
        """Builds one more replica (blocking: it loads) and puts it in rotation."""
        replica = self.make_replica()
        with self._lock:
            self.replicas.append(replica)
            self.restarts.append(0)
            self.retired.append(False)
            self.router.add_replica()
            return len(self.replicas) - 1

    def remove_replica(self, i: int, drain_timeout: float = 60.0) -> None:
        """Drains replica i (no new requests; those in flight finish, up to drain_timeout),
        then stops it."""
        with self._lock:
            self.retired[i] = True
            self.router.healthy[i] = False
        deadline = time.monotonic() + drain_timeout
        while self.router.in_flight[i] and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self.replicas[i].shutdown()
        except RayActorError:
            self.replicas[i].kill()

    def stats(self) -> EngineStats:
        return merge_stats([s for s in self.replica_stats() if s is not None])

    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def shutdown(self) -> None:
        self._closed = True
        if self.autoscaler is not None:
            self.autoscaler.stop()
        for r, ok, gone in zip(self.replicas, self.router.healthy, self.retired):
            if gone:
                continue
            try:
                r.shutdown() if ok else r.kill()
            except RayActorError:
                r.kill()


class _Died:
    """Marks, inside a request's stream, that its replica died."""
