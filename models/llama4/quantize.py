"""Weight-only quantization of a loaded model for CPU serving (`quantization="int4"`).

Every projection (qkv, o, gate-up, down, shared experts) becomes an Int4Linear in groups of
32 along the input (llama.cpp's Q4_1 scheme: a Q4_1 GGUF gets its own codes back when loaded
in float32 first); the output head becomes int8 per row, as llama.cpp keeps it at 8 bits;
embeddings, norms, the router and routed experts stay in float.
"""

from __future__ import annotations

from torch import nn

from kernels.int4_linear import Int4Linear, int4_supported
from kernels.int8_linear import Int8Linear

METHODS = ("int4",)
GROUP_SIZE = 32


def quantize_model(model: nn.Module, method: str = "int4", group_size: int = GROUP_SIZE) -> int:
    """Replaces linear layers in place; returns how many became int4."""
    if method not in METHODS:
        raise ValueError(f"quantization: {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantization: int4 runs on CPU only for now (load with device='cpu')")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and name not in ("router", "lm_head")
                    and int4_supported(child.out_features, child.in_features, group_size)):
                setattr(parent, name, Int4Linear.from_float(child.weight.data, group_size))
                count += 1
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head = Int8Linear(head.data)
    model.quantization = method
    return count
