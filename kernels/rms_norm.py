"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the weight, as the reference models do.
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual); weight None is the weightless L2 norm."""
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        x = x + residual
    return rms_norm_reference(x, weight, eps), x
