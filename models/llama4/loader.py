"""Load a model from an HF checkpoint directory or a GGUF file; save one as HF safetensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.errors import CheckpointError
from models.llama4.config import ModelConfig
from models.llama4.model import Llama4Model
from models.llama4.safetensors_io import SafetensorsSource, write_safetensors
from models.llama4.weights import Parts, export_tensors, load_weights

if TYPE_CHECKING:
    from models.llama4.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: Llama4Model
    config: ModelConfig
    tokenizer: "Tokenizer | None"
    path: Path


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig | None = None) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (bfloat16 when it names none, e.g. GGUF)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        raw = config.hf_config if config else {}
        named = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype")
        return _DTYPES.get(str(named), torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def _tokenizer():
    from models.llama4.tokenizer import Tokenizer
    return Tokenizer


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if _is_gguf(path):
        from models.llama4.gguf import open_gguf
        return ModelConfig.from_hf_dict(open_gguf(path).config, source=str(path))
    return ModelConfig.from_pretrained(path)


def load_tokenizer(path: str | Path) -> "Tokenizer":
    """The tokenizer alone (e.g. for a gateway whose model runs elsewhere)."""
    path = Path(path)
    return _tokenizer().from_gguf(path) if _is_gguf(path) else _tokenizer().from_dir(path)


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
               tokenizer: bool = True, quantization: str | None = None,
               shard: Callable[[Llama4Model], Parts] | None = None) -> LoadedModel:
    """`quantization="int4"` (CPU): weights are read in float32 (so Q4_1 GGUF codes come back
    exactly), quantized, and the rest cast to `dtype`; peak memory is the float32 model. With
    int4, "auto" means float32 activations: 4-bit weights plus bf16 rounding flipped greedy
    choices on the default model where either alone did not.
    `shard` (e.g. a tensor-parallel rank's) reshapes the model while it is still on meta and
    returns which slices of the checkpoint tensors to read into it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory or GGUF file")
    if _is_gguf(path):
        from models.llama4.gguf import open_gguf
        ckpt = open_gguf(path)
        config = ModelConfig.from_hf_dict(ckpt.config, source=str(path))
        source = ckpt
        tok = load_tokenizer(path) if tokenizer else None
    elif path.is_dir():
        config = ModelConfig.from_pretrained(path)
        source = SafetensorsSource(path)
        tok = load_tokenizer(path) if tokenizer else None
    else:
        raise CheckpointError(f"{path}: expected a checkpoint directory or a .gguf file")
    # Build on `meta` and allocate once, so peak memory is one copy of the weights plus the
    # one tensor being read.
    with torch.device("meta"):
        model = Llama4Model(config)
    parts = shard(model) if shard is not None else None
    if parts is not None and quantization:
        raise ValueError("quantization: int4 does not combine with tensor parallelism yet")
    target = torch.float32 if quantization and dtype == "auto" else resolve_dtype(dtype, config)
    if quantization:
        model = _load_quantized(model, source, quantization, device).to(target)
    else:
        model = model.to(target).to_empty(device=device)
        load_weights(model, source, parts)
    model.inv_freq = Llama4Model.rope_frequencies(config).to(device)  # was built on meta
    model.eval()
    return LoadedModel(model=model, config=config, tokenizer=tok, path=path)


def _load_quantized(model: Llama4Model, source, method: str, device: str) -> Llama4Model:
    """Each layer that quantization replaces is read in float32 alone (so Q4_1 GGUF codes come
    back exactly) and quantized at once; the rest is allocated in float32 up front. Peak memory
    is the unquantized rest plus one layer, not the float32 model."""
    from models.llama4.quantize import check, quantize_tied_head, quantizers

    check(method, device)
    model = model.to(torch.float32)
    todo = quantizers(model)
    # Allocate everything but the layers in `todo`: take them out, allocate, put them back on meta.
    held = [getattr(r.parent, r.name) for r in todo.values()]
    for r in todo.values():
        setattr(r.parent, r.name, nn.Identity())
    model.to_empty(device=device)
    for r, layer in zip(todo.values(), held, strict=True):
        setattr(r.parent, r.name, layer)
    load_weights(model, source, take=lambda name, weight: todo[name].put(weight))
    quantize_tied_head(model, method)
    return model


def save_pretrained(model: Llama4Model, out_dir: str | Path, tokenizer: "Tokenizer | None" = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes config.json + safetensors (+ tokenizer files): what load_model and transformers read."""
    if model.quantization:
        raise ValueError(f"save_pretrained: the model is quantized ({model.quantization}); save the "
                         "float model (herd writes HF safetensors in float dtypes only)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf_dict()
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    write_safetensors(export_tensors(model), out, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
