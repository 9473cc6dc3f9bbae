"""Which parameters of a Llama4Model tensor parallelism splits, along which dim, and how fused ones re-lay.

A fused parameter (qkv_proj: q, k, v rows; gate_up_proj: gate, up rows; experts_gate_up: gate, up
columns) cannot be split in plain contiguous chunks: rank 0 would get all of q and rank 1 all of v.
So before it is sharded it is re-laid "rank-major": the tp contiguous chunks along the split dim
each hold that rank's share of every part, in the part order the module splits its output by
(q, k, v / gate, up). Each rank's local shard is then exactly what the module would hold for a
model with 1/tp of the heads or width, and `from_rank_major` restores the checkpoint layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.llama4.config import ModelConfig


@dataclass(frozen=True)
class Split:
    """A parameter split over the tp ranks along `dim`, whose parts along that dim (one part for a
    plain split) are each divided evenly among the ranks."""

    dim: int
    parts: tuple[int, ...]


def check_divisible(config: ModelConfig, tp: int) -> None:
    """Raises ValueError naming the config field that does not split over tp ranks."""
    fields = ["num_attention_heads", "num_key_value_heads"]
    if config.is_llama4:
        if config.moe_layers:
            fields.append("intermediate_size")  # routed experts and the shared expert
        if len(config.moe_layers) < config.num_hidden_layers:
            fields.append("intermediate_size_mlp")
    else:
        fields.append("intermediate_size")
    for name in fields:
        value = getattr(config, name)
        if value % tp:
            raise ValueError(f"tensor parallel: config {name} = {value} is not divisible by tp = {tp}")


def tp_splits(config: ModelConfig) -> dict[str, Split]:
    """Parameter name -> its Split; parameters not named (embeddings, norms, router) are replicated."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    splits: dict[str, Split] = {}
    for i in range(config.num_hidden_layers):
        pre = f"layers.{i}"
        splits[f"{pre}.self_attn.qkv_proj.weight"] = Split(0, (q, kv, kv))
        splits[f"{pre}.self_attn.o_proj.weight"] = Split(1, (q,))
        if config.layer_is_moe(i):
            width = config.intermediate_size
            ff = f"{pre}.feed_forward"
            splits[f"{ff}.experts_gate_up"] = Split(2, (width, width))  # (E, D, 2I)
            splits[f"{ff}.experts_down"] = Split(1, (width,))  # (E, I, D)
            mlp = f"{ff}.shared_expert"
        else:
            width = config.mlp_width(i)
            mlp = f"{pre}.feed_forward"
        splits[f"{mlp}.gate_up_proj.weight"] = Split(0, (width, width))
        splits[f"{mlp}.down_proj.weight"] = Split(1, (width,))
    return splits


def to_rank_major(x: torch.Tensor, split: Split, tp: int) -> torch.Tensor:
    """Checkpoint layout -> rank-major layout (a new tensor; a plain split is returned as is)."""
    if len(split.parts) == 1:
        return x
    chunks = [part.chunk(tp, split.dim) for part in x.split(split.parts, split.dim)]
    return torch.cat([c[r] for r in range(tp) for c in chunks], split.dim)


def from_rank_major(x: torch.Tensor, split: Split, tp: int) -> torch.Tensor:
    """Rank-major layout (the full tensor gathered from the ranks) -> checkpoint layout."""
    if len(split.parts) == 1:
        return x
    local = [p // tp for p in split.parts]
    per_rank = [shard.split(local, split.dim) for shard in x.chunk(tp, split.dim)]
    return torch.cat([shard[j] for j in range(len(local)) for shard in per_rank], split.dim)
