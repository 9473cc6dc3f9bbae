"""Cross-entropy of a linear head's logits (training's loss), without the full logits in memory.

The Liger-kernel scheme: the forward walks the rows in chunks; per chunk it computes the logits
(one GEMM), turns them in place into d loss / d logits while taking the loss (one Triton kernel on
CUDA, a torch step elsewhere), and spends them at once on grad_hidden and grad_weight (two more
GEMMs). The backward only scales those stored gradients by grad_output. Peak extra memory is one
chunk of logits (LOGITS_CHUNK_BYTES), grad_hidden (N x D) and an fp32 grad_weight (V x D).

A mean over zero valid tokens is NaN with zero gradients, as in torch's F.cross_entropy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels.dispatch import use_triton

# One chunk's logits, in the inputs' dtype. 512 MiB is ~1300 rows of Llama 4's 202048-token vocab in
# bf16: the GEMMs stay large enough to run at full rate, and the buffer stays small beside weights.
LOGITS_CHUNK_BYTES = 512 * 2**20

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def linear_cross_entropy_reference(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    logits_NV = (hidden_ND @ weight_VD.T).float()
    return F.cross_entropy(logits_NV, labels_N, ignore_index=ignore_index, reduction=reduction)


def chunk_rows(n_rows: int, n_vocab: int, element_size: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk so that one chunk's logits fit in budget_bytes (default LOGITS_CHUNK_BYTES)."""
    budget = LOGITS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, min(n_rows, budget // max(1, n_vocab * element_size)))


def cross_entropy_grad_torch_(logits_CV: torch.Tensor, labels_C: torch.Tensor, loss_C: torch.Tensor,
                              scale: torch.Tensor, ignore_index: int, write_grad: bool) -> None:
    """The per-chunk step in torch, same contract as kernels.cross_entropy_triton.cross_entropy_grad_."""
    x_CV = logits_CV.float()
    valid_C = labels_C != ignore_index
    safe_labels_C = torch.where(valid_C, labels_C, 0).long()
    lse_C = torch.logsumexp(x_CV, dim=-1)
    target_C = x_CV.gather(1, safe_labels_C[:, None]).squeeze(1)
    loss_C.copy_(torch.where(valid_C, lse_C - target_C, 0.0))
    if write_grad:
        grad_CV = (x_CV - lse_C[:, None]).exp_()
        grad_CV.scatter_add_(1, safe_labels_C[:, None], grad_CV.new_full((len(labels_C), 1), -1.0))
        # where(), not a multiply, so an ignored row is exactly 0 even if its logits overflowed.
        logits_CV.copy_(torch.where(valid_C[:, None], grad_CV * scale, 0.0))


@functools.cache
def _mixed_addmm_works(device: torch.device) -> bool:
    # addmm with a bf16/fp16 product into an fp32 accumulator (cuBLAS, out_dtype) exists on CUDA in
    # recent torch; older builds also required the accumulator to share the inputs' dtype.
    try:
        acc = torch.zeros(16, 16, device=device)
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        torch.addmm(acc, a.T, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(acc[0, 0] == 16)


def _accumulate_grad_weight_(grad_weight_VD: torch.Tensor, grad_CV: torch.Tensor,
                             hidden_CD: torch.Tensor) -> None:
    """grad_weight_VD (fp32) += grad_CV.T @ hidden_CD without a (V, D) temporary in the inputs' dtype."""
    if grad_CV.dtype == torch.float32:
        grad_weight_VD.addmm_(grad_CV.T, hidden_CD)
    elif grad_CV.is_cuda and _mixed_addmm_works(grad_CV.device):
        torch.addmm(grad_weight_VD, grad_CV.T, hidden_CD, out_dtype=torch.float32, out=grad_weight_VD)
    else:
        # Chunk-sized upcasts only (the CPU path, or a torch without out_dtype).
        grad_weight_VD.addmm_(grad_CV.T.float(), hidden_CD.float())


def _loss_and_grads(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                    ignore_index: int, reduction: str, want_grad_hidden: bool, want_grad_weight: bool,
                    triton: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if triton:
        from kernels.cross_entropy_triton import cross_entropy_grad_ as step
    else:
        step = cross_entropy_grad_torch_
    n_rows, n_vocab = hidden_ND.shape[0], weight_VD.shape[0]
    device = hidden_ND.device
    write_grad = want_grad_hidden or want_grad_weight

    # Kept on the device: learning the count on the host would stall the launch queue.
    n_valid = (labels_N != ignore_index).sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.clamp(min=1).float()).reshape(1)
    else:
        scale = torch.ones(1, device=device)

    loss_N = torch.empty(n_rows, device=device, dtype=torch.float32)
    grad_hidden_ND = None
    if want_grad_hidden:
        grad_hidden_ND = torch.empty(hidden_ND.shape, device=device, dtype=hidden_ND.dtype)
    # fp32 across chunks: summing hundreds of chunk products in bf16 would lose the small ones.
    grad_weight_VD = None
    if want_grad_weight:
        grad_weight_VD = torch.zeros(weight_VD.shape, device=device, dtype=torch.float32)

    rows = chunk_rows(n_rows, n_vocab, hidden_ND.element_size())
    logits_buf = torch.empty(min(rows, n_rows), n_vocab, device=device, dtype=hidden_ND.dtype)
    for start in range(0, n_rows, rows):
        end = min(n_rows, start + rows)
        hidden_CD = hidden_ND[start:end]
        logits_CV = logits_buf[: end - start]
        torch.mm(hidden_CD, weight_VD.T, out=logits_CV)
        step(logits_CV, labels_N[start:end], loss_N[start:end], scale, ignore_index, write_grad)
        if grad_hidden_ND is not None:
            torch.mm(logits_CV, weight_VD, out=grad_hidden_ND[start:end])
        if grad_weight_VD is not None:
            _accumulate_grad_weight_(grad_weight_VD, logits_CV, hidden_CD)

    total = loss_N.sum()
    loss = total / n_valid if reduction == "mean" else total
    if grad_weight_VD is not None:
        grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
    return loss, grad_hidden_ND, grad_weight_VD


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, ignore_index, reduction, want_grad_hidden,
                want_grad_weight, triton):
        loss, grad_hidden_ND, grad_weight_VD = _loss_and_grads(
            hidden_ND, weight_VD, labels_N, ignore_index, reduction, want_grad_hidden, want_grad_weight,
            triton)
        ctx.save_for_backward(grad_hidden_ND, grad_weight_VD)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden_ND, grad_weight_VD = ctx.saved_tensors
        # Out of place: a retained graph may run this backward again on the same stored gradients.
        grad_hidden = None if grad_hidden_ND is None else grad_hidden_ND * grad_loss
        grad_weight = None if grad_weight_VD is None else grad_weight_VD * grad_loss
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _check(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, ignore_index: int,
           reduction: str) -> None:
    name = "fused_linear_cross_entropy"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{name}: reduction {reduction!r} is not 'mean' or 'sum'")
    if hidden_ND.dim() != 2:
        raise ValueError(f"{name}: hidden_ND must be 2-D (N, D), got shape {tuple(hidden_ND.shape)}")
    if weight_VD.dim() != 2 or weight_VD.shape[1] != hidden_ND.shape[1]:
        raise ValueError(f"{name}: weight_VD shape {tuple(weight_VD.shape)} is not (V, {hidden_ND.shape[1]}) "
                         f"for hidden_ND {tuple(hidden_ND.shape)}")
    if labels_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"{name}: labels_N shape {tuple(labels_N.shape)} is not ({hidden_ND.shape[0]},)")
    if hidden_ND.dtype not in _DTYPES:
        raise ValueError(f"{name}: hidden_ND dtype {hidden_ND.dtype} is not float32, bfloat16 or float16")
    if weight_VD.dtype != hidden_ND.dtype:
        raise ValueError(f"{name}: weight_VD dtype {weight_VD.dtype} != hidden_ND dtype {hidden_ND.dtype}")
    if labels_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels_N dtype {labels_N.dtype} is not int64 or int32")
    if not (hidden_ND.device == weight_VD.device == labels_N.device):
        raise ValueError(f"{name}: hidden_ND ({hidden_ND.device}), weight_VD ({weight_VD.device}) and "
                         f"labels_N ({labels_N.device}) are on different devices")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        # ValueError, not TypeError: every bad argument to a kernel wrapper is a ValueError.
        raise ValueError(f"{name}: ignore_index {ignore_index!r} is not an int")  # noqa: TRY004
    # The one host sync of the call: a label outside the vocab would otherwise read out of bounds.
    n_vocab = weight_VD.shape[0]
    bad_N = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= n_vocab))
    if bool(bad_N.any()):
        first = int(bad_N.nonzero()[0, 0])
        raise ValueError(f"{name}: labels_N[{first}] = {int(labels_N[first])} is outside [0, {n_vocab}) "
                         f"and is not ignore_index ({ignore_index})")


def fused_linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels; labels == ignore_index don't count.

    Returns an fp32 scalar. Gradients for hidden_ND and weight_VD are computed during this call
    when autograd will want them (so the call costs about three GEMMs of the head), and the
    backward only scales them. A mean over zero valid tokens is NaN (0/0) with zero gradients,
    as torch's F.cross_entropy gives. Any strides are accepted: the GEMMs are torch's.
    """
    _check(hidden_ND, weight_VD, labels_N, ignore_index, reduction)
    grad_on = torch.is_grad_enabled()
    return _FusedLinearCrossEntropy.apply(
        hidden_ND, weight_VD, labels_N, ignore_index, reduction,
        grad_on and hidden_ND.requires_grad, grad_on and weight_VD.requires_grad,
        use_triton(hidden_ND, weight_VD, labels_N))
