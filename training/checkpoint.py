"""Sharded checkpoints for exact resume: model and AdamW state through torch.distributed.checkpoint
(each rank writes its own shards, whatever the FSDP2/TP layout), and per rank the rest of the
state (step, data position, RNG) in a small file beside them.

Layout: DIR/checkpoints/step_000100/{*.distcp, .metadata, train_state_rank0.pt, ..., COMPLETE}.
COMPLETE is written last, by rank 0 after every rank has finished, so a checkpoint cut short by
a crash is never resumed from.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from training.distributed import DistContext

_STEP_DIR = re.compile(r"^step_(\d+)$")


@contextlib.contextmanager
def _single_process_quietly(ctx: DistContext):
    # Without a process group DCP warns on every call that it assumes one process; that is the intent.
    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    found = []
    for d in (root / "checkpoints").glob("step_*"):
        m = _STEP_DIR.match(d.name)
        if m and (d / "COMPLETE").is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                    ctx: DistContext) -> Path:
    if ctx.is_main and path.exists():  # a leftover of a run that died while writing it
        shutil.rmtree(path)
    ctx.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quietly(ctx):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save({**train_state, "rng": rng_state(ctx.device)}, path / f"train_state_rank{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        (path / "COMPLETE").write_text("")
    ctx.barrier()
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """Restores model, optimiser and RNG in place; returns the saved train state (step, loader, ...)."""
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path}: not a complete checkpoint (no COMPLETE marker)")
    state_file = path / f"train_state_rank{ctx.rank}.pt"
    if not state_file.is_file():
        raise ValueError(f"{path}: no {state_file.name}; was it saved by a run with another process count?")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quietly(ctx):
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = torch.load(state_file, weights_only=False)
    set_rng_state(train_state.pop("rng"), ctx.device)
    return train_state
