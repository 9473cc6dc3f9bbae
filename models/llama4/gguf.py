"""llama.cpp GGUF files of dense Llama: HF config dict and HF-named, dequantized tensors, lazily."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderField, ReaderTensor

from models.errors import CheckpointError

Q = GGMLQuantizationType
_SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0)
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str | None:
    """The transformers LlamaForCausalLM name of a llama.cpp tensor, or None if it has none."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


class GGUFCheckpoint:
    """One memory-mapped GGUF file; each tensor is read and dequantized only when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
            # Keys the reader makes up itself (version, counts) are not in the file's key list.
            self.metadata: dict[str, object] = {k: _value(f) for k, f in reader.fields.items()
                                                if not k.startswith("GGUF.")}
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such GGUF file") from None
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e}); is it truncated?") from None
        if reader.byte_order != "I":
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        self._tensors: dict[str, ReaderTensor] = {}  # HF name -> views into the memory map
        size = self.path.stat().st_size
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                hint = "; llama3 rope scaling from GGUF is not supported yet" if "rope_freqs" in t.name else ""
                raise CheckpointError(f"{self.path}: unknown GGUF tensor {t.name} (no dense Llama "
                                      f"equivalent{hint})")
            if t.tensor_type not in _SUPPORTED:
                raise CheckpointError(f"{self.path}: tensor {t.name} has quant type {t.tensor_type.name}; "
                                      f"herd dequantizes {', '.join(q.name for q in _SUPPORTED)}")
            # The reader silently hands back a short view when the data runs past the end of the file.
            if t.data_offset + int(t.n_bytes) > size:
                raise CheckpointError(f"{self.path}: tensor {t.name} runs past the end of the file "
                                      f"({size} bytes); the file is truncated")
            self._tensors[name] = t
        try:
            self.config: dict = self._build_config()
        except CheckpointError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a per-layer list where one number belongs
            raise CheckpointError(f"{self.path}: invalid llama.* metadata ({e})") from None

    def _build_config(self) -> dict:
        md = self.metadata
        arch = md.get("general.architecture")
        if arch is None:
            raise CheckpointError(f"{self.path}: no general.architecture key; not a model GGUF")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported yet; herd "
                                  "reads dense Llama GGUF (architecture 'llama') only; load this model "
                                  "from HF safetensors instead")

        def key(name: str, default: Any = None) -> Any:
            value = md.get(f"llama.{name}", default)
            if value is None:
                raise CheckpointError(f"{self.path}: missing GGUF key llama.{name}")
            return value

        if key("expert_count", 0):
            raise CheckpointError(f"{self.path}: llama.expert_count={md['llama.expert_count']}; MoE "
                                  "GGUF (Mixtral-style) is not supported")
        if key("rope.scaling.type", "none") != "none":
            raise CheckpointError(f"{self.path}: llama.rope.scaling.type "
                                  f"{md['llama.rope.scaling.type']!r} is not supported")
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden // heads))
        rotary = int(key("rope.dimension_count", head_dim))
        if rotary != head_dim or int(key("attention.value_length", head_dim)) != head_dim:
            raise CheckpointError(f"{self.path}: llama.rope.dimension_count/attention.value_length differ "
                                  f"from head_dim {head_dim}; partial rotary / odd heads not supported")
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab = int(embed.shape[-1]) if embed is not None else None  # older files lack llama.vocab_size
        config: dict = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(key("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(key("context_length")),
            "vocab_size": int(key("vocab_size", vocab)),
            # llama.cpp writes output.weight only when it is not the embedding matrix.
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "hidden_act": "silu",
            "attention_bias": False,
        }
        for field in ("bos_token_id", "eos_token_id"):
            if f"tokenizer.ggml.{field}" in md:
                config[field] = md[f"tokenizer.ggml.{field}"]
        return config

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str) -> ReaderTensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {name} in the GGUF file")
        return self._tensors[name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dims fastest-first (ne0 = columns); torch lists them slowest-first.
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def load_tensor(self, name: str) -> torch.Tensor:
        t = self._get(name)
        shape = self.tensor_shape(name)
        out = _dequantize(t).reshape(shape)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            if shape[0] % (2 * heads):
                raise CheckpointError(f"{self.path}: tensor {t.name} has {shape[0]} rows, which do not "
                                      f"split into {heads} heads of rotary pairs")
            out = _unpermute_rotary(out, heads)
        return out

    def load_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """A slice; quantized blocks are dequantized whole first."""
        return self.load_tensor(name).narrow(dim, start, stop - start).clone()

    # The weight loader's TensorSource protocol, so a GGUF plugs in where safetensors does.
    names, shape, get, get_part = tensor_names, tensor_shape, load_tensor, load_part

    def origin(self, name: str) -> str:
        return f"{self.path}:{self._get(name).name}"


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


def _value(field: ReaderField) -> object:
    """A metadata value as plain python (str, int, float, bool or a flat list of them)."""
    item_type = field.types[-1] if field.types else None
    items = [bytes(field.parts[i]).decode("utf-8") if item_type == GGUFValueType.STRING
             else field.parts[i].tolist()[0] for i in field.data]
    return items if field.types and field.types[0] == GGUFValueType.ARRAY else items[0]


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves each head's two rotary halves row-wise."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def _dequantize(t: ReaderTensor) -> torch.Tensor:
    """F32/F16/BF16 keep their dtype; Q4_0/Q4_1/Q8_0 blocks of 32 become float32 (ggml's formulas)."""
    raw = t.data
    if t.tensor_type == Q.F32:
        return torch.from_numpy(np.array(raw, dtype=np.float32))  # copy: the mmap is read-only
    if t.tensor_type == Q.F16:
        return torch.from_numpy(np.array(raw, dtype=np.float16))
    if t.tensor_type == Q.BF16:
        return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16)
    _, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
    blocks = np.asarray(raw).reshape(-1, block_bytes)  # (n_blocks, bytes per block)
    # In slices of blocks, straight into the result: whole-tensor temporaries of a 49152 x 576
    # embedding were three float32 copies of it at once (the load's peak memory).
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_SLICE):
        part = blocks[start:start + _BLOCKS_PER_SLICE]
        _dequantize_blocks(part, t.tensor_type, out[start:start + len(part)])
    return torch.from_numpy(out)


_BLOCKS_PER_SLICE = 1 << 15  # 1M values: 4 MB of float32 per temporary


def _dequantize_blocks(blocks: np.ndarray, kind: Q, out: np.ndarray) -> None:
    """ggml's formulas for blocks of 32 into out (n_blocks, 32) float32."""
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # (n_blocks, 1) scale
    if kind == Q.Q8_0:
        np.multiply(blocks[:, 2:].view(np.int8), d, out=out)
        return
    # 4-bit: byte j holds element j in its low nibble and element j + 16 in its high one.
    qs = blocks[:, 4:] if kind == Q.Q4_1 else blocks[:, 2:]
    out[:, :16], out[:, 16:] = qs & 0x0F, qs >> 4
    if kind == Q.Q4_0:
        out -= 8.0
        out *= d
        return
    out *= d
    out += blocks[:, 2:4].view(np.float16).astype(np.float32)  # the block's minimum
