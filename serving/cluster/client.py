"""The gateway's engine when herd runs as a Ray cluster: several replicas (each one or more
tensor-parallel actors) behind the same EngineClient interface as the in-process engine."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import ray

from models.llama4.tokenizer import Tokenizer
from serving.cluster.replica import Replica
from serving.cluster.router import Router
from serving.engine.engine import PromptInput
from serving.engine.outputs import ModelCard, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats, Histogram


class ClusterClient:
    def __init__(self, replicas: list[Replica], tokenizer: Tokenizer, router: Router | None = None) -> None:
        self.replicas = replicas
        self.tokenizer = tokenizer
        self.router = router or Router(len(replicas))
        self._cards = ray.get(replicas[0].leader.models.remote())
        self._in_flight: dict[str, int] = {}

    def models(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        ids, text = self._tokenize(prompt)
        i = self.router.pick(ids)
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
        finally:
            self._in_flight.pop(request_id, None)
            self.router.finished(i)
            if not finished:  # the caller left early: the replica's request ends at once
                ray.cancel(stream)

    def _tokenize(self, prompt: PromptInput) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenizer.encode(prompt["prompt"]), prompt["prompt"]
        return list(prompt), None

    async def abort(self, request_id: str) -> None:
        i = self._in_flight.get(request_id)
        if i is not None:
            await self.replicas[i].leader.abort.remote(request_id)

    def replica_stats(self) -> list[EngineStats]:
        return ray.get([r.leader.stats.remote() for r in self.replicas])

    def stats(self) -> EngineStats:
        return merge_stats(self.replica_stats())

    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def shutdown(self) -> None:
        for r in self.replicas:
            r.shutdown()


def merge_stats(parts: list[EngineStats]) -> EngineStats:
    """Counters and gauges summed, histograms pooled; KV usage over all replicas' blocks."""
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
