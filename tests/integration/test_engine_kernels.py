"""The engine on the Triton kernels of kernels/ (interpreted on this CPU, compiled on a GPU) gives the
tokens it gives on the reference path, under continuous batching, chunked prefill and preemption:
paged decode attention, varlen flash attention over gathered context, MoE, norms and rotary."""

from __future__ import annotations

import pytest

from serving.engine import SamplingParams
from tests.integration.test_engine import _prompts, engine_for, run


@pytest.fixture
def requests_mix():
    prompts = _prompts(5, [5, 13, 27, 9, 20])  # 13, 27 and 20 cross the chunk boundary (8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    return [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]


def _run(loaded, reqs, monkeypatch, mode: str, **kw):
    monkeypatch.setenv("HERD_KERNELS", mode)
    engine = engine_for(loaded, num_kv_blocks=12, max_num_batched_tokens=12, max_model_len=48, **kw)
    out = run(engine, [reqs[:2], [], reqs[2:]])
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return engine, out


def test_engine_on_triton_kernels_equals_reference(tiny_llama4, requests_mix, monkeypatch):
    pytest.importorskip("triton")
    import kernels.flash_attention_triton as fa_triton
    import kernels.paged_attention_triton as pa_triton

    _, ref = _run(tiny_llama4, requests_mix, monkeypatch, "reference")
    launches = {"decode": 0, "prefill": 0}

    def counted(module, name, kind):
        fn = getattr(module, name)

        def wrapper(*a, **k):
            launches[kind] += 1
            return fn(*a, **k)
        monkeypatch.setattr(module, name, wrapper)
    counted(pa_triton, "paged_decode_attention_triton", "decode")
    counted(fa_triton, "flash_attention_triton", "prefill")
    engine, out = _run(tiny_llama4, requests_mix, monkeypatch, "triton")
    assert launches["decode"] > 0 and launches["prefill"] > 0
    assert engine.stats.num_preemptions > 0  # 12 blocks of 4 cannot hold all five
    assert_same_outputs(out, ref, requests_mix)


def test_decode_graph_buffers_equal_reference(tiny_llama4, requests_mix, monkeypatch):
    """compile=True on the kernels: decode steps run through the CUDA-graph runner's static,
    padded buffers (no capture without CUDA, the same forward eagerly at the padded size)."""
    pytest.importorskip("triton")
    reqs = graph_requests()
    _, ref = _run(tiny_llama4, reqs, monkeypatch, "reference")
    engine, out = _run(tiny_llama4, reqs, monkeypatch, "triton", compile=True)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]  # max_num_seqs 8
    assert graphs.replays > 0 and graphs.padded_rows > 0  # some batches of 3, 5, 6 or 7 ran padded
    assert engine.stats.num_preemptions > 0
    assert_same_outputs(out, ref, reqs)


def graph_requests():
    """Seven greedy requests whose decode batches take sizes 3, 5, 6 or 7: padded in graphs of 4 and 8."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    return [(f"g{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(_prompts(7, [5, 3, 13, 9, 6, 27, 4]))]


def assert_same_outputs(out, ref, requests, tol: float = 1e-4):
    """The same tokens, the same top logprob ids, and logprobs within tol."""
    for rid, *_ in requests:
        got, want = out[rid].outputs[0], ref[rid].outputs[0]
        assert got.token_ids == want.token_ids, rid
        for g, w in zip(got.logprobs, want.logprobs):
            assert g.keys() == w.keys()
            for tid in g:
                assert abs(g[tid].logprob - w[tid].logprob) < tol
