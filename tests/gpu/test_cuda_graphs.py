"""The decode step as captured CUDA graphs gives what the eager Triton path gives, under continuous
batching with padded batch sizes and preemption (tiny Llama 4: MoE, NoPE, prompts past the chunk)."""

from __future__ import annotations

import pytest
import torch

from serving.engine import SamplingParams
from tests.integration.test_engine import _prompts, engine_for, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_llama4_cuda(tiny_llama4_dir):
    from models.llama4 import load_model

    return load_model(tiny_llama4_dir, dtype="float32", device="cuda")


def _run(loaded, reqs, compile: bool):
    engine = engine_for(loaded, device="cuda", num_kv_blocks=12, max_num_batched_tokens=12, max_model_len=48,
                        compile=compile)
    out = run(engine, [reqs[:3], [], reqs[3:]])
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return engine, out


def test_captured_decode_equals_eager(tiny_llama4_cuda):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    reqs = [(f"g{i}", {"prompt_token_ids": p}, params)
            for i, p in enumerate(_prompts(7, [5, 3, 13, 9, 6, 27, 4]))]
    _, eager = _run(tiny_llama4_cuda, reqs, compile=False)
    engine, graphed = _run(tiny_llama4_cuda, reqs, compile=True)
    graphs = engine.runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == graphs.sizes  # every size captured
    assert graphs.replays > 0 and graphs.padded_rows > 0
    assert engine.stats.num_preemptions > 0
    for rid, *_ in reqs:
        got, want = graphed[rid].outputs[0], eager[rid].outputs[0]
        assert got.token_ids == want.token_ids, rid
        for g, w in zip(got.logprobs, want.logprobs):
            assert g.keys() == w.keys()
            for tid in g:
                assert abs(g[tid].logprob - w[tid].logprob) < 1e-3
