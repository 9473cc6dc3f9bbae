"""The trained model as an HF directory: config.json + safetensors + tokenizer files
(+ generation_config.json): what `herd serve --model DIR` and transformers both load.

Under FSDP2/TP the full weights are gathered first, in the checkpoint's layout (tensor
parallelism re-lays fused parameters; training.parallelize undoes that): a collective, every rank
calls this; rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.llama4 import Llama4Model, save_pretrained
from models.llama4.tokenizer import Tokenizer
from training.distributed import DistContext


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Plain full CPU tensors in the checkpoint's layout (rank 0's; a collective when distributed)."""
    if not ctx.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from training.parallelize import full_state_dict as gather

    return gather(model, rank0_only=True)


def export_hf(model: nn.Module, tokenizer: Tokenizer, out_dir: Path, ctx: DistContext,
              dtype: torch.dtype = torch.float32) -> Path | None:
    """Writes out_dir on rank 0 (returns it there, None elsewhere)."""
    state = full_state_dict(model, ctx)
    if ctx.is_main:
        config = model.config
        with torch.device("meta"):
            plain = Llama4Model(config)
        plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        save_pretrained(plain, out_dir, tokenizer)
        generation = {"bos_token_id": config.bos_token_id,
                      "eos_token_id": sorted(tokenizer.stop_token_ids) or config.eos_token_ids or None,
                      "pad_token_id": tokenizer.pad_token_id}
        (out_dir / "generation_config.json").write_text(
            json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2))
    ctx.barrier()
    return out_dir if ctx.is_main else None
