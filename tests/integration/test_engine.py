"""The engine under continuous batching, chunked prefill and forced preemption gives each
request exactly what it gets alone (which the parity tests tie to transformers)."""

from __future__ import annotations

import pytest
import torch

from models.llama4.generate import generate_tokens
from serving.engine import EngineConfig, LLMEngine, SamplingParams
from tests.parity import tiny_checkpoints as tiny


def engine_for(loaded, **kw) -> LLMEngine:
    cfg = dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=96)
    cfg.update(kw)
    return LLMEngine(loaded, EngineConfig(model=str(loaded.path), **cfg))


def run(engine: LLMEngine, arrivals: list[list[tuple[str, object, SamplingParams]]]) -> dict:
    """Adds each group of requests one step after the previous; returns merged outputs."""
    results = {}
    groups = list(arrivals)
    while groups or engine.has_unfinished():
        if groups:
            for rid, prompt, params in groups.pop(0):
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.request_id in results:
                results[out.request_id].merge(out)
            else:
                results[out.request_id] = out
    return results


def _prompts(n: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def check_batched_with_preemption_equals_alone(loaded, engine: LLMEngine) -> None:
    """Eight requests of different lengths arriving over three steps into a cache too small for
    all of them: each gets what it gets alone, and every block comes back."""
    prompts = _prompts(8, [5, 13, 27, 40, 9, 33, 18, 50])  # several cross chunk boundaries (8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    out = run(engine, [reqs[:3], [], reqs[3:6], reqs[6:]])
    assert engine.stats.num_preemptions > 0  # the 40-block cache cannot hold all eight
    for i, p in enumerate(prompts):
        alone = list(generate_tokens(loaded.model, p, 20))
        assert out[f"r{i}"].outputs[0].token_ids == alone, f"request {i}"
        assert out[f"r{i}"].outputs[0].finish_reason == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_batched_with_preemption_equals_alone(tiny_llama4):
    check_batched_with_preemption_equals_alone(tiny_llama4, engine_for(tiny_llama4))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "native-decode"])
def test_default_model_batched_equals_alone(default_fp32, compile):
    engine = engine_for(default_fp32, block_size=16, num_kv_blocks=12, max_num_batched_tokens=64,
                        max_model_len=160, compile=compile)
    assert (engine.runner.native is not None) == compile  # float32 Llama: herd's C++ decode step
    tok = default_fp32.tokenizer
    questions = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
                 "Say hello in Spanish.", "Why is the sky blue?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = run(engine, [[(f"q{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]])
    assert engine.stats.num_preemptions > 0
    for i, p in enumerate(prompts):
        alone = list(generate_tokens(default_fp32.model, p, 24))
        got = out[f"q{i}"].outputs[0]
        assert got.token_ids == alone
        assert got.text == tok.decode(alone)
    assert "Paris" in out["q0"].outputs[0].text


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llama4):
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=123, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": _prompts(1, [12])[0]}
    alone = run(engine_for(tiny_llama4), [[("a", prompt, p)]])["a"].outputs[0].token_ids
    others = [(f"o{i}", {"prompt_token_ids": q}, SamplingParams(temperature=1.0, max_tokens=16))
              for i, q in enumerate(_prompts(5, [7, 20]))]
    mixed = run(engine_for(tiny_llama4), [others[:2], [("a", prompt, p)] + others[2:]])
    assert mixed["a"].outputs[0].token_ids == alone
    different = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=124, max_tokens=16, ignore_eos=True)
    assert run(engine_for(tiny_llama4), [[("b", prompt, different)]])["b"].outputs[0].token_ids != alone


def test_stop_string_never_leaks(default_fp32):
    engine = engine_for(default_fp32, block_size=16, num_kv_blocks=64, max_num_batched_tokens=256,
                        max_model_len=512)
    tok = default_fp32.tokenizer
    prompt = {"prompt_token_ids": tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])}
    full = run(engine, [[("full", prompt, SamplingParams(temperature=0, max_tokens=24))]])["full"].outputs[0].text
    stop = full[full.index("Paris") + 2:full.index("Paris") + 5]  # "ris", mid-token
    streamed = []
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop, "zzz"]))
    while engine.has_unfinished():
        for out in engine.step():
            streamed.append(out.outputs[0].text)
            final = out.outputs[0]
    text = "".join(streamed)
    assert text == full[:full.index(stop)]
    assert stop not in text and final.finish_reason == "stop" and final.stop_reason == stop


