"""Triton: softmax cross-entropy over one chunk of logits, leaving d loss / d logits in their place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, stride_logits_c, stride_logits_v,
    labels_ptr, stride_labels,
    loss_ptr, stride_loss,
    scale_ptr,
    n_vocab, ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row. The row is swept twice in one launch: an online log-sum-exp, then the
    # gradient written over the logits. A vocab row (202048 x 2 bytes) is too big for SRAM, but the
    # second sweep mostly hits L2 because the programs in flight together stay within it.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_c
    label = tl.load(labels_ptr + row * stride_labels).to(tl.int64)
    cols_V = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        tl.store(loss_ptr + row * stride_loss, 0.0)
        if WRITE_GRAD:
            zeros_V = tl.zeros([BLOCK_V], dtype=tl.float32).to(logits_ptr.dtype.element_ty)
            for start in range(0, n_vocab, BLOCK_V):
                offs_V = start + cols_V
                tl.store(row_ptr + offs_V * stride_logits_v, zeros_V, mask=offs_V < n_vocab)
    else:
        # A scalar running max (not per lane) keeps every exp argument finite: each block holds at
        # least one real column, so the block max is finite even where the mask pads with -inf.
        m = tl.full([], -float("inf"), tl.float32)
        d = tl.zeros([], tl.float32)
        for start in range(0, n_vocab, BLOCK_V):
            offs_V = start + cols_V
            x_V = tl.load(row_ptr + offs_V * stride_logits_v, mask=offs_V < n_vocab,
                          other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x_V, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x_V - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        target = tl.load(row_ptr + label * stride_logits_v).to(tl.float32)
        tl.store(loss_ptr + row * stride_loss, lse - target)

        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            for start in range(0, n_vocab, BLOCK_V):
                offs_V = start + cols_V
                mask_V = offs_V < n_vocab
                x_V = tl.load(row_ptr + offs_V * stride_logits_v, mask=mask_V, other=0.0).to(tl.float32)
                grad_V = tl.exp(x_V - lse) - tl.where(offs_V == label, 1.0, 0.0)
                tl.store(row_ptr + offs_V * stride_logits_v,
                         (grad_V * scale).to(logits_ptr.dtype.element_ty), mask=mask_V)


def _launch_config(n_vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). A fixed small block when interpreting, so that tests cross block edges."""
    if interpreting():
        return 128, 4
    block_v = min(triton.next_power_of_2(n_vocab), 8192)
    # 16 elements per thread: wide enough loads, few enough registers for the two live fp32 vectors.
    return block_v, max(4, min(16, block_v // 512))


def cross_entropy_grad_(logits_CV: torch.Tensor, labels_C: torch.Tensor, loss_C: torch.Tensor,
                        scale: torch.Tensor, ignore_index: int, write_grad: bool) -> None:
    """Row losses into loss_C (fp32); with write_grad, logits_CV becomes (softmax - onehot) * scale.

    scale is a one-element fp32 tensor (1 / valid tokens for a mean) read on the device, so the
    caller need not synchronise to learn it. Ignored rows get loss 0 and gradient 0. Checked by
    the caller (kernels.cross_entropy): shapes, dtypes, labels within [0, V) or ignore_index.
    """
    rows, n_vocab = logits_CV.shape
    if rows == 0:
        return
    block_v, num_warps = _launch_config(n_vocab)
    _cross_entropy_grad_kernel[(rows,)](
        logits_CV, logits_CV.stride(0), logits_CV.stride(1),
        labels_C, labels_C.stride(0),
        loss_C, loss_C.stride(0),
        scale,
        n_vocab, ignore_index,
        WRITE_GRAD=write_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
