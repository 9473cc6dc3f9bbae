"""Routed experts of a Llama 4 MoE layer: each token's top-k experts, input scaled by score."""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.swiglu import silu_and_mul


def moe_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD=None):
    K = topk_ids_TK.shape[1]
    E = w_gate_up_EDF.shape[0]
    out_TD = torch.zeros_like(x_TD)
    flat_ids = topk_ids_TK.flatten()
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    # Views of each expert taken once: indexing w[e] per expert would make its backward build a
    # full (E, ...) zero gradient for every expert; unbind's backward stacks them once.
    gate_ups, downs = w_gate_up_EDF.unbind(0), w_down_EID.unbind(0)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // K
        # Llama 4 scales the expert's INPUT by the router score (no renormalisation).
        x_in = x_TD[tokens] * topk_weights_TK.flatten()[pairs, None].to(x_TD.dtype)
        y = silu_and_mul(x_in @ gate_ups[e]) @ downs[e]
        out_TD.index_add_(0, tokens, y)
    return out_TD if shared_TD is None else out_TD + shared_TD


def _runs_triton(x_TD, topk_ids_TK, *tensors) -> bool:
    # No (token, slot) pairs: nothing to launch, and the reference returns zeros (+ shared).
    return x_TD.shape[0] * topk_ids_TK.shape[1] > 0 and use_triton(x_TD, topk_ids_TK, *tensors)


def _moe_experts_eager(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD):
    if _runs_triton(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
        from kernels.moe_triton import moe_experts_triton

        return moe_experts_triton(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
    return moe_experts_reference(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)


@torch.library.custom_op("herd::moe_experts", mutates_args=())
def _moe_experts_op(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                    w_gate_up_EDF: torch.Tensor, w_down_EID: torch.Tensor,
                    shared_TD: torch.Tensor | None = None) -> torch.Tensor:
    return _moe_experts_eager(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)


@_moe_experts_op.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD=None):
    return torch.empty_like(x_TD)


@torch.library.custom_op("herd::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(d_out_TD: torch.Tensor, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                             topk_weights_TK: torch.Tensor, w_gate_up_EDF: torch.Tensor,
                             w_down_EID: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    # The compiled graph keeps none of the per-expert buffers, so the backward recomputes them. Autograd
    # is off below a custom op, hence explicit kernels or torch.func rather than torch.autograd.grad.
    if _runs_triton(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
        from kernels.moe_triton import moe_experts_triton_grads

        return moe_experts_triton_grads(d_out_TD, x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID)
    _, vjp = torch.func.vjp(lambda x, w, gate_up, down: moe_experts_reference(x, topk_ids_TK, w, gate_up, down),
                            x_TD, topk_weights_TK, w_gate_up_EDF, w_down_EID)
    return tuple(vjp(d_out_TD))


@_moe_experts_backward_op.register_fake
def _(d_out_TD, x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID):
    return (torch.empty_like(x_TD), torch.empty_like(topk_weights_TK), torch.empty_like(w_gate_up_EDF),
            torch.empty_like(w_down_EID))


def _setup_context(ctx, inputs, output):
    x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD = inputs
    ctx.has_shared = shared_TD is not None
    ctx.save_for_backward(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID)


def _backward(ctx, d_out_TD):
    d_x, d_weights, d_gate_up, d_down = _moe_experts_backward_op(d_out_TD, *ctx.saved_tensors)
    return d_x, None, d_weights, d_gate_up, d_down, (d_out_TD if ctx.has_shared else None)


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD, eager: bool) -> None:
    if x_TD.dim() != 2 or not x_TD.is_floating_point():
        raise ValueError(f"moe_experts: x_TD must be a 2-D float tensor, got {tuple(x_TD.shape)} {x_TD.dtype}")
    T, D = x_TD.shape
    if w_gate_up_EDF.dim() != 3 or w_down_EID.dim() != 3:
        raise ValueError(f"moe_experts: w_gate_up_EDF {tuple(w_gate_up_EDF.shape)} and w_down_EID "
                         f"{tuple(w_down_EID.shape)} must be 3-D")
    E, D2, F = w_gate_up_EDF.shape
    if D2 != D or F % 2 or w_down_EID.shape != (E, F // 2, D):
        raise ValueError(f"moe_experts: x {tuple(x_TD.shape)}, gate_up {tuple(w_gate_up_EDF.shape)},"
                         f" down {tuple(w_down_EID.shape)} do not agree")
    for name, w in (("w_gate_up_EDF", w_gate_up_EDF), ("w_down_EID", w_down_EID)):
        if w.dtype != x_TD.dtype:
            raise ValueError(f"moe_experts: {name} is {w.dtype}, x_TD is {x_TD.dtype}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != T:
        raise ValueError(f"moe_experts: topk ids {tuple(topk_ids_TK.shape)} / weights "
                         f"{tuple(topk_weights_TK.shape)} for {T} tokens")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_experts: topk_ids_TK must be int32 or int64, got {topk_ids_TK.dtype}")
    if not topk_weights_TK.is_floating_point():
        raise ValueError(f"moe_experts: topk_weights_TK must be floating point, got {topk_weights_TK.dtype}")
    if shared_TD is not None and (shared_TD.shape != x_TD.shape or shared_TD.dtype != x_TD.dtype):
        raise ValueError(f"moe_experts: shared_TD {tuple(shared_TD.shape)} {shared_TD.dtype} must match x_TD "
                         f"{tuple(x_TD.shape)} {x_TD.dtype}")
    if not eager:
        return
    devices = {t.device for t in (x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
               if t is not None}
    if len(devices) > 1:
        raise ValueError(f"moe_experts: inputs are on several devices {sorted(map(str, devices))}")
    # Reading the ids on a GPU would sync the stream; there the kernels skip an out-of-range id.
    if not topk_ids_TK.is_cuda and topk_ids_TK.numel() and not (0 <= topk_ids_TK.min() <= topk_ids_TK.max() < E):
        raise ValueError(f"moe_experts: topk_ids_TK must lie in [0, {E}), got "
                         f"[{int(topk_ids_TK.min())}, {int(topk_ids_TK.max())}]")


def _autocast(x_TD, *tensors):
    """Under autocast to x's dtype (bf16 compute over float32 master weights), cast the float32
    weights (and shared output) to it, as autocast would for each expert's matmul; the cast is
    differentiable, so their gradients reach the float32 parameters. Otherwise leave them be."""
    device = x_TD.device.type
    if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == x_TD.dtype):
        return tensors
    return tuple(t.to(x_TD.dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def moe_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                w_gate_up_EDF: torch.Tensor, w_down_EID: torch.Tensor,
                shared_TD: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over each token's experts e of down_e(silu(gate_e(w x)) * up_e(w x)), plus shared_TD; F = 2I."""
    compiling = torch.compiler.is_compiling()
    w_gate_up_EDF, w_down_EID, shared_TD = _autocast(x_TD, w_gate_up_EDF, w_down_EID, shared_TD)
    _check(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD, eager=not compiling)
    if compiling:
        # Its per-expert token counts are data: an opaque op keeps a compiled graph whole.
        return _moe_experts_op(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
    return _moe_experts_eager(x_TD, topk_ids_TK, topk_weights_TK, w_gate_up_EDF, w_down_EID, shared_TD)
