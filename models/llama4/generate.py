"""One-sequence generation with a contiguous KV cache: the plain loop the engine is checked against."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models.llama4.attention import DenseAttention, KVCache
from models.llama4.model import Llama4Model


def next_token(logits_V: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(model: Llama4Model, prompt_ids: list[int], max_tokens: int,
                    temperature: float = 0.0, seed: int | None = None,
                    stop_ids: frozenset[int] = frozenset()) -> Iterator[int]:
    """Yields up to max_tokens new ids (greedy when temperature is 0), ending after a stop id."""
    if not prompt_ids:
        raise ValueError("prompt_ids: empty prompt")
    c = model.config
    total = len(prompt_ids) + max_tokens
    if total > c.max_position_embeddings:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds "
                         f"the model's context of {c.max_position_embeddings}")
    device = model.embed_tokens.weight.device
    cache = KVCache(c.num_hidden_layers, total, c.num_key_value_heads, c.head_dim,
                    model.embed_tokens.weight.dtype, device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    ids = torch.tensor(prompt_ids, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    for _ in range(max_tokens):
        hidden = model(ids, positions, DenseAttention([len(ids)], positions, [cache]))
        token = next_token(model.compute_logits(hidden[-1:])[0], temperature, generator)
        yield token
        if token in stop_ids:
            return
        ids = torch.tensor([token], device=device)
        positions = positions[-1:] + 1
