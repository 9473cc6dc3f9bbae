"""herd's C++ decode step (serving/engine/native_decode.py): under continuous batching and
forced preemption every request gets exactly the tokens the eager model gives it alone, on a
dense Llama 4 (chunked-local and NoPE layers, qk norm, attention temperature); models it cannot
run are named with the reason and keep torch.compile."""

from __future__ import annotations

import pytest

from models.llama4 import load_model
from models.llama4.generate import generate_tokens
from serving.engine import SamplingParams
from serving.engine.model_runner import ModelRunner
from serving.engine.native_decode import unsupported_reason
from tests.integration.test_engine import _prompts, engine_for, run
from tests.parity import tiny_checkpoints as tiny


@pytest.fixture(scope="module")
def dense_llama4(tmp_path_factory):
    """Every layer dense; layer 3 NoPE with temperature tuning, the rest chunked (8) with qk norm."""
    path = tiny.save_llama4(tmp_path_factory.mktemp("dense_llama4"), seed=5, moe_layers=[])
    return load_model(path, dtype="float32")


def test_batched_with_preemption_equals_alone(dense_llama4):
    c = dense_llama4.config
    assert not c.moe_layers and c.attention_chunk_size == 8 and not all(c.use_rope) and c.use_qk_norm
    engine = engine_for(dense_llama4, compile=True)
    assert engine.runner.native is not None
    prompts = _prompts(8, [5, 13, 27, 40, 9, 33, 18, 50])  # several cross chunk boundaries (8)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reqs = [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    out = run(engine, [reqs[:3], [], reqs[3:6], reqs[6:]])
    assert engine.stats.num_preemptions > 0  # the 40-block cache cannot hold all eight
    for i, p in enumerate(prompts):
        alone = list(generate_tokens(dense_llama4.model, p, 20))
        assert out[f"r{i}"].outputs[0].token_ids == alone, f"request {i}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_unsupported_models_say_why(tiny_llama4, dense_llama4):
    assert unsupported_reason(dense_llama4.model) is None
    assert unsupported_reason(tiny_llama4.model).endswith("is a mixture of experts")
    bf16 = load_model(dense_llama4.path, dtype="bfloat16").model
    assert unsupported_reason(bf16).startswith("activations are torch.bfloat16")
    # Opting out keeps torch.compile (not run here: nothing compiles before the first step).
    runner = ModelRunner(dense_llama4.model, 8, 4, stop_ids_for=lambda seq: (), compile=True, native_decode=False)
    assert runner.native is None and runner.decode_forward is not dense_llama4.model.forward
