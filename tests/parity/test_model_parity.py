"""Our model against transformers (fp32, eager attention) on random tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from models.llama4 import DenseAttention, KVCache, load_model
from models.llama4.generate import generate_tokens
from tests.parity import tiny_checkpoints as tiny

# Each case exercises a feature a wrong implementation would get visibly wrong at T=40 with
# chunks of 8 and floor_scale 4: chunk boundaries, NoPE temperature, routing, tying.
CASES = {
    "llama4_moe_every_layer": lambda p: tiny.save_llama4(p),
    "llama4_interleaved_top2_no_qknorm": lambda p: tiny.save_llama4(
        p, seed=1, interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False),
    "llama4_all_nope_pattern": lambda p: tiny.save_llama4(
        p, seed=2, no_rope_layers=[1, 0, 1, 0], attn_temperature_tuning=True, num_hidden_layers=4),
    "llama4_unchunked_no_temperature": lambda p: tiny.save_llama4(
        p, seed=3, attention_chunk_size=None, attn_temperature_tuning=False),
    "llama_tied": lambda p: tiny.save_llama(p),
    "llama_untied_llama3_rope": lambda p: tiny.save_llama(
        p, seed=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama4_multimodal_checkpoint": lambda p: tiny.save_llama4_multimodal(p, seed=5),
}
T = 40


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, Llama4ForConditionalGeneration

    path = CASES[request.param](tmp_path_factory.mktemp(request.param))
    ours = load_model(path, dtype="float32", tokenizer=False).model
    cls = Llama4ForConditionalGeneration if "multimodal" in request.param else AutoModelForCausalLM
    ref = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    # transformers 5.24's multimodal forward fails without images; its text model is the
    # reference (it was loaded from the same multimodal checkpoint).
    return ours, getattr(ref, "language_model", ref)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, tiny.VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _our_logits(model, ids):
    pos = torch.arange(len(ids))
    return model.compute_logits(model(ids, pos, DenseAttention([len(ids)], pos)))


@torch.inference_mode()
def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = _ids(T)
    expected = ref(input_ids=ids[None]).logits[0]
    assert (_our_logits(ours, ids) - expected).abs().max().item() < 1e-4


@torch.inference_mode()
def test_kv_cache_decode_matches_full_forward(pair):
    ours, _ = pair
    c = ours.config
    ids = _ids(T, seed=1)
    full = _our_logits(ours, ids)
    cache = KVCache(c.num_hidden_layers, T, c.num_key_value_heads, c.head_dim, torch.float32)
    steps = [0, 13, 14, 25] + list(range(26, T))  # a multi-token chunk crossing a chunk boundary
    got = []
    for a, b in zip(steps, steps[1:] + [T]):
        pos = torch.arange(a, b)
        got.append(ours.compute_logits(ours(ids[a:b], pos, DenseAttention([b - a], pos, [cache]))))
    assert (torch.cat(got) - full).abs().max().item() < 1e-4


@torch.inference_mode()
def test_packed_sequences_match_separate_runs(pair):
    ours, _ = pair
    a, b = _ids(T, seed=2), _ids(11, seed=3)
    pos = torch.cat([torch.arange(T), torch.arange(11)])
    packed = ours.compute_logits(ours(torch.cat([a, b]), pos, DenseAttention([T, 11], pos)))
    assert (packed[:T] - _our_logits(ours, a)).abs().max().item() < 1e-4
    assert (packed[T:] - _our_logits(ours, b)).abs().max().item() < 1e-4


@torch.inference_mode()
def test_greedy_continuation_matches_transformers(pair):
    ours, ref = pair
    prompt = _ids(12, seed=4)
    out = ref.generate(input_ids=prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long),
                       max_new_tokens=24, do_sample=False, eos_token_id=tiny.EOS, pad_token_id=tiny.PAD)
    expected = out[0, 12:].tolist()
    got = list(generate_tokens(ours, prompt.tolist(), 24, stop_ids=frozenset({tiny.EOS})))
    assert got == expected
