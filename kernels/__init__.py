"""Compute kernels shared by serving and training.

Each op has a plain-PyTorch reference and a host wrapper (the public function) that checks
its inputs; the wrapper dispatches to a Triton kernel on CUDA where one exists and to the
reference elsewhere, so the model runs the same code on CPU and GPU.
"""

from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.flash_attention import flash_attention
from kernels.moe import moe_experts
from kernels.moe_routing import moe_route
from kernels.paged_attention import paged_decode_attention
from kernels.rms_norm import rms_norm
from kernels.rotary import apply_rotary, rope_inv_freq
from kernels.swiglu import silu_and_mul

__all__ = ["apply_rotary", "flash_attention", "fused_linear_cross_entropy", "moe_experts", "moe_route",
           "paged_decode_attention", "rms_norm", "rope_inv_freq", "silu_and_mul"]
