"""The default model served with int4 weights: the GGUF's own Q4_1 codes, and sane answers."""

from __future__ import annotations

import pytest
import torch

from kernels.int4_linear import Int4Linear, dequantize_int4, quantize_int4
from serving import LLM, SamplingParams
from serving.engine import native_decode as nd
from serving.engine.model_runner import ModelRunner, StepInputs
from serving.engine.paged_attention import SeqSlice


@pytest.fixture(scope="module")
def llm():
    """As served: herd's C++ decode step, and its VNNI kernels where the CPU has them."""
    return LLM(quantization="int4", max_model_len=512, memory_utilization=0.3)


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
    # Not the bare "What is the capital of France?": there the 4-bit model's first token is a
    # coin toss ("The" and "L" within 0.1 in log-prob), which each kernel's rounding settles its own way.
    params = SamplingParams(temperature=0, max_tokens=12)
    outs = llm.chat([[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                     [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]], params, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    assert "4" in outs[1].outputs[0].text


@pytest.mark.parametrize("vnni", [False, True], ids=["torch-kernels", "vnni"])
def test_native_decode_step_gives_the_eager_logits(llm, vnni):
    """herd's C++ decode step over the int4 weights, step after step, against the eager model
    on torch's kernels, in log-probabilities. Those kernels round each matmul's input to bf16
    (float32 summation-order differences flip some roundings); the VNNI ones round it to int8 in
    groups of 32, as llama.cpp does, which moves the distribution by a KL of ~0.005 here and
    likely tokens' log-probs by up to ~0.5; a wrong op moves them by units."""
    model, tok = llm.engine.model, llm.engine.tokenizer
    attached = nd.use_vnni_kernels(model, False)  # as the engine left them: restored below
    eager = ModelRunner(model, 8, 16, stop_ids_for=lambda seq: ())
    ids = tok.encode_chat([{"role": "user", "content": "Name three colours."}])
    table = list(range(8))
    step = StepInputs(ids, list(range(len(ids))), [SeqSlice(0, len(ids), len(ids), table)], [len(ids) - 1])
    steps, wants = [], []
    for _ in range(16):
        steps.append(step)
        wants.append(eager.run_model(step).float().log_softmax(-1))
        pos = step.positions[-1] + 1
        step = StepInputs([int(wants[-1].argmax())], [pos], [SeqSlice(0, 1, pos + 1, table)], [0])
    native = ModelRunner(model, 8, 16, stop_ids_for=lambda seq: (), compile=True)
    native.native = nd.NativeDecode(model, native.k_caches, native.v_caches, 16, vnni=vnni)
    try:
        assert (model.lm_head.fast is not None) == vnni  # the prefill step's kernels too
        for step, want in zip(steps, wants, strict=True):
            got = native.run_model(step).float().log_softmax(-1)
            likely = want > -7  # tokens of probability over ~1e-3
            kl, diff = float((want.exp() * (want - got)).sum()), float((got - want)[likely].abs().max())
            assert kl <= 0.02 and diff <= 0.75, (kl, diff)
    finally:
        nd.use_vnni_kernels(model, attached > 0)
