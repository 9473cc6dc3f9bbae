"""Triton SwiGLU on a fused gate-up projection: silu(gate) * up forward, d gate_up backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting


@triton.jit
def _silu_and_mul_fwd_kernel(
    gu_ptr, out_ptr, n_rows, n_cols, gu_stride, out_stride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    gate_RC = gu_ptr + rows[:, None] * gu_stride + cols[None, :]
    g_RC = tl.load(gate_RC, mask=mask, other=0.0).to(tl.float32)
    u_RC = tl.load(gate_RC + n_cols, mask=mask, other=0.0).to(tl.float32)
    # Round silu to the input dtype before the product, as F.silu(gate) * up does.
    silu_RC = (g_RC * tl.sigmoid(g_RC)).to(gu_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :],
             (silu_RC * u_RC).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_bwd_kernel(
    dout_ptr, gu_ptr, dgu_ptr, n_rows, n_cols, dout_stride, gu_stride, dgu_stride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    gate_RC = gu_ptr + rows[:, None] * gu_stride + cols[None, :]
    g_RC = tl.load(gate_RC, mask=mask, other=0.0).to(tl.float32)
    u_RC = tl.load(gate_RC + n_cols, mask=mask, other=0.0).to(tl.float32)
    do_RC = tl.load(dout_ptr + rows[:, None] * dout_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig_RC = tl.sigmoid(g_RC)
    silu_RC = g_RC * sig_RC
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    dg_RC = do_RC * u_RC * sig_RC * (1.0 + g_RC * (1.0 - sig_RC))
    # up's gradient sees silu as the forward stored it, rounded to the input dtype.
    du_RC = do_RC * silu_RC.to(gu_ptr.dtype.element_ty).to(tl.float32)
    dgate_RC = dgu_ptr + rows[:, None] * dgu_stride + cols[None, :]
    tl.store(dgate_RC, dg_RC.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_RC + n_cols, du_RC.to(dgu_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, cols) with a unit-stride last dim; a copy only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    block_c = min(1024, triton.next_power_of_2(n_cols))
    if interpreting():  # each program is a Python call: few, large ones
        block_r = max(1, 16384 // block_c)
        warps = 4
    else:
        block_r = max(1, 4096 // block_c)
        warps = 8 if block_r * block_c >= 4096 else 4
    block_r = min(block_r, triton.next_power_of_2(max(n_rows, 1)))
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c)), block_r, block_c, warps


def silu_and_mul_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    n_cols = gate_up.shape[-1] // 2
    gu = _rows(gate_up)
    out = torch.empty((*gate_up.shape[:-1], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid, block_r, block_c, warps = _grid(gu.shape[0], n_cols)
        _silu_and_mul_fwd_kernel[grid](gu, out, gu.shape[0], n_cols, gu.stride(0), n_cols,
                                       BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out


def silu_and_mul_bwd(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    n_cols = gate_up.shape[-1] // 2
    gu = _rows(gate_up)
    do = _rows(dout)
    dgu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgu.numel():
        grid, block_r, block_c, warps = _grid(gu.shape[0], n_cols)
        _silu_and_mul_bwd_kernel[grid](do, gu, dgu, gu.shape[0], n_cols, do.stride(0), gu.stride(0), 2 * n_cols,
                                       BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return dgu


class _SiluAndMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return silu_and_mul_fwd(gate_up)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        return silu_and_mul_bwd(dout, gate_up)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SiluAndMulFn.apply(gate_up)
    return silu_and_mul_fwd(gate_up)
