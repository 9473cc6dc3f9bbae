"""Tensor parallelism applied to a Llama4Model from outside the model (DESIGN.md rule 2).

`shard_model(model, rank, world)` runs on a model built on `meta`: it resizes every layer to
rank `rank`'s share, swaps in the communicating forms, and returns the ShardPlan that tells the
loader which slice of each checkpoint tensor this rank reads (so a rank reads only its shard).
The layout, for rank r of T:

- Attention: the KV heads are dealt out in whole GQA groups, as evenly as they go (a rank's
  query heads are the groups of its KV heads, so the group size stays the same everywhere).
  With fewer KV heads than ranks, each KV head is replicated on T/K ranks, which split its
  group's query heads. qkv is column-parallel; o_proj row-parallel, then all-reduce.
- Dense MLP and the MoE shared expert: gate/up column-parallel, down row-parallel.
- Routed experts: expert-parallel, rank r holds experts [r E/T, (r+1) E/T); the router is
  replicated; the routed and shared-expert partial sums share one all-reduce. (Llama 4 routes
  each token to one expert of 16 or 128: whole experts per rank keep each expert's GEMMs as
  large as they come, and move no more data than TP inside the experts would.)
- Embedding: vocab-parallel rows, all-reduce; the LM head (or the tied embedding) makes this
  rank's vocab slice of the logits, all-gathered.
- Norms, RoPE: replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels import moe_experts, moe_route
from models.llama4.model import MLP, Attention, Llama4Model, MoE


def split_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's share of n items, the first n % world ranks taking one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class ShardPlan:
    """param name -> (dim, [(start, stop) in each checkpoint source, in the table's order],
    full size of that dim). Parameters not named are read whole (replicated)."""
    rank: int
    world: int
    parts: dict[str, tuple[int, list[tuple[int, int]], int]] = field(default_factory=dict)


class RowParallelLinear(nn.Linear):
    """This rank's input columns; the partial products are summed across ranks."""

    def __init__(self, in_local: int, out_features: int, group) -> None:
        super().__init__(in_local, out_features, bias=False)
        self.group = group

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the vocabulary; other ranks fill the rest, summed across ranks."""

    def __init__(self, start: int, stop: int, dim: int, group) -> None:
        super().__init__(stop - start, dim)
        self.start, self.stop, self.group = start, stop, group

    def forward(self, ids):
        mine = (ids >= self.start) & (ids < self.stop)
        x = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        x = x * mine[..., None].to(x.dtype)
        dist.all_reduce(x, group=self.group)
        return x


class ExpertParallelMoE(MoE):
    """The routed experts this rank holds, plus its slice of the shared expert; one all-reduce."""

    def __init__(self, moe: MoE, first: int, num_local: int, group) -> None:
        nn.Module.__init__(self)
        D = moe.router.in_features
        I = moe.experts_down.shape[1]
        self.top_k, self.router, self.group = moe.top_k, moe.router, group
        self.first, self.num_local = first, num_local
        self.experts_gate_up = nn.Parameter(torch.empty(num_local, D, 2 * I))
        self.experts_down = nn.Parameter(torch.empty(num_local, I, D))
        self.shared_expert = moe.shared_expert  # sharded by the caller; its down_proj sums below

    def forward(self, x_TD):
        scores_TK, top_ids_TK = moe_route(self.router(x_TD), self.top_k)
        local_TK = top_ids_TK - self.first
        mine_TK = (local_TK >= 0) & (local_TK < self.num_local)
        # Another rank's expert: a zero score zeroes its input, so it adds nothing here.
        y_TD = moe_experts(x_TD, torch.where(mine_TK, local_TK, 0), scores_TK * mine_TK.to(scores_TK.dtype),
                           self.experts_gate_up, self.experts_down, shared_TD=self.shared_expert(x_TD))
        dist.all_reduce(y_TD, group=self.group)
        return y_TD


def _gathered_logits(model: Llama4Model, group, world: int):
    sizes = [b - a for a, b in (split_range(model.config.vocab_size, r, world) for r in range(world))]

    def compute_logits(hidden_TD):
        if model.lm_head is not None:
            local_TV = model.lm_head(hidden_TD)
        else:
            local_TV = hidden_TD @ model.embed_tokens.weight.T
        # all_gather wants equal sizes: pad the short slices, then trim them.
        padded = F.pad(local_TV, (0, max(sizes) - local_TV.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
    return compute_logits


def _attention_heads(n_heads: int, n_kv: int, rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query head range, KV head range) of this rank."""
    group = n_heads // n_kv
    if n_kv >= world:
        kv = split_range(n_kv, rank, world)
        return (kv[0] * group, kv[1] * group), kv
    if world % n_kv or group % (world // n_kv):
        raise ValueError(f"tensor_parallel_size: {world} ranks cannot share {n_kv} KV heads of "
                         f"{group} query heads each evenly")
    per_kv = world // n_kv
    kv = rank // per_kv
    q = split_range(group, rank % per_kv, per_kv)
    return (kv * group + q[0], kv * group + q[1]), (kv, kv + 1)


def _shard_attention(attn: Attention, name: str, rank: int, world: int, group, plan: ShardPlan) -> None:
    d = attn.head_dim
    (q0, q1), (k0, k1) = _attention_heads(attn.n_heads, attn.n_kv, rank, world)
    n_q = attn.n_heads
    attn.n_heads, attn.n_kv = q1 - q0, k1 - k0
    q, kv = attn.n_heads * d, attn.n_kv * d
    attn.split = (q, kv, kv)
    attn.qkv_proj = nn.Linear(attn.qkv_proj.in_features, q + 2 * kv, bias=False)
    attn.o_proj = RowParallelLinear(q, attn.o_proj.out_features, group)
    plan.parts[f"{name}.qkv_proj.weight"] = (0, [(q0 * d, q1 * d), (k0 * d, k1 * d), (k0 * d, k1 * d)], 0)
    plan.parts[f"{name}.o_proj.weight"] = (1, [(q0 * d, q1 * d)], n_q * d)


def _shard_mlp(mlp: MLP, name: str, rank: int, world: int, group, plan: ShardPlan, reduce: bool = True) -> None:
    width = mlp.down_proj.in_features
    hidden = mlp.down_proj.out_features
    a, b = split_range(width, rank, world)
    mlp.gate_up_proj = nn.Linear(hidden, 2 * (b - a), bias=False)
    mlp.down_proj = RowParallelLinear(b - a, hidden, group) if reduce else nn.Linear(b - a, hidden, bias=False)
    plan.parts[f"{name}.gate_up_proj.weight"] = (0, [(a, b), (a, b)], 0)
    plan.parts[f"{name}.down_proj.weight"] = (1, [(a, b)], width)


def shard_model(model: Llama4Model, rank: int, world: int, group=None) -> ShardPlan:
    """Makes `model` (on meta, weights not yet read) rank `rank`'s shard; returns what to read."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("shard_model: build the model on the meta device and shard it before loading")
    with torch.device("meta"):
        return _shard(model, rank, world, group)


def _shard(model: Llama4Model, rank: int, world: int, group) -> ShardPlan:
    plan = ShardPlan(rank, world)
    c = model.config
    model.tp_rank, model.tp_world = rank, world
    v0, v1 = split_range(c.vocab_size, rank, world)
    model.embed_tokens = VocabParallelEmbedding(v0, v1, c.hidden_size, group)
    plan.parts["embed_tokens.weight"] = (0, [(v0, v1)], 0)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(c.hidden_size, v1 - v0, bias=False)
        plan.parts["lm_head.weight"] = (0, [(v0, v1)], 0)
    model.compute_logits = _gathered_logits(model, group, world)
    for i, layer in enumerate(model.layers):
        _shard_attention(layer.self_attn, f"layers.{i}.self_attn", rank, world, group, plan)
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            E = ff.experts_gate_up.shape[0]
            if E % world:
                raise ValueError(f"tensor_parallel_size: {E} experts do not split over {world} ranks")
            e0, e1 = split_range(E, rank, world)
            layer.feed_forward = ExpertParallelMoE(ff, e0, e1 - e0, group)
            name = f"layers.{i}.feed_forward"
            plan.parts[f"{name}.experts_gate_up"] = (0, [(e0, e1)], 0)
            plan.parts[f"{name}.experts_down"] = (0, [(e0, e1)], 0)
            _shard_mlp(layer.feed_forward.shared_expert, f"{name}.shared_expert", rank, world, group, plan,
                       reduce=False)
        else:
            _shard_mlp(ff, f"layers.{i}.feed_forward", rank, world, group, plan)
    return plan
