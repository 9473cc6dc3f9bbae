"""Tensor-parallel steps: rank 0 schedules, broadcasts each step's inputs and samples; every
other rank runs the same forward pass on its shard (the collectives inside pair them up)."""

from __future__ import annotations

import torch.distributed as dist

from serving.engine.model_runner import ModelRunner, StepInputs


class LeaderRunner(ModelRunner):
    """Rank 0's runner: each step's inputs go to the followers before its own forward."""

    def __init__(self, *args, group=None, **kwargs) -> None:
        self.group = group
        super().__init__(*args, **kwargs)

    def run_model(self, step: StepInputs):
        dist.broadcast_object_list([step], src=0, group=self.group)
        return super().run_model(step)

    def release_followers(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.group)


def follow(runner: ModelRunner, group=None) -> int:
    """A follower rank's loop: run each step rank 0 broadcasts until it sends None. Returns
    the number of steps run."""
    steps = 0
    while True:
        box: list[StepInputs | None] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            return steps
        runner.run_model(box[0])
        steps += 1
