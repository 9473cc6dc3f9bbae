"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the weight, as the reference models do.
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual); weight None is the weightless L2 norm.

    Rows of any leading shape; the Triton path reads strided rows (e.g. q/k heads of a fused qkv
    projection) in place and returns dense tensors.
    """
    if not x.is_floating_point():
        raise ValueError(f"rms_norm: x has dtype {x.dtype}, expected a floating dtype")
    if x.dim() == 0:
        raise ValueError("rms_norm: x is a scalar, expected (..., D)")
    if weight is not None:
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
        if not weight.is_floating_point():
            raise ValueError(f"rms_norm: weight has dtype {weight.dtype}, expected a floating dtype")
        if weight.device != x.device:
            raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual has dtype {residual.dtype}, x {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device}, x on {x.device}")
    tensors = [t for t in (x, weight, residual) if t is not None]
    if x.numel() and use_triton(*tensors):
        from kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    return rms_norm_reference(x, weight, eps), x
