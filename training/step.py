"""One optimiser step: forward and backward over the micro-batches, clip, AdamW.

The loss is the mean cross-entropy over every label token of the whole step (all micro-batches,
all data-parallel ranks), so gradient accumulation and data parallelism change nothing but speed:
each micro-batch adds sum(CE) / (labels in the step) and FSDP2 averages gradients over the dp
ranks, so each rank scales by dp. The logits never exist whole: the head's GEMM and the
cross-entropy run fused (kernels.fused_linear_cross_entropy), in the compute dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from kernels import fused_linear_cross_entropy
from models.llama4 import DenseAttention
from training.aux_loss import RouterLogits
from training.distributed import DistContext
from training.packing import IGNORE, Batch
from training.precision import Precision


@dataclass
class StepResult:
    loss: float  # mean cross-entropy per label token, over the step
    aux_loss: float | None  # mean MoE balance loss (1.0 = even), None for dense models
    grad_norm: float
    tokens: int  # input tokens over all data-parallel ranks
    label_tokens: int
    lr: float


def _full(t: torch.Tensor) -> torch.Tensor:
    # Under tensor parallelism the hidden states or the head may be DTensors; the loss wants them whole.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def head_weight(model: nn.Module) -> torch.Tensor:
    return model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight


def forward_loss(model: nn.Module, batch: Batch, precision: Precision, router: RouterLogits | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum of cross-entropy over the batch's labels, MoE balance loss or None)."""
    capture = router.capture() if router is not None else contextlib.nullcontext([])
    with precision.autocast(), capture as logits:
        hidden_TD = model(batch.input_ids_T, batch.positions_T, DenseAttention(batch.seq_lens, batch.positions_T))
    dtype = precision.dtype
    ce_sum = fused_linear_cross_entropy(_full(hidden_TD).to(dtype), _full(head_weight(model)).to(dtype),
                                        batch.labels_T, ignore_index=IGNORE, reduction="sum")
    aux = router.loss(logits, batch.valid_T) if router is not None else None
    return ce_sum, aux


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
    return float(_full(norm))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], lr: float, *,
               precision: Precision, router: RouterLogits | None, aux_coef: float, grad_clip: float,
               ctx: DistContext) -> StepResult:
    for group in optimizer.param_groups:
        group["lr"] = lr
    label_tokens = round(ctx.data_sum(sum(b.num_labels for b in batches)))
    tokens = round(ctx.data_sum(sum(b.num_tokens for b in batches)))
    scale = ctx.dp_size / max(label_tokens, 1)
    ce_total = torch.zeros((), dtype=torch.float64)
    aux_total = 0.0
    has_aux = False
    for i, batch in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last only
            model.set_requires_gradient_sync(i == len(batches) - 1)
        ce_sum, aux = forward_loss(model, batch, precision, router)
        loss = ce_sum * scale
        if aux is not None:
            has_aux = True
            aux_total += float(aux.detach()) / len(batches)
            if aux_coef > 0:
                loss = loss + aux * (aux_coef / len(batches))
        loss.backward()
        ce_total += ce_sum.detach().double().cpu()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = _grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = ctx.data_sum(float(ce_total)) / max(label_tokens, 1)
    aux_mean = ctx.data_sum(aux_total) / ctx.dp_size if has_aux else None
    return StepResult(loss=mean_loss, aux_loss=aux_mean, grad_norm=grad_norm, tokens=tokens,
                      label_tokens=label_tokens, lr=lr)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[Batch], precision: Precision, ctx: DistContext) -> float:
    """Mean cross-entropy per label token over `batches` (all data-parallel ranks' together)."""
    total, labels = 0.0, 0
    for batch in batches:
        ce_sum, _ = forward_loss(model, batch, precision, None)
        total += float(ce_sum)
        labels += batch.num_labels
    return ctx.data_sum(total) / max(ctx.data_sum(labels), 1)
