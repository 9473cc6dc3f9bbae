"""Data (FSDP2) and tensor parallelism for training, applied to a plain Llama4Model from outside.

The process grid is a 2-D device mesh ("dp", "tp"): tensor parallelism shards every layer over
"tp" (training.tensor_parallel), then FSDP2 shards every parameter, TP-sharded or not, over "dp",
one unit per DecoderLayer and one for the rest (embeddings, final norm, head). Parameters keep
their names; `full_state_dict` and `load_full_state_dict` move between the parallelized model and
plain full tensors in the checkpoint's (unsharded, fused) layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from models.llama4.model import Llama4Model
from training.tensor_parallel import apply_tensor_parallel
from training.tp_plan import Split, from_rank_major, to_rank_major, tp_splits


def build_mesh(dp: int, tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The (dp, tp) mesh over the initialised default process group; tp ranks are adjacent."""
    if dp < 1 or tp < 1:
        raise ValueError(f"build_mesh: dp = {dp} and tp = {tp} must both be >= 1")
    if not dist.is_initialized():
        raise RuntimeError("build_mesh: initialise the process group first (torch.distributed.init_process_group)")
    if dist.get_world_size() != dp * tp:
        raise ValueError(f"build_mesh: dp * tp = {dp} * {tp} != world size {dist.get_world_size()}")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model: Llama4Model, mesh: DeviceMesh, *, fsdp: bool, tp: bool,
                mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True) -> Llama4Model:
    """Tensor parallel over mesh["tp"], then FSDP2 over mesh["dp"]; in place, returns `model`.

    Every rank must hold the same weights (or all be on meta: then fill them afterwards with
    `load_full_state_dict`). FSDP2 averages gradients over dp, so with per-rank mean losses the
    result is the whole batch's mean only if every rank counts the same number of tokens.
    reshard_after_forward applies to the DecoderLayers (the root never reshards after forward).
    """
    if mesh.mesh_dim_names != ("dp", "tp"):
        raise ValueError(f"parallelize: mesh dims are {mesh.mesh_dim_names}, expected ('dp', 'tp') "
                         "(see build_mesh)")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("parallelize: the model is already parallelized")
    dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]
    if dp_mesh.size() > 1 and not fsdp:
        raise ValueError(f"parallelize: mesh dp = {dp_mesh.size()} needs fsdp=True (gradients are only "
                         "synchronised across dp by FSDP2)")
    if tp_mesh.size() > 1 and not tp:
        raise ValueError(f"parallelize: mesh tp = {tp_mesh.size()} needs tp=True")
    if tp and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh)
    if fsdp:
        mp_policy = mp_policy or MixedPrecisionPolicy()
        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
        # The root stays gathered after forward: the loss reads the head (or tied embedding) weight
        # outside the model's forward, and backward needs it at once anyway.
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp_policy)
    return model


def _tp_degree(p: DTensor) -> int:
    """How many tp ranks split this parameter (1 if none)."""
    names = p.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return 1
    i = names.index("tp")
    return 1 if p.placements[i].is_replicate() else p.device_mesh.size(i)


def gather_full(model: Llama4Model, tensors: dict[str, torch.Tensor], *,
                rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Plain full CPU tensors from tensors named and laid out like the parallelized model's
    parameters (the parameters themselves, their gradients, optimizer moments): gathered across
    the ranks and re-laid from rank-major to the checkpoint's layout.

    A collective: every rank must call it. With rank0_only the other ranks get {} (and keep at
    most one gathered tensor at a time).
    """
    splits = tp_splits(model.config)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            tp = _tp_degree(t)
            t = t.full_tensor()
            if name in splits and tp > 1:
                t = from_rank_major(t, splits[name], tp)
        if rank0 or not rank0_only:
            out[name] = t.detach().to("cpu", copy=True)
    return out


def full_state_dict(model: Llama4Model, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The unparallelized model's state dict (same names, fused qkv / gate-up in the layout the
    weights table expects) as plain full CPU tensors, e.g. for export. A collective, as gather_full."""
    return gather_full(model, model.state_dict(), rank0_only=rank0_only)


def _local_shard(full: torch.Tensor, like: DTensor, split: Split | None) -> torch.Tensor:
    tp = _tp_degree(like)
    if split is not None and tp > 1:
        full = to_rank_major(full, split, tp)
    full = full.to(device=like.device, dtype=like.dtype)
    # Every rank holds the full tensor, so each cuts its own shard: no communication.
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def load_full_state_dict(model: Llama4Model, state_dict: dict[str, torch.Tensor]) -> None:
    """Copies full tensors (full_state_dict's names and layout, on every rank) into a parallelized
    model, e.g. one parallelized on meta and then `to_empty`'d. Missing or extra names, or a shape
    that differs, raise ValueError naming the tensor."""
    splits = tp_splits(model.config)
    own = model.state_dict()
    unknown = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    if unknown or missing:
        raise ValueError(f"load_full_state_dict: unexpected tensor {unknown[0]}" if unknown
                         else f"load_full_state_dict: missing tensor {missing[0]}")
    with torch.no_grad():
        for name, t in own.items():
            full = state_dict[name]
            if tuple(full.shape) != tuple(t.shape):
                raise ValueError(f"load_full_state_dict: tensor {name} has shape {list(full.shape)}, "
                                 f"expected {list(t.shape)}")
            if isinstance(t, DTensor):
                t.to_local().copy_(_local_shard(full, t, splits.get(name)))
            else:
                t.copy_(full)
