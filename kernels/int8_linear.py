"""Weight-only int8 linear layers: one symmetric scale per output row.

CPU runs torch's int8 weight kernel (`_weight_int8pack_mm`): half of bf16's bytes. Used where
4 bits cost too much accuracy, e.g. the output head over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_PER_SLICE = 4096


class Int8Linear(nn.Module):
    def __init__(self, weight_NK: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_NK.shape
        codes = torch.empty(weight_NK.shape, dtype=torch.int8)
        scale = torch.empty(self.out_features)
        # In slices of rows: float temporaries of a whole vocabulary-sized head were the peak of
        # loading an int4 model.
        for start in range(0, self.out_features, ROWS_PER_SLICE):
            w = weight_NK[start:start + ROWS_PER_SLICE].to(torch.float32, copy=True)  # divided in place below
            s = w.abs().amax(dim=1).clamp_min(1e-12) / 127
            scale[start:start + len(w)] = s
            codes[start:start + len(w)] = w.div_(s[:, None]).round_().clamp_(-127, 127)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.fast = None  # see attach

    def attach(self, fast) -> None:
        """As Int4Linear.attach: `fast` takes the int8 weights over (`fast.codes()` gives them back)."""
        self.fast = fast
        self.weight_int8 = torch.empty(0, dtype=torch.int8)

    def detach(self) -> None:
        if self.fast is not None:
            self.weight_int8 = self.fast.codes()
            self.fast = None

    def codes(self) -> torch.Tensor:
        """The (N, K) int8 weights, from whichever kernel holds them."""
        return self.weight_int8 if self.fast is None else self.fast.codes()

    def dequantized(self) -> torch.Tensor:
        return self.codes().float() * self.scales.float()[:, None]

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
