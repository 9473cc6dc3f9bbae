"""Weight-only int8 linear layers: one symmetric scale per output row.

CPU runs torch's int8 weight kernel (`_weight_int8pack_mm`): half of bf16's bytes. Used where
4 bits cost too much accuracy, e.g. the output head over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight_NK: torch.Tensor) -> None:
        super().__init__()
        w = weight_NK.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.fast = None  # as Int4Linear.fast

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise NotImplementedError("Int8Linear runs on CPU only for now")
        if self.scales.dtype != torch.bfloat16:  # a model.to(dtype) cast it
            self.scales = self.scales.to(torch.bfloat16)
        shape = x.shape
        if self.fast is not None:
            y = self.fast(x.reshape(-1, self.in_features).float().contiguous())
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        # bfloat16 whatever x's dtype: the kernel's float32 path is ~13x slower.
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
