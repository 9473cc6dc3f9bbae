"""The default model served with int4 weights: the GGUF's own Q4_1 codes, and sane answers."""

from __future__ import annotations

import pytest
import torch

from kernels.int4_linear import Int4Linear, dequantize_int4, quantize_int4
from serving import LLM, SamplingParams
from serving.engine.model_runner import ModelRunner, StepInputs
from serving.engine.paged_attention import SeqSlice


@pytest.fixture(scope="module")
def llm():
    return LLM(quantization="int4", max_model_len=512, memory_utilization=0.3, enforce_eager=True)


def test_weights_are_the_gguf_codes(llm, default_fp32):
    quant, ref = llm.engine.model, default_fp32.model
    for i in (0, 15, 29):
        q, r = quant.layers[i], ref.layers[i]
        for got, want in ((q.self_attn.qkv_proj, r.self_attn.qkv_proj), (q.feed_forward.down_proj,
                                                                          r.feed_forward.down_proj)):
            assert isinstance(got, Int4Linear)
            # Q4_1 blocks re-quantize to their own codes; the kernel keeps scale and zero in bf16.
            codes, scales, mins = quantize_int4(want.weight.float(), 32)
            torch.testing.assert_close(dequantize_int4(codes, scales, mins), want.weight.float(),
                                       atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got.dequantized(), dequantize_int4(codes, scales, mins, torch.bfloat16),
                                       atol=1e-6, rtol=0)


def test_greedy_answers_through_the_engine(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]], params, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    assert "4" in outs[1].outputs[0].text


def test_native_decode_step_gives_the_eager_logits(llm):
    """herd's C++ decode step over the int4 weights, step after step, against the eager model.
    Each int4 matmul rounds its input to bf16, so float32 summation-order differences flip some
    roundings: logits (about 15-35 here) differ by ~0.1 on average; a wrong op moves them by units."""
    model, tok = llm.engine.model, llm.engine.tokenizer
    eager, native = (ModelRunner(model, 8, 16, stop_ids_for=lambda seq: (), compile=c) for c in (False, True))
    assert native.native is not None
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours."}])
    table = list(range(8))
    step = StepInputs(ids, list(range(len(ids))), [SeqSlice(0, len(ids), len(ids), table)], [len(ids) - 1])
    for _ in range(16):
        want, got = eager.run_model(step), native.run_model(step)
        diff = (got - want).abs()
        assert float(diff.max()) <= 1.0 and float(diff.mean()) <= 0.25, (float(diff.max()), float(diff.mean()))
        pos = step.positions[-1] + 1
        step = StepInputs([int(want.argmax())], [pos], [SeqSlice(0, 1, pos + 1, table)], [0])
