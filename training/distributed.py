"""Where this process stands: its device, its data-parallel rank, and the process group when the
run spans processes (launched by torchrun; gloo on CPU, NCCL on CUDA).

A run with parallel.dp * parallel.tp == 1 started without torchrun touches no torch.distributed
at all. Otherwise torchrun must have started exactly dp * tp processes; the mesh comes from
training.parallelize.build_mesh, laid out (dp, tp) row-major, so rank r is in data-parallel
group r // tp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from training.config import ConfigError, ParallelSection


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # DeviceMesh when distributed

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every process (a copy; unchanged when not distributed)."""
        out = value.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def data_sum(self, value: float) -> float:
        """Sum of a per-rank quantity over the data-parallel ranks (tensor-parallel ranks hold copies)."""
        total = self.all_reduce_sum(torch.tensor(float(value), dtype=torch.float64, device=self.device))
        return float(total) / self.tp_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch sees no CUDA device")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(parallel: ParallelSection, device_preference: str) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and parallel.world_size == 1:
        return DistContext(device=_device(device_preference, 0))
    if world != parallel.world_size:
        raise ConfigError(f"parallel: dp * tp = {parallel.dp} * {parallel.tp} = {parallel.world_size} "
                          f"processes, but {world} were started (launch with torchrun --nproc-per-node "
                          f"{parallel.world_size})")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_preference, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    from training.parallelize import build_mesh

    mesh = build_mesh(parallel.dp, parallel.tp, device.type)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, dp_rank=rank // parallel.tp,
                       dp_size=parallel.dp, tp_size=parallel.tp, device=device, mesh=mesh)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
