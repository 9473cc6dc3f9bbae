"""Model FLOPs of a training step, and the hardware peak that MFU divides them by.

FLOPs count the matmuls a step must do, whatever the implementation does on top (PaLM's MFU):
2 per multiply-add, x3 for forward + backward. Per token: every active weight matrix (attention,
the dense MLP or the router + shared expert + top-k experts, the output head; not the embedding
lookup), and attention's QK^T and PV over the keys each query actually sees (causal, inside the
token's document, inside its chunk on chunked layers).

The peak is the vendor's dense bf16 (or tf32/fp32) tensor rate for known GPUs. On a CPU there is
no honest spec figure, so it is measured: the best rate of a large GEMM in the same dtype on this
machine, once per process. CPU MFU is therefore "fraction of what this machine's BLAS reaches".
"""

from __future__ import annotations

import functools
import time

import torch

from models.llama4 import ModelConfig

# Dense (not sparse) tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
_GPU_PEAKS = {
    "H200": {torch.bfloat16: 989.4e12, torch.float32: 494.7e12},
    "H100": {torch.bfloat16: 989.4e12, torch.float32: 494.7e12},  # SXM; PCIe is lower (756e12)
    "A100": {torch.bfloat16: 312e12, torch.float32: 156e12},
    "L40S": {torch.bfloat16: 362e12, torch.float32: 183e12},
}


def matmul_params_per_token(c: ModelConfig) -> int:
    """Weights each token multiplies by in one forward (MoE: only its routed experts)."""
    D, H, K, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n = D * (H + 2 * K) * d + H * d * D  # qkv + o
    total = c.vocab_size * D  # the output head
    for i in range(c.num_hidden_layers):
        total += n
        if c.layer_is_moe(i):
            total += D * c.num_local_experts + 3 * D * c.intermediate_size * (1 + c.num_experts_per_tok)
        else:
            total += 3 * D * c.mlp_width(i)
    return total


def _visible_pairs(n: int, chunk: int | None) -> int:
    """(query, key) pairs of causal attention over n tokens, restricted to chunks of `chunk`."""
    if chunk is None or chunk >= n:
        return n * (n + 1) // 2
    full, rest = divmod(n, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def train_flops(c: ModelConfig, seq_lens: list[int]) -> float:
    """Forward + backward FLOPs of one micro-batch whose documents have these lengths."""
    tokens = sum(seq_lens)
    dense = 6.0 * matmul_params_per_token(c) * tokens
    attn = 0.0
    for i in range(c.num_hidden_layers):
        pairs = sum(_visible_pairs(n, c.layer_chunk_size(i)) for n in seq_lens)
        attn += 2 * 2 * c.num_attention_heads * c.head_dim * pairs  # QK^T and PV
    return dense + 3 * attn


@functools.cache
def measured_peak_flops(device_type: str, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device_type)
    b = torch.randn(n, n, dtype=dtype, device=device_type)
    best = float("inf")
    for _ in range(4):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s of one device, where the figure comes from)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "output.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAKS.items():
            if key in name:
                return peaks.get(dtype, peaks[torch.float32]), f"{name} spec sheet"
        return measured_peak_flops("cuda", dtype), f"{name}: measured GEMM"
    return measured_peak_flops("cpu", dtype), "measured CPU GEMM"
