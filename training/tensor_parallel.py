"""Tensor parallelism for training, applied to a Llama4Model from outside (DESIGN.md rule 2).

Megatron layout over the tp mesh: qkv_proj and gate_up_proj column-parallel, o_proj and down_proj
row-parallel (one all-reduce each); the routed experts split inside every expert along its width
I (each rank holds I/tp columns of all E experts), with the shared expert the same way, so a MoE
layer needs one all-reduce for both. Split parameters become DTensors sharded on the tp mesh
(fused ones re-laid rank-major, see tp_plan); the rest (embeddings, norms, router, head) become
DTensors replicated on it, whose modules compute on the local copy (the kernels take plain
tensors). So every parameter is a DTensor on one mesh, which is what clip_grad_norm_, foreach and
fused optimizers, FSDP2 on top and distributed checkpoints expect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from kernels import moe_experts, moe_route, rms_norm, silu_and_mul
from models.llama4.model import Llama4Model, MoE, RMSNorm
from training.tp_plan import check_divisible, to_rank_major, tp_splits


def _partial_grad(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward sums the per-rank (partial) gradients across the tp ranks."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _sum_over_ranks(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """All-reduce forward; backward passes the (replicated) gradient through."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


class TensorParallelMoE(MoE):
    """A MoE whose experts and shared expert hold I/tp columns each (set by `_shard_moe`).

    Routing is MoE.forward's, on the replicated input; keep the two in step (the tp tests compare
    this against one process).
    """

    tp_mesh: DeviceMesh

    def forward(self, x_TD):
        scores_TK, top_ids_TK = moe_route(self.router(x_TD), self.top_k)
        # Past this point a rank sees only its columns: the gradients it makes for x and for the
        # scores (hence the router) are partial sums.
        x_TD = _partial_grad(x_TD, self.tp_mesh)
        scores_TK = _partial_grad(scores_TK, self.tp_mesh)
        shared = self.shared_expert
        h_TI = silu_and_mul(F.linear(x_TD, shared.gate_up_proj.weight.to_local()))
        shared_TD = F.linear(h_TI, shared.down_proj.weight.to_local())  # this rank's partial sum
        y_TD = moe_experts(x_TD, top_ids_TK, scores_TK, self.experts_gate_up.to_local(),
                           self.experts_down.to_local(), shared_TD=shared_TD)
        return _sum_over_ranks(y_TD, self.tp_mesh)


class _ReplicatedRMSNorm(RMSNorm):
    def forward(self, x, residual=None):
        return rms_norm(x, self.weight.to_local(), self.eps, residual)


class _ReplicatedLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to_local())


class _ReplicatedEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight.to_local(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


_REPLICATED = {RMSNorm: _ReplicatedRMSNorm, nn.Linear: _ReplicatedLinear, nn.Embedding: _ReplicatedEmbedding}


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:
    p = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement]),
                                                 requires_grad=p.requires_grad))


def _replicate_rest(model: Llama4Model, mesh: DeviceMesh) -> None:
    """Every parameter not yet a DTensor becomes a replicated one; its module computes on the
    local copy (a module kind not listed here would compute on DTensors: an error, not a guess)."""
    for name, module in model.named_modules():
        plain = [n for n, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if not plain:
            continue
        kind = _REPLICATED.get(type(module))
        if kind is None or getattr(module, "bias", None) is not None:
            raise TypeError(f"tensor parallel: no replicated form for {name or 'the model'} "
                            f"({type(module).__name__} with parameters {plain})")
        for n in plain:
            _distribute(module, n, mesh, Replicate())
        module.__class__ = kind


def _shard_moe(moe: MoE, mesh: DeviceMesh) -> None:
    _distribute(moe, "experts_gate_up", mesh, Shard(2))  # (E, D, 2I)
    _distribute(moe, "experts_down", mesh, Shard(1))  # (E, I, D)
    _distribute(moe.shared_expert.gate_up_proj, "weight", mesh, Shard(0))
    _distribute(moe.shared_expert.down_proj, "weight", mesh, Shard(1))
    moe.__class__ = TensorParallelMoE
    moe.tp_mesh = mesh


def apply_tensor_parallel(model: Llama4Model, mesh: DeviceMesh) -> None:
    """Shards `model` in place over the 1-D tp `mesh`. Every rank holds the full model (or all are
    on meta); tp rank 0's values are the ones kept (scattered and broadcast from it). Head counts
    and split sizes of each module become the per-rank ones."""
    tp = mesh.size()
    check_divisible(model.config, tp)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, split in tp_splits(model.config).items():
            if len(split.parts) > 1:
                params[name].copy_(to_rank_major(params[name], split, tp))
    for layer in model.layers:
        attn = layer.self_attn
        parallelize_module(attn, mesh, {"qkv_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        attn.n_heads //= tp
        attn.n_kv //= tp
        attn.split = tuple(s // tp for s in attn.split)
        if isinstance(layer.feed_forward, MoE):
            _shard_moe(layer.feed_forward, mesh)
        else:
            parallelize_module(layer.feed_forward, mesh,
                               {"gate_up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
    _replicate_rest(model, mesh)
