"""bfloat16 models on CPUs without bfloat16 arithmetic (no AVX512-BF16, no AMX): GEMMs of many
rows (batched decode, prefill, the output head over a batch) from a float32 copy of the weights.

There oneDNN's bfloat16 GEMM converts as it goes; from a few dozen rows up torch's float32 GEMM
is faster (`benchmarks/cpu_gemm.py`), while a batch-1 decode, which only streams the weights, is
faster reading half the bytes. So each linear layer keeps both: its bfloat16 weight and a float32
copy, chosen by the number of rows. The inputs hold bfloat16 values and the output is rounded to
bfloat16, as the bfloat16 GEMM's is, so only the summation order changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 48  # from here on the float32 copy (benchmarks/cpu_gemm.py)


def wanted(model: nn.Module, setting: bool | None) -> bool:
    """Whether the model gets float32 copies: a bfloat16 model on CPU, not sharded, when asked
    (True) or, by default (None), when the CPU has no bfloat16 arithmetic."""
    p = model.embed_tokens.weight
    if p.device.type != "cpu" or p.dtype != torch.bfloat16 or type(model.embed_tokens) is not nn.Embedding:
        return False
    if setting is None:
        return not torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported()
    return setting


class Float32GemmLinear(nn.Module):
    """A bias-free linear layer over a bfloat16 weight that runs inputs of MIN_ROWS rows or more
    through a float32 copy of it."""

    min_rows = MIN_ROWS

    def __init__(self, weight: torch.Tensor) -> None:
        """weight: (N, K) bfloat16, shared (the layer's parameter, or the tied embedding's)."""
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_f32", weight.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.min_rows * self.in_features:
            return F.linear(x.float(), self.weight_f32).to(x.dtype)
        return F.linear(x, self.weight)


def use_float32_gemms(model: nn.Module) -> int:
    """Gives every bias-free bfloat16 nn.Linear of the model, and a head tied to the embedding,
    a float32 copy for GEMMs of many rows; returns how many layers have one."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, Float32GemmLinear(child.weight))
            count += type(getattr(parent, name)) is Float32GemmLinear
    if getattr(model, "lm_head", False) is None:  # tied: the head reads the embedding's weight
        model.lm_head = Float32GemmLinear(model.embed_tokens.weight)
        count += 1
    return count
