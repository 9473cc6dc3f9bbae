"""Routed experts of a Llama 4 MoE layer: each token's top-k experts, input scaled by score."""

from __future__ import annotations

import torch

from kernels.swiglu import silu_and_mul


def moe_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
    T, K = topk_ids_TK.shape
    E = w_gate_up_EDF.shape[0]
    out_TD = torch.zeros_like(x_TD)
    flat_ids = topk_ids_TK.flatten()
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // K
        # Llama 4 scales the expert's INPUT by the router score (no renormalisation).
        x_in = x_TD[tokens] * topk_weights_TK.flatten()[pairs, None].to(x_TD.dtype)
        y = silu_and_mul(x_in @ w_gate_up_EDF[e]) @ w_down_EID[e]
        out_TD.index_add_(0, tokens, y)
    return out_TD


@torch.library.custom_op("herd::moe_experts", mutates_args=())
def _moe_experts_op(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                    w_gate_up_EDF: torch.Tensor, w_down_EID: torch.Tensor) -> torch.Tensor:
    return moe_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID)


@_moe_experts_op.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
    return torch.empty_like(x_TD)


def moe_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                w_gate_up_EDF: torch.Tensor, w_down_EID: torch.Tensor) -> torch.Tensor:
    """Sum over each token's experts e of down_e(silu(gate_e(w x)) * up_e(w x)); F = 2I."""
    T, D = x_TD.shape
    E, D2, F = w_gate_up_EDF.shape
    if D2 != D or w_down_EID.shape != (E, F // 2, D):
        raise ValueError(f"moe_experts: x {tuple(x_TD.shape)}, gate_up {tuple(w_gate_up_EDF.shape)},"
                         f" down {tuple(w_down_EID.shape)} do not agree")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != T:
        raise ValueError(f"moe_experts: topk ids {tuple(topk_ids_TK.shape)} / weights "
                         f"{tuple(topk_weights_TK.shape)} for {T} tokens")
    if torch.compiler.is_compiling():
        # Its per-expert token counts are data: an opaque op keeps a compiled graph whole.
        return _moe_experts_op(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID)
    return moe_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID)
