"""A model replica: T Ray actors (one per tensor-parallel rank) placed together by a placement
group and joined in one torch.distributed group (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serving.cluster.rank_worker import RankWorker
from serving.engine.config import EngineConfig
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams


class Replica:
    def __init__(self, config: EngineConfig, tensor_parallel_size: int = 1, cpus_per_rank: float = 1.0) -> None:
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {tensor_parallel_size}")
        self.size = tensor_parallel_size
        gpu = config.device.startswith("cuda")
        bundle = {"GPU": 1, "CPU": cpus_per_rank} if gpu else {"CPU": cpus_per_rank}
        self.pg = placement_group([bundle] * self.size, strategy="PACK")
        ray.get(self.pg.ready())
        actor = ray.remote(RankWorker)
        self.workers = [actor.options(
            num_cpus=cpus_per_rank, num_gpus=1 if gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(r, self.size, config) for r in range(self.size)]
        host, port = ray.get(self.workers[0].rendezvous_address.remote())
        self.num_kv_blocks = ray.get([w.setup.remote(host, port) for w in self.workers])[0]
        self._following = [w.follow.remote() for w in self.workers[1:]]
        ray.get(self.workers[0].start_engine.remote())

    @property
    def leader(self):
        return self.workers[0]

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        return ray.get(self.leader.generate.remote(prompts, params))

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def kill(self) -> None:
        """Ends every rank at once (after one died: the survivors would wait on it forever)."""
        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self.pg)

    def shutdown(self) -> list[int]:
        """Stops every rank; returns the number of steps each follower ran."""
        ray.get(self.leader.stop.remote())
        steps = ray.get(self._following)
        ray.get([w.stop.remote() for w in self.workers[1:]])
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
        return steps
