"""The model a run trains: a new one from HF config fields (initialised here) or a checkpoint.

A new model's config.json is written out in full (every Llama 4 layer fact explicit: which layers
are MoE, use RoPE, attend in chunks), so that herd and transformers read the same model from the
export whatever their defaults.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from models.errors import CheckpointError
from models.llama4 import Llama4Model, ModelConfig, load_model
from models.llama4.loader import load_tokenizer
from models.llama4.tokenizer import Tokenizer
from training.config import ConfigError, ModelSection

_ARCHS = {"Llama4ForCausalLM": "llama4_text", "LlamaForCausalLM": "llama"}


def resolve_checkpoint(name: str) -> Path:
    if name == "default":
        from models.default import default_model_path

        return default_model_path()
    return Path(name)


def load_training_tokenizer(name: str) -> Tokenizer:
    """"default", builtin:stdlib-bpe (trained once into the cache), or a tokenizer directory / GGUF."""
    from training.bpe import NAME, materialise_tokenizer

    try:
        return load_tokenizer(materialise_tokenizer(name) if name == NAME else resolve_checkpoint(name))
    except CheckpointError as e:
        raise ConfigError(f"model.tokenizer: {e}") from None


def complete_hf_config(fields: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """The full config.json of a new model: `fields` plus every default made explicit."""
    raw = dict(fields)
    archs = raw.setdefault("architectures", ["Llama4ForCausalLM"])
    if not (isinstance(archs, list) and len(archs) == 1 and archs[0] in _ARCHS):
        raise ConfigError(f"model.config.architectures: must be [Llama4ForCausalLM] or [LlamaForCausalLM], "
                          f"got {archs!r}")
    llama4 = archs[0] == "Llama4ForCausalLM"
    raw.setdefault("model_type", _ARCHS[archs[0]])
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(raw.get(name), int):
            raise ConfigError(f"model.config.{name}: required (an integer)")
    raw.setdefault("vocab_size", tokenizer.vocab_size)
    if raw["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(f"model.config.vocab_size: {raw['vocab_size']} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    n, heads = raw["num_hidden_layers"], raw["num_attention_heads"]
    raw.setdefault("num_key_value_heads", heads)
    raw.setdefault("head_dim", raw["hidden_size"] // heads)
    raw.setdefault("hidden_act", "silu")
    raw.setdefault("attention_bias", False)
    raw.setdefault("rms_norm_eps", 1e-5)
    raw.setdefault("max_position_embeddings", 4096)
    raw.setdefault("tie_word_embeddings", False)
    raw.setdefault("initializer_range", 0.02)
    if "rope_parameters" not in raw:
        theta = float(raw.pop("rope_theta", 500000.0))
        scaling = raw.pop("rope_scaling", None)
        raw["rope_parameters"] = {**scaling, "rope_theta": theta} if scaling else {
            "rope_type": "default", "rope_theta": theta}
    if tokenizer.bos_token_id is not None:
        raw.setdefault("bos_token_id", tokenizer.bos_token_id)
    if tokenizer.stop_token_ids:
        stops = sorted(tokenizer.stop_token_ids)
        raw.setdefault("eos_token_id", stops[0] if len(stops) == 1 else stops)
    if tokenizer.pad_token_id is not None:
        raw.setdefault("pad_token_id", tokenizer.pad_token_id)
    if llama4:
        step = raw.setdefault("interleave_moe_layer_step", 1)
        raw.setdefault("moe_layers", list(range(step - 1, n, step)) if step > 0 else [])
        raw.setdefault("num_experts_per_tok", 1)
        if not raw["moe_layers"]:
            raw.setdefault("num_local_experts", 0)
        interval = raw.setdefault("no_rope_layer_interval", 4)
        raw.setdefault("no_rope_layers", [int((i + 1) % interval != 0) for i in range(n)])
        chunk = raw.setdefault("attention_chunk_size", 8192)
        raw.setdefault("layer_types", ["chunked_attention" if r and chunk else "full_attention"
                                       for r in raw["no_rope_layers"]])
        raw.setdefault("use_qk_norm", True)
        raw.setdefault("attn_temperature_tuning", True)
        raw.setdefault("floor_scale", 8192)
        raw.setdefault("attn_scale", 0.1)
        raw.setdefault("output_router_logits", False)
        raw.setdefault("router_aux_loss_coef", 0.001)
        raw.setdefault("router_jitter_noise", 0.0)
    else:
        raw.setdefault("mlp_bias", False)
    return raw


def model_config_from_fields(fields: dict[str, Any], tokenizer: Tokenizer) -> ModelConfig:
    raw = complete_hf_config(fields, tokenizer)
    try:
        return ModelConfig.from_hf_dict(raw, source="model.config")
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def _param_seed(seed: int, name: str) -> int:
    # Per-parameter seeds make the initial weights independent of creation order and of how the
    # parameters are later sharded: every layout starts from the same numbers.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def initial_value(name: str, shape: torch.Size, config: ModelConfig, std: float, seed: int) -> torch.Tensor:
    """The float32 initial value of parameter `name` (computed on the CPU, so the same everywhere)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_param_seed(seed, name))
    # Projections that write into the residual stream start smaller, as in GPT-2: the stream's
    # variance then stays put as layers are added.
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts_down")):
        std = std / (2 * config.num_hidden_layers) ** 0.5
    return torch.randn(shape, generator=g) * std


@torch.no_grad()
def init_weights(model: Llama4Model, std: float, seed: int) -> None:
    """Fills every parameter with its initial value. A parallelized model (DTensor parameters,
    fused ones re-laid for tensor parallelism) takes the full values through
    training.parallelize.load_full_state_dict, which needs them all at once on every rank."""
    params = dict(model.named_parameters())
    if any(hasattr(p, "device_mesh") for p in params.values()):
        from training.parallelize import load_full_state_dict

        load_full_state_dict(model, {name: initial_value(name, p.shape, model.config, std, seed)
                                     for name, p in params.items()})
        return
    for name, param in params.items():
        param.copy_(initial_value(name, param.shape, model.config, std, seed))


def new_model_on_meta(config: ModelConfig) -> Llama4Model:
    with torch.device("meta"):
        return Llama4Model(config)


def materialise(model: Llama4Model, device: torch.device, std: float, seed: int) -> Llama4Model:
    """Allocates a meta model (possibly already sharded) on `device` and initialises it."""
    model.to_empty(device=device)
    model.inv_freq = Llama4Model.rope_frequencies(model.config).to(device)
    init_weights(model, std, seed)
    return model


def load_checkpoint_model(section: ModelSection, device: torch.device) -> tuple[Llama4Model, Tokenizer]:
    """A checkpoint to fine-tune, in float32 (the master weights) on `device`."""
    try:
        loaded = load_model(resolve_checkpoint(section.checkpoint), dtype="float32", device=str(device))
    except CheckpointError as e:
        raise ConfigError(f"model.checkpoint: {e}") from None
    if loaded.tokenizer is None:
        raise ConfigError(f"model.checkpoint: {section.checkpoint} has no tokenizer")
    return loaded.model.train(), loaded.tokenizer
