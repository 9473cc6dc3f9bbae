"""Activation checkpointing applied from outside: each DecoderLayer keeps only its inputs during
the forward and recomputes its activations in the backward (torch.utils.checkpoint, non-reentrant).

The layer's forward is wrapped in place rather than the layer in a wrapper module, so parameter
names, state dicts (and so checkpoints and the export) are the same with checkpointing on or off.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wraps every layer of model.layers; returns how many were wrapped (idempotent)."""
    wrapped = 0
    for layer in model.layers:
        if getattr(layer, "_herd_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
        layer._herd_checkpointed = True
        wrapped += 1
    return wrapped
