"""Random tiny checkpoints written by transformers itself: the reference we match."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 288  # 256 byte tokens + specials + spare ids
BOS, EOS, PAD = 256, 257, 258
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (no merges) whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE}))


def llama4_text_config(**overrides):
    from transformers import Llama4TextConfig

    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True,
                floor_scale=4, attn_scale=0.5, max_position_embeddings=512,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64},
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    args.update(overrides)
    return Llama4TextConfig(**args)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises norms to 1 and some weights to 0; random values everywhere make
    # a wrong mapping or a skipped op visible in the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))


def save_llama4(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(llama4_text_config(**overrides)).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def save_llama4_multimodal(path: Path, seed: int = 0) -> Path:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vision_output_dim=32, image_size=28, patch_size=14, projector_input_dim=32,
                  projector_output_dim=64)
    config = Llama4Config(text_config=llama4_text_config(interleave_moe_layer_step=2).to_dict(),
                          vision_config=vision)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def save_llama(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=BOS, eos_token_id=EOS)
    args.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**args)).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return path
