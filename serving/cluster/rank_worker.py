"""One tensor-parallel rank of a replica, hosted by a Ray actor. Every rank holds its shard of
the weights and of the KV cache; rank 0 also runs the engine (scheduler, sampling) and answers
requests, the others follow its steps."""

from __future__ import annotations

import dataclasses
import socket

import torch
import torch.distributed as dist

from models.llama4 import load_model
from serving.cluster.tensor_parallel import shard_model
from serving.cluster.tp_runner import LeaderRunner, follow
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.memory import plan_kv_blocks
from serving.engine.model_runner import ModelRunner
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.llm import LLM


class RankWorker:
    def __init__(self, rank: int, world: int, config: EngineConfig) -> None:
        self.rank, self.world = rank, world
        self.config = dataclasses.replace(config)
        self.engine: LLMEngine | None = None
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for the process group (asked of rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, host: str, port: int) -> int:
        """Joins the process group, reads this rank's shard, sizes the KV cache (the smallest any
        rank can hold); collective: every rank calls it at once. Returns the KV block count."""
        from models.default import DEFAULT_MODEL_NAME, default_model_path

        cfg = self.config
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world)
        if cfg.model is None:
            cfg.model, cfg.served_model_name = str(default_model_path()), cfg.served_model_name or DEFAULT_MODEL_NAME
        self.loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, tokenizer=self.rank == 0,
                                 shard=lambda m: shard_model(m, self.rank, self.world).parts)
        mc = self.loaded.config
        max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        blocks = torch.tensor([plan_kv_blocks(self.loaded.model, cfg, max_len)])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
        cfg.num_kv_blocks = int(blocks)
        return cfg.num_kv_blocks

    def start_engine(self) -> None:
        """Rank 0: builds the engine (its warm-up already runs steps with the followers)."""
        self.engine = LLMEngine(self.loaded, self.config, runner_factory=LeaderRunner)

    def follow(self) -> int:
        """Ranks > 0: run rank 0's steps until it stops; returns how many ran."""
        cfg = self.config
        self.runner = ModelRunner(self.loaded.model, cfg.num_kv_blocks, cfg.block_size,
                                  stop_ids_for=lambda seq: (), compile=cfg.compile)
        return follow(self.runner)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Rank 0: the offline API (LLM.generate) on this replica."""
        return LLM.from_engine(self.engine).generate(prompts, params, use_tqdm=False)

    def free_blocks(self) -> tuple[int, int]:
        return self.engine.blocks.num_free_blocks, self.engine.blocks.num_blocks

    def stop(self) -> None:
        """Rank 0 releases the followers; every rank then leaves the process group."""
        if self.engine is not None:
            self.engine.runner.release_followers()
        dist.destroy_process_group()

