"""Triton rotary embedding: rotates q and k by each token's angle, in place or into new tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.dispatch import interpreting


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, src_st, src_sh, dst_st, dst_sh, n_heads, head0,
    t_T, t_ok, cos_TF, sin_TF,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):
    h_H = head0 + tl.arange(0, BLOCK_H)
    f_F = tl.arange(0, BLOCK_F)
    mask = t_ok[:, None, None] & (h_H < n_heads)[None, :, None] & (f_F < HALF)[None, None, :]
    if INTERLEAVED:  # pairs (x0, x1), (x2, x3), ...
        i1_F = 2 * f_F
        i2_F = 2 * f_F + 1
    else:  # halves (x[:d/2], x[d/2:])
        i1_F = f_F
        i2_F = f_F + HALF
    src_THF = src_ptr + t_T[:, None, None] * src_st + h_H[None, :, None] * src_sh
    dst_THF = dst_ptr + t_T[:, None, None] * dst_st + h_H[None, :, None] * dst_sh
    # Both halves are read before either is written, so src == dst rotates in place.
    x1 = tl.load(src_THF + i1_F[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_THF + i2_F[None, None, :], mask=mask, other=0.0).to(tl.float32)
    cos = cos_TF[:, None, :]
    sin = sin_TF[:, None, :]
    tl.store(dst_THF + i1_F[None, None, :], (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_THF + i2_F[None, None, :], (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr,
    n_tokens, n_q_heads, n_k_heads, pos_stride,
    q_st, q_sh, k_st, k_sh, qo_st, qo_sh, ko_st, ko_sh,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, LIBDEVICE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # Grid: (token blocks, q head blocks then k head blocks); both share the token block's angles.
    t_T = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t_T < n_tokens
    f_F = tl.arange(0, BLOCK_F)
    pos_T = tl.load(pos_ptr + t_T * pos_stride, mask=t_ok, other=0).to(tl.float32)
    inv_F = tl.load(inv_freq_ptr + f_F, mask=f_F < HALF, other=0.0)
    angle_TF = pos_T[:, None] * inv_F[None, :]
    if LIBDEVICE:
        # Angles reach position * 1 rad (millions at long context): the precise, range-reduced
        # cos/sin, like torch's, not the hardware approximations.
        cos_TF = libdevice.cos(angle_TF)
        sin_TF = libdevice.sin(angle_TF)
    else:  # the interpreter has no libdevice; its numpy cos/sin are precise
        cos_TF = tl.cos(angle_TF)
        sin_TF = tl.sin(angle_TF)
    if INVERSE:  # the backward rotates gradients by the negative angle
        sin_TF = -sin_TF
    pid_h = tl.program_id(1)
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if pid_h < q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, q_st, q_sh, qo_st, qo_sh, n_q_heads, pid_h * BLOCK_H,
                      t_T, t_ok, cos_TF, sin_TF, HALF, INTERLEAVED, BLOCK_H, BLOCK_F)
    else:
        _rotate_heads(k_ptr, k_out_ptr, k_st, k_sh, ko_st, ko_sh, n_k_heads, (pid_h - q_blocks) * BLOCK_H,
                      t_T, t_ok, cos_TF, sin_TF, HALF, INTERLEAVED, BLOCK_H, BLOCK_F)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotate(q_THd: torch.Tensor, k_TKd: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
           positions_T: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool, inverse: bool = False) -> None:
    """Writes q, k rotated into q_out, k_out (which may be q, k themselves); last dims unit-stride."""
    T, H, d = q_THd.shape
    K = k_TKd.shape[1]
    if T == 0 or d == 0 or H + K == 0:
        return
    half = d // 2
    block_f = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(H, K, 1)), max(1, 1024 // block_f))
    if interpreting():  # each program is a Python call: few, large ones
        block_t = max(1, 8192 // (block_h * block_f))
        warps = 4
    else:
        block_t = max(1, 2048 // (block_h * block_f))
        warps = 4
    block_t = min(block_t, triton.next_power_of_2(T))
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h) + triton.cdiv(K, block_h))
    _rotary_kernel[grid](
        q_THd, k_TKd, q_out, k_out, positions_T, inv_freq,
        T, H, K, positions_T.stride(0),
        q_THd.stride(0), q_THd.stride(1), k_TKd.stride(0), k_TKd.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        HALF=half, INTERLEAVED=interleaved, INVERSE=inverse, LIBDEVICE=not interpreting(),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_F=block_f, num_warps=warps)


def _new(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _RotaryFn(torch.autograd.Function):
    """Out of place: q and k may be views autograd forbids writing (split outputs) or saved tensors."""

    @staticmethod
    def forward(ctx, q_THd, k_TKd, positions_T, inv_freq, interleaved):
        q_out, k_out = _new(q_THd), _new(k_TKd)
        rotate(q_THd, k_TKd, q_out, k_out, positions_T, inv_freq, interleaved)
        ctx.save_for_backward(positions_T, inv_freq)
        ctx.interleaved = interleaved
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_THd, dk_TKd):
        positions_T, inv_freq = ctx.saved_tensors
        dq_THd, dk_TKd = _unit_last(dq_THd), _unit_last(dk_TKd)
        dq_in, dk_in = _new(dq_THd), _new(dk_TKd)
        rotate(dq_THd, dk_TKd, dq_in, dk_in, positions_T, inv_freq, ctx.interleaved, inverse=True)
        return dq_in, dk_in, None, None, None


def apply_rotary_triton(q_THd: torch.Tensor, k_TKd: torch.Tensor, positions_T: torch.Tensor,
                        inv_freq: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and (q_THd.requires_grad or k_TKd.requires_grad):
        return _RotaryFn.apply(q_THd, k_TKd, positions_T, inv_freq, interleaved)
    rotate(q_THd, k_TKd, q_THd, k_TKd, positions_T, inv_freq, interleaved)
    return q_THd, k_TKd
