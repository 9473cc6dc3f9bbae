"""Triton RMSNorm: residual add + norm in one pass forward; d x (= d residual) and d weight backward."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreting

# One row lives in registers whole; wider rows would spill, and no model has them.
MAX_COLS = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, rstd_ptr,
    n_rows, n_cols, x_inner, x_s0, x_s1, r_inner, r_s0, r_s1,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row r of the flattened (rows, cols) view sits at (r // inner) * s0 + (r % inner) * s1, so q/k
    # heads sliced out of a fused qkv projection are normalised without a copy.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x_R = (rows // x_inner) * x_s0 + (rows % x_inner) * x_s1
    x_RD = tl.load(x_ptr + x_R[:, None] + cols[None, :], mask=mask, other=0.0)
    dense_RD = rows[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r_R = (rows // r_inner) * r_s0 + (rows % r_inner) * r_s1
        r_RD = tl.load(res_ptr + r_R[:, None] + cols[None, :], mask=mask, other=0.0)
        # Round the sum to x's dtype before normalising: the reference adds in x's dtype too.
        x_RD = (x_RD.to(tl.float32) + r_RD.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + dense_RD, x_RD, mask=mask)
    xf_RD = x_RD.to(tl.float32)
    rstd_R = tl.rsqrt(tl.sum(xf_RD * xf_RD, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd_R, mask=row_ok)
    # Cast to x's dtype before the weight, as the reference models do.
    y_RD = (xf_RD * rstd_R[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w_D = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y_RD = y_RD * w_D[None, :]
    tl.store(y_ptr + dense_RD, y_RD.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, dsum_ptr, s_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    n_rows, n_cols, n_inner, s_s0, s_s1, rows_per_program,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # s is the normalised input (x + residual); dy, dsum and dx are dense (rows, cols).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        w_D = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Each program walks its own run of rows and keeps one partial d weight, so the weight's gradient
    # needs no atomics: the host sums the (programs, cols) partials.
    dw_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_R):
        rows = first + start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        outer, inner = rows // n_inner, rows % n_inner
        s_RD = tl.load(s_ptr + (outer * s_s0 + inner * s_s1)[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        dense_RD = rows[:, None] * n_cols + cols[None, :]
        dy_RD = tl.load(dy_ptr + dense_RD, mask=mask, other=0.0).to(tl.float32)
        rstd_R = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n_RD = s_RD * rstd_R[:, None]
        if HAS_WEIGHT:
            # The weight multiplied the norm after its cast to the input's dtype.
            dw_D += tl.sum(dy_RD * n_RD.to(s_ptr.dtype.element_ty).to(tl.float32), axis=0)
            dn_RD = dy_RD * w_D[None, :]
        else:
            dn_RD = dy_RD
        # d(s * rstd(s)) = rstd * (dn - n * mean(dn * n)): rstd depends on every element of the row.
        proj_R = tl.sum(dn_RD * n_RD, axis=1) / n_cols
        ds_RD = rstd_R[:, None] * (dn_RD - n_RD * proj_R[:, None])
        if HAS_DSUM:
            ds_RD += tl.load(dsum_ptr + dense_RD, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + dense_RD, ds_RD.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_part_ptr + pid * n_cols + cols, dw_D, mask=col_ok)


def row_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(n_inner, s0, s1) with row r at (r // n_inner) * s0 + (r % n_inner) * s1, or None.

    Needs a unit-stride last dim and leading dims that merge into at most two strided ones.
    """
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    dims: list[list[int]] = []  # [size, stride], outermost first, merged where memory allows
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        return None
    if len(dims) == 2:
        return dims[1][0], dims[0][1], dims[1][1]
    return 1, (dims[0][1] if dims else 0), 0


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    layout = row_layout(t)
    if layout is None:
        t = t.contiguous()
        layout = row_layout(t)
    return t, layout


def _blocks(n_cols: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(n_cols)
    if interpreting():  # every program instance is a Python call: few, large programs
        return max(1, 16384 // block_d), block_d, 4
    block_r = max(1, min(16, 2048 // block_d))
    return block_r, block_d, min(16, max(1, block_r * block_d // 512))


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None):
    """(y, x + residual or None, rstd); y and the sum are dense with x's shape."""
    n_cols = x.shape[-1]
    n_rows = x.numel() // max(n_cols, 1)
    x, (x_inner, x_s0, x_s1) = _rows(x)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    summed, (r_inner, r_s0, r_s1) = None, (1, 0, 0)
    if residual is not None:
        residual, (r_inner, r_s0, r_s1) = _rows(residual)
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, summed, rstd
    block_r, block_d, warps = _blocks(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x, residual if residual is not None else x, weight if weight is not None else x, y,
        summed if summed is not None else y, rstd,
        n_rows, n_cols, x_inner, x_s0, x_s1, r_inner, r_s0, r_s1, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y, summed, rstd


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; each adds one partial d weight row to sum."""
    if interpreting() or device.type != "cuda":
        return min(n_blocks, 4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return min(n_blocks, 4 * _sm_count(index))


def rms_norm_bwd(dy: torch.Tensor, dsum: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
                 rstd: torch.Tensor, in_dtype: torch.dtype):
    """(d s, d weight or None); d s is the gradient of both x and residual."""
    n_cols = s.shape[-1]
    n_rows = rstd.numel()
    s, (n_inner, s_s0, s_s1) = _rows(s)
    dy = dy.contiguous()
    dsum = dsum.contiguous() if dsum is not None else None
    dx = torch.empty(s.shape, dtype=in_dtype, device=s.device)
    if n_rows == 0:
        return dx, None if weight is None else torch.zeros_like(weight)
    block_r, block_d, warps = _blocks(n_cols)
    n_blocks = triton.cdiv(n_rows, block_r)
    # Without a weight there is nothing to reduce across rows: one block of rows per program.
    programs = n_blocks if weight is None else _programs(n_blocks, s.device)
    rows_per_program = triton.cdiv(n_blocks, programs) * block_r
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_part = (torch.empty((programs, n_cols), dtype=torch.float32, device=s.device)
               if weight is not None else rstd)
    _rms_norm_bwd_kernel[(programs,)](
        dy, dsum if dsum is not None else dy, s, weight if weight is not None else s, rstd, dx, dw_part,
        n_rows, n_cols, n_inner, s_s0, s_s1, rows_per_program,
        HAS_DSUM=dsum is not None, HAS_WEIGHT=weight is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx, (dw_part.sum(0).to(weight.dtype) if weight is not None else None)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        y, summed, rstd = rms_norm_fwd(x, weight, eps, residual)
        s = x if summed is None else summed
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.x_dtype = x.dtype
        if summed is None:
            return y
        return y, summed

    @staticmethod
    def backward(ctx, dy, dsum=None):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
        dx, dw = rms_norm_bwd(dy, dsum, s, weight, rstd, ctx.x_dtype)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                dx if ctx.has_residual and ctx.needs_input_grad[2] else None, None)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] > MAX_COLS:
        raise ValueError(f"rms_norm: x's last dim {x.shape[-1]} > {MAX_COLS}, the widest row the kernel holds")
    tracked = [t for t in (x, weight, residual) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        if residual is None:  # the second output is x itself, as on the reference path
            return _RMSNormFn.apply(x, weight, None, eps), x
        y, summed = _RMSNormFn.apply(x, weight, residual, eps)
        return y, summed
    y, summed, _ = rms_norm_fwd(x, weight, eps, residual)
    return y, (x if summed is None else summed)