def test_abort_frees_every_block(tiny_llama4):
    engine = engine_for(tiny_llama4)
    start = engine.blocks.num_free_blocks
    for i, p in enumerate(_prompts(4, [30, 11])):
        engine.add_request(f"x{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_free_blocks < start
    for i in range(4):
        assert engine.abort(f"x{i}")
    assert engine.blocks.num_free_blocks == start
    assert not engine.has_unfinished() and engine.step() == []


def test_prefix_cache_hits_give_identical_outputs(tiny_llama4):
    engine = engine_for(tiny_llama4, num_kv_blocks=80)
    shared = _prompts(1, [33])[0]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cold = run(engine, [[("cold", {"prompt_token_ids": shared + [1, 2]}, params)]])["cold"]
    assert cold.num_cached_tokens == 0
    warm = run(engine, [[("warm", {"prompt_token_ids": shared + [1, 2]}, params)]])["warm"]
    assert warm.num_cached_tokens == 32  # 8 full blocks of 4
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert engine.get_stats().prefix_hit_tokens >= 32 and engine.get_stats().prefix_hit_rate > 0


def test_n_logprobs_and_prompt_logprobs(tiny_llama4):
    engine = engine_for(tiny_llama4)
    prompt = _prompts(1, [10])[0]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=2, prompt_logprobs=1,
                            ignore_eos=True)
    out = run(engine, [[("n", {"prompt_token_ids": prompt}, params)]])["n"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    with torch.inference_mode():
        from models.llama4 import DenseAttention
        pos = torch.arange(10)
        ref = tiny_llama4.model.compute_logits(tiny_llama4.model(torch.tensor(prompt), pos,
                                                                 DenseAttention([10], pos))).log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 10
    for p in range(1, 10):
        entry = out.prompt_logprobs[p]
        assert abs(entry[prompt[p]].logprob - float(ref[p - 1, prompt[p]])) < 1e-4
        assert len(entry) in (1, 2)
    for o in out.outputs:
        assert len(o.token_ids) == 6 and len(o.logprobs) == 6
        for tok_id, lp in zip(o.token_ids, o.logprobs):
            assert tok_id in lp and 2 <= len(lp) <= 3
            assert lp[tok_id].rank >= 1
        assert abs(o.cumulative_logprob - sum(lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs))) < 1e-4


def test_min_tokens_max_tokens_and_validation(tiny_llama4):
    engine = engine_for(tiny_llama4)
    prompt = {"prompt_token_ids": _prompts(1, [6])[0]}
    out = run(engine, [[("m", prompt, SamplingParams(temperature=0, min_tokens=5, max_tokens=7,
                                                      logit_bias={tiny.EOS: 100}))]])["m"].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == tiny.EOS and out.finish_reason == "stop"
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("too-long", prompt, SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("bad-token", {"prompt_token_ids": [10**6]}, SamplingParams())


def test_shared_prefix_cascade_equals_alone(tiny_llama4, monkeypatch):
    """Decodes sharing a long cached prefix take the cascade path; outputs match single runs."""
    from serving.engine import decode_attention

    calls = []
    original = decode_attention.DecodeGroup._cascade
    monkeypatch.setattr(decode_attention.DecodeGroup, "_cascade",
                        lambda self, *a: calls.append(self.shared) or original(self, *a))
    engine = engine_for(tiny_llama4, num_kv_blocks=200, max_model_len=256, max_num_batched_tokens=64)
    system = _prompts(1, [150])[0]
    tails = [[5], [6, 7], [8, 9, 10], [11], [12, 13, 14, 15, 16]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [(f"s{i}", {"prompt_token_ids": system + t}, params) for i, t in enumerate(tails)]
    out = run(engine, [reqs[:1], *[[]] * 4, reqs[1:]])  # the first caches the prefix
    assert calls and max(calls) * 4 >= 128
    for i, t in enumerate(tails):
        assert out[f"s{i}"].outputs[0].token_ids == list(generate_tokens(tiny_llama4.model, system + t, 12)), i
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
