"""Size the KV cache by measurement: profile the largest step, then carve what memory is left."""

from __future__ import annotations

import threading
import time

import torch

from models.llama4.attention import DenseAttention
from models.llama4.model import Llama4Model
from serving.engine.config import EngineConfig
from serving.engine.model_runner import kv_block_bytes, kv_cache_dtype


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {key}")


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@torch.inference_mode()
def profile_step_bytes(model: Llama4Model, num_tokens: int) -> int:
    """Peak extra memory of a forward over num_tokens prompt tokens (plus their logits)."""
    dev = next(model.parameters()).device
    ids = torch.zeros(num_tokens, dtype=torch.long, device=dev)
    pos = torch.arange(num_tokens, device=dev)

    def run() -> None:
        model.compute_logits(model(ids, pos, DenseAttention([num_tokens], pos))[-256:])

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    base, peak, done = _rss_anon_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run()
    done.set()
    t.join()
    return max(0, peak[0] - base)


def plan_kv_blocks(model: Llama4Model, config: EngineConfig, max_model_len: int) -> int:
    """Blocks that fit in memory_utilization of the device after weights and one profiled step,
    capped at what max_num_seqs full-length sequences could use."""
    block_bytes = kv_block_bytes(model, config.block_size, kv_cache_dtype(model, config.kv_cache_dtype))
    blocks_per_seq = -(-max_model_len // config.block_size)
    if config.num_kv_blocks is not None:
        if config.num_kv_blocks < blocks_per_seq:
            raise ValueError(f"num_kv_blocks: {config.num_kv_blocks} blocks of {config.block_size} "
                             f"cannot hold one sequence of max_model_len {max_model_len}")
        return config.num_kv_blocks
    activation = profile_step_bytes(model, min(config.max_num_batched_tokens, max_model_len))
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        used = total - free
    else:
        total = _meminfo_bytes("MemTotal")
        used = _rss_anon_bytes()
    budget = total * config.memory_utilization - used - activation
    num = int(budget // block_bytes)
    if num < blocks_per_seq:
        raise ValueError(
            f"memory_utilization: {config.memory_utilization} of {total / 2**30:.1f} GiB leaves room "
            f"for {max(num, 0)} KV blocks after the weights and a profiled step "
            f"({activation / 2**20:.0f} MiB), fewer than one sequence of max_model_len "
            f"{max_model_len} needs ({blocks_per_seq}); raise it or lower max_model_len")
    return min(num, config.max_num_seqs * blocks_per_seq)
