"""SwiGLU activation on a fused gate-up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I) with the gate in the first half -> (..., I)."""
    if gate_up.dim() == 0:
        raise ValueError("silu_and_mul: gate_up is a scalar, expected (..., 2I)")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: gate_up's last dim {gate_up.shape[-1]} is odd")
    if not gate_up.is_floating_point():
        raise ValueError(f"silu_and_mul: gate_up has dtype {gate_up.dtype}, expected a floating dtype")
    if use_triton(gate_up):
        from kernels.swiglu_triton import silu_and_mul_triton

        return silu_and_mul_triton(gate_up)
    return silu_and_mul_reference(gate_up)
