"""SwiGLU activation on a fused gate-up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) with the gate in the first half -> (..., I)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {gate_up.shape[-1]} is odd")
    return silu_and_mul_reference(gate_up)
