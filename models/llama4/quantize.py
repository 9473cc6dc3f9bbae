"""Weight-only quantization of a loaded model for CPU serving (`quantization="int4"`).

Every projection (qkv, o, gate-up, down, shared experts) becomes an Int4Linear in groups of
32 along the input (llama.cpp's Q4_1 scheme: a Q4_1 GGUF gets its own codes back when loaded
in float32 first); the output head becomes int8 per row, as llama.cpp keeps it at 8 bits;
embeddings, norms, the router and routed experts stay in float.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.int4_linear import Int4Linear, int4_supported
from kernels.int8_linear import Int8Linear

METHODS = ("int4",)
GROUP_SIZE = 32


def check(method: str, device: str | torch.device) -> None:
    if method not in METHODS:
        raise ValueError(f"quantization: {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if torch.device(device).type != "cpu":
        raise ValueError("quantization: int4 runs on CPU only for now (load with device='cpu')")


@dataclass(frozen=True)
class Replacement:
    """A float linear layer that quantization replaces: `put(weight)` sets the quantized layer
    made from that weight as `parent.<name>`."""

    parent: nn.Module
    name: str
    make: Callable[[torch.Tensor], nn.Module]

    def put(self, weight: torch.Tensor) -> None:
        setattr(self.parent, self.name, self.make(weight))


def quantizers(model: nn.Module, group_size: int = GROUP_SIZE) -> dict[str, Replacement]:
    """The layers quantization replaces, by their weight's parameter name. A tied output head
    is not among them: it is made from the embedding, which stays (`quantize_tied_head`)."""
    out: dict[str, Replacement] = {}
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            if (isinstance(child, nn.Linear) and name not in ("router", "lm_head")
                    and int4_supported(child.out_features, child.in_features, group_size)):
                out[f"{path}.{name}.weight" if path else f"{name}.weight"] = Replacement(
                    parent, name, functools.partial(Int4Linear.from_float, group_size=group_size))
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        out["lm_head.weight"] = Replacement(model, "lm_head", Int8Linear)
    return out


def quantize_tied_head(model: nn.Module, method: str) -> None:
    if model.lm_head is None:
        model.lm_head = Int8Linear(model.embed_tokens.weight.data)
    model.quantization = method


def quantize_model(model: nn.Module, method: str = "int4", group_size: int = GROUP_SIZE) -> int:
    """Replaces linear layers of a loaded model in place; returns how many became int4. (The
    loader quantizes each layer as it reads it instead: models/llama4/loader.py.)"""
    check(method, next(model.parameters()).device)
    params = dict(model.named_parameters())
    todo = quantizers(model, group_size)
    for name, layer in todo.items():
        layer.put(params[name].data)
    quantize_tied_head(model, method)
    return sum(not name.startswith("lm_head") for name in todo)
