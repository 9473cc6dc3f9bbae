"""Rotary position embedding by per-token absolute positions, with llama3 frequency scaling."""

from __future__ import annotations

import math

import torch


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
    """Rotates q (T, H, d) and k (T, K, d) by the angle of each token's absolute position."""
    if q_THd.shape[0] != positions_T.shape[0] or k_TKd.shape[0] != positions_T.shape[0]:
        raise ValueError(f"apply_rotary: {positions_T.shape[0]} positions for q {tuple(q_THd.shape)},"
                         f" k {tuple(k_TKd.shape)}")
    if inv_freq.shape[0] * 2 != q_THd.shape[-1]:
        raise ValueError(f"apply_rotary: inv_freq {inv_freq.shape[0]} for head_dim {q_THd.shape[-1]}")
    return apply_rotary_reference(q_THd, k_TKd, positions_T, inv_freq, interleaved)
