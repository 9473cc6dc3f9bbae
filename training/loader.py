"""Which windows each step trains on: a seeded shuffle per epoch and one resumable position.

The position counts windows handed out to all data-parallel ranks together, across epochs; window
number g is window perm_{g // N}[g % N] where perm_e is a permutation seeded by (seed, e). So the
order is the same in every run with the same seed, and a saved position resumes it exactly.
Each micro-batch takes batch_size * dp consecutive windows; rank r gets the r-th block of them.
"""

from __future__ import annotations

import torch

from training.packing import Batch, PackedWindows


class BatchLoader:
    def __init__(self, windows: PackedWindows, batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchLoader: dp_rank {dp_rank} not in [0, {dp_size})")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.position = 0
        self._perms: dict[int, list[int]] = {}

    def _window(self, g: int) -> int:
        epoch, i = divmod(g, len(self.windows))
        if epoch not in self._perms:
            if len(self._perms) > 1:  # a batch mostly spans at most two epochs
                del self._perms[min(self._perms)]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.windows), generator=gen).tolist()
        return self._perms[epoch][i]

    @property
    def epoch(self) -> float:
        return self.position / len(self.windows)

    def next_batch(self) -> Batch:
        first = self.position + self.dp_rank * self.batch_size
        picked = [self._window(g) for g in range(first, first + self.batch_size)]
        self.position += self.batch_size * self.dp_size
        return self.windows.batch(picked)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_windows": len(self.windows),
                "batch_size": self.batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_windows"):
            if state[key] != mine[key]:
                raise ValueError(f"resume: the data changed since the checkpoint ({key} {state[key]} then, "
                                 f"{mine[key]} now); resuming would not continue the same order")
        self.position = int(state["position"])
