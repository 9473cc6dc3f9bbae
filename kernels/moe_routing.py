"""Llama 4 router: each token's top-k experts by logit, scored by the sigmoid of the chosen logits."""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton


def moe_route_reference(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_logits_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    # No renormalisation over the chosen experts: each score is its own sigmoid.
    return torch.sigmoid(top_logits_TK.float()).to(logits_TE.dtype), ids_TK


def moe_route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> scores (T, K) in the logits' dtype, expert ids (T, K) int64, best first.

    Gradients reach only the chosen logits (d logit = d score * s * (1 - s)). Among equal logits
    the Triton path picks the lowest expert id.
    """
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"moe_route: logits_TE must be a 2-D float tensor, got {tuple(logits_TE.shape)} "
                         f"{logits_TE.dtype}")
    E = logits_TE.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"moe_route: top_k must be an int in [1, {E}], got {top_k!r}")
    # Compiled graphs keep torch.topk, which the compiler already handles.
    if not torch.compiler.is_compiling() and logits_TE.shape[0] > 0 and use_triton(logits_TE):
        from kernels.moe_routing_triton import moe_route_triton

        return moe_route_triton(logits_TE, top_k)
    return moe_route_reference(logits_TE, top_k)
