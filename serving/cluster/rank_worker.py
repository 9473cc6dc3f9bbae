"""One tensor-parallel rank of a replica, hosted by a Ray actor. Every rank holds its shard of
the weights and of the KV cache; rank 0 also runs the engine (scheduler, sampling) and answers
requests, the others follow its steps. Every torch call of a rank (loading, warm-up, steps) runs
on its one compute thread (why: serving/engine/compute_thread.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import socket

import torch
import torch.distributed as dist

from models.llama4 import load_model
from serving.cluster.tensor_parallel import shard_model
from serving.cluster.tp_runner import LeaderRunner, follow
from serving.engine.async_engine import AsyncEngine, EngineDeadError
from serving.engine.compute_thread import ComputeThread
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine, effective_max_model_len, resolve_model
from serving.engine.memory import plan_kv_blocks
from serving.engine.model_runner import ModelRunner, kv_cache_dtype
from serving.engine.outputs import ModelCard, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats


class RankWorker:
    def __init__(self, rank: int, world: int, config: EngineConfig) -> None:
        self.rank, self.world = rank, world
        self.config = dataclasses.replace(config)
        self.engine: AsyncEngine | None = None  # rank 0's
        self._offline_ids = itertools.count()
        self.runner: ModelRunner | None = None
        self._compute = ComputeThread(f"herd-rank{rank}")

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for the process group (asked of rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, host: str, port: int) -> int:
        """Joins the process group, reads this rank's shard, sizes the KV cache (the smallest any
        rank can hold); collective: every rank calls it at once. Returns the KV block count."""
        return self._compute.call(self._setup, host, port)

    def _setup(self, host: str, port: int) -> int:
        cfg = self.config
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world)
        resolve_model(cfg)
        self.loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, tokenizer=self.rank == 0,
                                 shard=lambda m: shard_model(m, self.rank, self.world).parts)
        max_len = effective_max_model_len(cfg, self.loaded.config)
        blocks = torch.tensor([plan_kv_blocks(self.loaded.model, cfg, max_len)])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
        cfg.num_kv_blocks = int(blocks)
        return cfg.num_kv_blocks

    def start_engine(self) -> None:
        """Rank 0: builds the engine (its warm-up already runs steps with the followers) and
        starts its step loop."""
        self.engine = AsyncEngine(lambda: LLMEngine(self.loaded, self.config, runner_factory=LeaderRunner),
                                  compute=self._compute)

    async def follow(self) -> int:
        """Ranks > 0: run rank 0's steps until it stops; returns how many ran."""
        return await asyncio.wrap_future(self._compute.submit(self._follow))

    def _follow(self) -> int:
        cfg = self.config
        self.runner = ModelRunner(self.loaded.model, cfg.num_kv_blocks, cfg.block_size,
                                  stop_ids_for=lambda seq: (), compile=cfg.compile,
                                  native_decode=cfg.native_decode,
                                  kv_cache_dtype=kv_cache_dtype(self.loaded.model, cfg.kv_cache_dtype))
        return follow(self.runner)

    async def generate_stream(self, prompt, params: SamplingParams, request_id: str):
        """Rank 0: the request's delta outputs (a Ray streaming generator). A bad request's
        ParamError comes back as the first item, so the caller can raise it as its own."""
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                yield out
        except (ValueError, EngineDeadError) as e:
            yield e

    async def generate(self, prompts: list, params: SamplingParams) -> list[RequestOutput]:
        """Rank 0: the whole outputs of several requests, run together (the offline API)."""
        async def one(i: int, prompt) -> RequestOutput:
            result = None
            async for out in self.engine.generate(prompt, params, f"offline-{next(self._offline_ids)}"):
                if result is None:
                    result = out
                else:
                    result.merge(out)
            result.delta = False
            return result
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def pid(self) -> int:
        return os.getpid()

    def models(self) -> list[ModelCard]:
        return self.engine.models()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def free_blocks(self) -> tuple[int, int]:
        blocks = self.engine.engine.blocks
        return blocks.num_free_blocks, blocks.num_blocks

    def stop(self) -> None:
        """Rank 0 stops its loop and releases the followers; every rank then leaves the group."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine.engine.runner.release_followers()
        dist.destroy_process_group()
        self._compute.close(timeout=30)
