"""The learning rate of each optimiser step: linear warmup, then cosine decay to a floor.

A pure function of the step number, so resuming needs only the step: nothing to save.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The rate for optimiser step `step` (0-based): base_lr * (step + 1) / warmup_steps while
    warming up, then from base_lr down a half cosine to base_lr * min_lr_ratio on the last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
