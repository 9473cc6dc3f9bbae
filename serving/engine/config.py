"""Engine settings, with vLLM's names where vLLM has the same knob."""

from __future__ import annotations

from dataclasses import dataclass

KV_CACHE_DTYPES = ("auto", "bfloat16", "float32")


def default_compile(device: str, compile: bool | None) -> bool:
    """Whether to compile the decode step when the user did not say (None): yes on CPU, as vLLM
    compiles by default; not yet on CUDA, where compiling means capturing CUDA graphs
    (cuda_graphs.py), which no GPU has run so far."""
    return device == "cpu" if compile is None else compile


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint dir or .gguf; None = the built-in default model
    dtype: str = "auto"
    quantization: str | None = None  # "int4": weight-only 4-bit on CPU (models/llama4/quantize.py)
    device: str = "cpu"
    served_model_name: str | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped below
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # Fraction of the device's memory the engine may fill in all (weights, activations, KV);
    # the KV cache gets what a profiled step leaves of it.
    memory_utilization: float = 0.5
    num_kv_blocks: int | None = None  # fixed KV size (tests force preemption with a tiny cache)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    compile: bool = False  # compile the decode step: CUDA graphs on GPU; on CPU torch.compile or the C++ step
    # herd's C++ decode step (serving/engine/native_decode.py) where the model allows it, when
    # compiling; False keeps torch.compile for every model.
    native_decode: bool = True
    # bfloat16 models on CPU: GEMMs of many rows from float32 copies of the weights
    # (serving/engine/cpu_gemm.py; faster, for the weights' memory again in float32).
    # None: only where the CPU has no bfloat16 arithmetic.
    float32_gemms: bool | None = None
    # What the KV cache holds: "auto" (the model's activation dtype) or "bfloat16" / "float32"
    # (bfloat16 halves the cache of a float32 or int4 model; keys and values round as stored).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization: must be in (0, 1], got {self.memory_utilization}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
