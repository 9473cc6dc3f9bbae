"""Weight-only 4-bit linear layers: asymmetric round-to-nearest in groups along the input
dimension (the scheme of llama.cpp's Q4_1: w = scale * q + min, q in 0..15).

The matmul runs in torch's packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), which
reads a quarter of bf16's bytes: at small batch a linear layer costs what its weights take to
stream from memory. CPU only for now: a CUDA kernel belongs to the kernels work. The serving
engine may attach a faster kernel that takes the weights over (`Int4Linear.attach`: herd's
AVX-512 VNNI one, see serving/engine/native_decode.py), which forward then runs instead.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
COMPUTE_DTYPE = torch.bfloat16


def quantize_int4(weight_NK: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (N, K) in 0..15, scales (N, K/g), mins (N, K/g)), all from float32 math.
    A group's minimum maps to code 0 and its maximum to 15, so weights that were Q4_1 to begin
    with come back with their original codes."""
    N, K = weight_NK.shape
    if K % group_size:
        raise ValueError(f"quantize_int4: in_features {K} is not a multiple of group_size {group_size}")
    w = weight_NK.float().view(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((w - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.view(N, K), scale, lo


def dequantize_int4(codes_NK: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    param_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 weights from codes; `param_dtype` rounds the scale and the kernel's zero point
    (min + 8 * scale) as Int4Linear stores them (bf16), giving exactly what it multiplies by."""
    N, K = codes_NK.shape
    g = K // scales.shape[1]
    s = scales.float().to(param_dtype).float()[..., None]
    z = (mins.float() + 8 * scales.float()).to(param_dtype).float()[..., None]
    w = (codes_NK.view(N, K // g, g).float() - 8) * s + z
    return w.view(N, K)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Each byte's low then high nibble, flattened."""
    flat = packed.flatten()
    return torch.stack([flat & 15, flat >> 4], dim=-1).flatten()


def _pack(codes_NK: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_NK.to(torch.int32).contiguous(), 1)


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes the packed CPU kernel takes (N a multiple of 16, K of the group)."""
    return out_features % 16 == 0 and in_features % group_size == 0 and group_size in GROUP_SIZES


class Int4Linear(nn.Module):
    """y = x @ dequant(W).T, W kept packed (N, K/2 bytes) with per-group scale and zero."""

    def __init__(self, codes_NK: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        super().__init__()
        N, K = codes_NK.shape
        self.out_features, self.in_features = N, K
        self.group_size = K // scales.shape[1]
        if not int4_supported(N, K, self.group_size):
            raise ValueError(f"Int4Linear: shape ({N}, {K}) with group {self.group_size} is not supported "
                             "(out_features must be a multiple of 16, in_features of the group size)")
        self.register_buffer("packed", _pack(codes_NK))
        # The kernel computes (q - 8) * scale + zero; Q4_1's min is the weight at q = 0.
        zeros = mins.float() + 8 * scales.float()
        self.register_buffer("scales_zeros", torch.stack([scales.float().t(), zeros.t()], dim=-1)
                             .to(COMPUTE_DTYPE).contiguous())
        self.fast = None  # see attach

    @classmethod
    def from_float(cls, weight_NK: torch.Tensor, group_size: int = 32) -> Int4Linear:
        return cls(*quantize_int4(weight_NK, group_size))

    def attach(self, fast) -> None:
        """Runs `fast` from now on: a faster kernel ((M, K) float32 -> (M, N) float32; herd's
        VNNI one, serving/engine/native_decode.py) holding the codes in its own layout, which
        gives them back with `fast.codes()`. torch's packed copy is dropped: the layer holds its
        weights once (a 4-bit Llama 4 Scout is ~55 GB of them)."""
        self.fast = fast
        self.packed = torch.empty(0, dtype=torch.uint8)

    def detach(self) -> None:
        """Back to torch's kernel, repacking the codes the fast kernel held."""
        if self.fast is not None:
            self.packed = _pack(self.fast.codes())
            self.fast = None

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight the kernels multiply by: (code - 8) * scale + zero, with
        scale and zero as stored (bf16)."""
        N, K, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_zeros.float().transpose(0, 1)  # (N, K / g, 2)
        w = (self.codes().view(N, K // g, g).float() - 8) * sz[..., :1] + sz[..., 1:]
        return w.view(N, K)

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes, from whichever kernel holds them. Out of torch's packed
        buffer: packing is a permutation of nibbles whose order is torch's business, so packing
        each 4-bit digit of every code's own index finds where each code went."""
        if self.fast is not None:
            return self.fast.codes()
        N, K = self.out_features, self.in_features
        index = torch.arange(N * K, dtype=torch.int32)
        where = torch.zeros(N * K, dtype=torch.int32)
        for shift in range(0, max(1, (N * K - 1).bit_length()), 4):
            where |= _nibbles(_pack(((index >> shift) & 15).view(N, K))).to(torch.int32) << shift
        codes = torch.empty(N * K, dtype=torch.uint8)
        codes[where.long()] = _nibbles(self.packed)
        return codes.view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes in bfloat16 whatever x's dtype (the kernel's float32 path is scalar code,
        30x slower); the result comes back in x's dtype."""
        if x.device.type != "cpu":
            raise NotImplementedError("Int4Linear runs on CPU only for now")
        if self.scales_zeros.dtype != COMPUTE_DTYPE:  # a model.to(dtype) cast it
            self.scales_zeros = self.scales_zeros.to(COMPUTE_DTYPE)
        shape = x.shape
        if self.fast is not None:
            y = self.fast(x.reshape(-1, self.in_features).float().contiguous())
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
