"""Typed model config for Llama 4 text and dense Llama, built from HF `config.json` names."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import CheckpointError

# Architectures whose text model this class runs, and whether they are Llama 4.
_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "Llama4ForCausalLM": True,
    "Llama4ForConditionalGeneration": True,
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "llama4_text": "Llama4ForCausalLM",
                "llama4": "Llama4ForConditionalGeneration"}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs; Llama 4 features are off for dense Llama."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Llama) / expert and shared-expert width (Llama 4)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    # Dense Llama rotates halves (q/k rows permuted by HF's converter); Llama 4 rotates
    # interleaved pairs, as the released reference code does.
    rope_interleaved: bool = False
    # Llama 4 only.
    is_llama4: bool = False
    intermediate_size_mlp: int = 0  # width of the dense layers between MoE layers
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_layers: tuple[int, ...] = ()
    use_rope: tuple[bool, ...] = ()  # per layer; False = NoPE layer (global attention)
    chunked: tuple[bool, ...] = ()  # per layer; True = attends inside attention_chunk_size
    attention_chunk_size: int | None = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Weights live under this prefix (language_model. for the multimodal checkpoints) and
    # checkpoint tensors under these prefixes are known but not loaded (the vision tower).
    weight_prefix: str = ""
    ignored_prefixes: tuple[str, ...] = ()
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise CheckpointError(f"config.json: invalid {name}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads "
             f"{self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        n = self.num_hidden_layers
        if self.is_llama4:
            need(len(self.use_rope) == n, "no_rope_layers",
                 f"has {len(self.use_rope)} entries for {n} layers")
            need(len(self.chunked) == n, "layer_types", f"has {len(self.chunked)} entries for {n} layers")
            need(all(0 <= i < n for i in self.moe_layers), "moe_layers",
                 f"{list(self.moe_layers)} out of range for {n} layers")
            if self.moe_layers:
                need(self.num_local_experts > 0, "num_local_experts", "must be > 0")
                need(0 < self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
                     f"{self.num_experts_per_tok} not in 1..{self.num_local_experts}")
            if any(self.chunked):
                need((self.attention_chunk_size or 0) > 0, "attention_chunk_size",
                     "must be > 0 when layers use chunked attention")
            need(len(self.moe_layers) == n or self.intermediate_size_mlp > 0,
                 "intermediate_size_mlp", "must be > 0 when some layers are dense")
            need(self.floor_scale > 0, "floor_scale", "must be > 0")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def layer_is_moe(self, i: int) -> bool:
        return i in self.moe_layers

    def layer_uses_rope(self, i: int) -> bool:
        return self.use_rope[i] if self.is_llama4 else True

    def layer_chunk_size(self, i: int) -> int | None:
        """Tokens attend only inside blocks of this many positions (None: whole sequence)."""
        return self.attention_chunk_size if self.is_llama4 and self.chunked[i] else None

    def mlp_width(self, i: int) -> int:
        return self.intermediate_size_mlp if self.is_llama4 else self.intermediate_size

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{file}: no config.json in the checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=str(file))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        try:
            return _from_hf(raw)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("config.json", source, 1)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: missing or invalid field {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json this config was read from (the training export writes it back)."""
        return dict(self.hf_config)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    known = [a for a in archs if a in _ARCHITECTURES]
    if known:
        return known[0]
    if not archs and raw.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[raw["model_type"]]
    name = archs[0] if archs else f"model_type {raw.get('model_type')!r}"
    raise CheckpointError(
        f"config.json: unsupported architecture {name}; herd runs "
        f"{', '.join(_ARCHITECTURES)}")


def _rope(text: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_parameters; released checkpoints have rope_theta + rope_scaling.
    params = dict(text.get("rope_parameters") or {})
    scaling = text.get("rope_scaling") or params
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"config.json: unsupported rope_scaling type {kind!r} (llama3 or none)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _eos_ids(*sources: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for s in sources:
        for i in s if isinstance(s, list) else [s]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def _from_hf(raw: dict[str, Any]) -> ModelConfig:
    arch = _architecture(raw)
    is_llama4 = _ARCHITECTURES[arch]
    multimodal = arch == "Llama4ForConditionalGeneration"
    text = raw["text_config"] if multimodal else raw
    n = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    theta, scaling = _rope(text)
    common = dict(
        architecture=arch,
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate_size=int(text["intermediate_size"]),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        bos_token_id=text.get("bos_token_id"),
        eos_token_ids=_eos_ids(text.get("eos_token_id"), raw.get("eos_token_id")),
        hf_config=raw,
    )
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: unsupported hidden_act {text['hidden_act']!r} (silu)")
    if text.get("attention_bias") or text.get("mlp_bias"):
        raise CheckpointError("config.json: attention_bias/mlp_bias are not supported")
    if not is_llama4:
        return ModelConfig(**common)

    # Llama 4: no_rope_layers[i] == 1 means layer i USES RoPE (and chunked attention).
    interval = int(text.get("no_rope_layer_interval", 4))
    use_rope = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    chunk = text.get("attention_chunk_size")
    layer_types = text.get("layer_types") or [
        "chunked_attention" if r and chunk is not None else "full_attention" for r in use_rope]
    bad = [t for t in layer_types if t not in ("chunked_attention", "full_attention")]
    if bad:
        raise CheckpointError(f"config.json: unsupported layer_types entry {bad[0]!r}")
    step = int(text.get("interleave_moe_layer_step", 1))
    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n, step)) if step > 0 else []
    return ModelConfig(
        **common,
        rope_interleaved=True,
        is_llama4=True,
        intermediate_size_mlp=int(text.get("intermediate_size_mlp", 0)),
        num_local_experts=int(text.get("num_local_experts", 0)),
        num_experts_per_tok=int(text.get("num_experts_per_tok", 1)),
        moe_layers=tuple(int(i) for i in moe_layers),
        use_rope=tuple(bool(r) for r in use_rope),
        chunked=tuple(t == "chunked_attention" for t in layer_types),
        attention_chunk_size=int(chunk) if chunk is not None else None,
        use_qk_norm=bool(text.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
        floor_scale=float(text.get("floor_scale", 8192)),
        attn_scale=float(text.get("attn_scale", 0.1)),
        weight_prefix="language_model." if multimodal else "",
        ignored_prefixes=("vision_model.", "multi_modal_projector.") if multimodal else (),
    )
