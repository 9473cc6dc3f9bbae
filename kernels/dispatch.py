"""Which implementation a kernel wrapper runs: Triton on CUDA, the PyTorch reference elsewhere.

`HERD_KERNELS` overrides the choice: `reference` everywhere, or `triton` everywhere, which on
CPU tensors needs Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported;
that is how the CPU tests check every kernel against its reference).
"""

from __future__ import annotations

import functools
import os

import torch

MODES = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the wrapper should launch its Triton kernel on these tensors."""
    mode = os.environ.get("HERD_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"HERD_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("HERD_KERNELS=triton but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError("HERD_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before triton is imported)")
        return True
    return on_cuda and triton_available()
