"""bf16 compute over float32 master weights: torch.autocast plus two casts at the model's edges.

Autocast runs the matmuls in bf16 but leaves the rest of the graph in whatever dtype arrives, and
herd's kernels want one dtype per call (the fused residual add of rms_norm; the MoE experts
accumulate into a buffer of their input's dtype). So, from outside the model: the embedding's
output is cast to bf16 (the residual stream is then bf16 throughout, as under FSDP2's bf16 param
policy), and each MoE block's input too (the norm before it multiplies by a float32 weight).
The weights, their gradients and the optimiser state stay float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from models.llama4.model import MoE


class Precision:
    def __init__(self, model: nn.Module, dtype: torch.dtype, device_type: str) -> None:
        self.dtype = dtype
        self.device_type = device_type
        self._handles = []
        if dtype != torch.float32:
            self._handles.append(model.embed_tokens.register_forward_hook(self._cast_output))
            for m in model.modules():
                if isinstance(m, MoE):
                    self._handles.append(m.register_forward_pre_hook(self._cast_input))

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def _active(self) -> bool:
        return torch.is_autocast_enabled(self.device_type)

    def _cast_output(self, module, args, output):
        return output.to(self.dtype) if self._active() else output

    def _cast_input(self, module, args):
        if self._active():
            return (args[0].to(self.dtype), *args[1:])
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
