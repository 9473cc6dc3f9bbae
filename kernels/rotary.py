"""Rotary position embedding by per-token absolute positions, with llama3 frequency scaling."""

from __future__ import annotations

import math

import torch

from kernels.dispatch import use_triton


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32; `scaling` has the llama3 fields."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = x.float()
    if interleaved:  # pairs (x0, x1), (x2, x3), ... as complex numbers
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # halves (x[:d/2], x[d/2:])
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rotary_reference(q_THd, k_TKd, positions_T, inv_freq, interleaved):
    freqs_TF = positions_T.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs_TF.cos()[:, None, :], freqs_TF.sin()[:, None, :]
    return _rotate(q_THd, cos, sin, interleaved), _rotate(k_TKd, cos, sin, interleaved)


def apply_rotary(q_THd: torch.Tensor, k_TKd: torch.Tensor, positions_T: torch.Tensor,
                 inv_freq: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (T, H, d) and k (T, K, d) by the angle of each token's absolute position.

    Use the returned tensors: the Triton path rotates q and k in place (and returns them) unless
    autograd records the op, the reference returns new tensors.
    """
    for name, t in (("q_THd", q_THd), ("k_TKd", k_TKd)):
        if t.dim() != 3:
            raise ValueError(f"apply_rotary: {name} has shape {tuple(t.shape)}, expected 3 dims (T, heads, d)")
        if not t.is_floating_point():
            raise ValueError(f"apply_rotary: {name} has dtype {t.dtype}, expected a floating dtype")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"apply_rotary: {name} has strides {t.stride()}; its last dim must be contiguous")
    if k_TKd.dtype != q_THd.dtype:
        raise ValueError(f"apply_rotary: k_TKd has dtype {k_TKd.dtype}, q_THd {q_THd.dtype}")
    if k_TKd.shape[-1] != q_THd.shape[-1]:
        raise ValueError(f"apply_rotary: k_TKd head_dim {k_TKd.shape[-1]} != q_THd head_dim {q_THd.shape[-1]}")
    if q_THd.shape[-1] % 2:
        raise ValueError(f"apply_rotary: q_THd head_dim {q_THd.shape[-1]} is odd")
    if positions_T.dim() != 1 or positions_T.is_floating_point() or positions_T.is_complex():
        raise ValueError(f"apply_rotary: positions_T must be a 1-d integer tensor, got {positions_T.dtype} "
                         f"{tuple(positions_T.shape)}")
    if q_THd.shape[0] != positions_T.shape[0] or k_TKd.shape[0] != positions_T.shape[0]:
        raise ValueError(f"apply_rotary: {positions_T.shape[0]} positions_T for q_THd {tuple(q_THd.shape)},"
                         f" k_TKd {tuple(k_TKd.shape)}")
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32:
        raise ValueError(f"apply_rotary: inv_freq must be 1-d float32, got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    if inv_freq.shape[0] * 2 != q_THd.shape[-1]:
        raise ValueError(f"apply_rotary: inv_freq {inv_freq.shape[0]} for head_dim {q_THd.shape[-1]}")
    for name, t in (("k_TKd", k_TKd), ("positions_T", positions_T), ("inv_freq", inv_freq)):
        if t.device != q_THd.device:
            raise ValueError(f"apply_rotary: {name} is on {t.device}, q_THd on {q_THd.device}")
    if use_triton(q_THd, k_TKd, positions_T, inv_freq):
        from kernels.rotary_triton import apply_rotary_triton

        return apply_rotary_triton(q_THd, k_TKd, positions_T, inv_freq.contiguous(), interleaved)
    return apply_rotary_reference(q_THd, k_TKd, positions_T, inv_freq, interleaved)
