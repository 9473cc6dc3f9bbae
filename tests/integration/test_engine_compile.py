"""torch.compile of the decode step (--compile): the same tokens as eager, compiled once at
start-up for every later batch size and context length."""

from __future__ import annotations

import torch

from serving.engine import SamplingParams
from tests.integration.test_engine import _prompts, engine_for, run


def test_compiled_decode_equals_eager_without_recompiling(tiny_llama4):
    prompts = _prompts(5, [5, 13, 27, 9, 30])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    arrivals = [[("a", {"prompt_token_ids": prompts[0]}, params)], [],
                [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts[1:])]]
    eager = run(engine_for(tiny_llama4), arrivals)
    compiled_engine = engine_for(tiny_llama4, compile=True)  # compiles in its warm-up
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    compiled = run(compiled_engine, arrivals)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # nothing compiled after start-up
    assert {r: o.outputs[0].token_ids for r, o in compiled.items()} == \
        {r: o.outputs[0].token_ids for r, o in eager.items()}
