"""herd's C++ decode step (serving/engine/native_decode.py): under continuous batching and
forced preemption every request gets exactly the tokens the eager model gives it alone, on a
dense Llama 4 (chunked-local and NoPE layers, qk norm, attention temperature); its int4/int8
VNNI matmuls stay within int8-activation rounding of the weights they hold and give every row
the same bits whatever the batch; models it cannot run are named with the reason and keep
torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.int4_linear import Int4Linear
from kernels.int8_linear import Int8Linear
from models.llama4 import load_model
from models.llama4.generate import generate_tokens
from models.llama4.quantize import quantize_model
from serving.engine import SamplingParams, cpu_gemm, model_runner
from serving.engine import native_decode as nd
from serving.engine.cpu_gemm import Float32GemmLinear
from serving.engine.model_runner import ModelRunner, StepInputs
from serving.engine.native_decode import unsupported_reason
from serving.engine.paged_attention import SeqSlice
from tests.integration.test_engine import (
    _prompts,
    check_batched_with_preemption_equals_alone,
    engine_for,
    run,
)
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
    check_batched_with_preemption_equals_alone(dense_llama4, engine)


def test_unsupported_models_say_why(tiny_llama4, dense_llama4):
    assert unsupported_reason(dense_llama4.model) is None
    assert unsupported_reason(tiny_llama4.model).endswith("is a mixture of experts")
    fp16 = load_model(dense_llama4.path, dtype="float16").model
    assert unsupported_reason(fp16).startswith("activations are torch.float16")
    # Opting out keeps torch.compile (not run here: nothing compiles before the first step).
    runner = ModelRunner(dense_llama4.model, 8, 4, stop_ids_for=lambda seq: (), compile=True, native_decode=False)
    assert runner.native is None and runner.decode_forward is not dense_llama4.model.forward


def test_bfloat16_step_follows_the_eager_model(dense_llama4):
    """In bfloat16 the C++ step rounds where the eager ops round: the same logits up to
    summation order, over a prompt longer than the chunk and 12 decode steps."""
    model = load_model(dense_llama4.path, dtype="bfloat16").model
    eager, native = (ModelRunner(model, 16, 4, stop_ids_for=lambda seq: (), compile=c) for c in (False, True))
    assert native.native is not None and native.k_caches[0].dtype == torch.bfloat16
    ids = _prompts(1, [21])[0]
    table = list(range(16))
    step = StepInputs(ids, list(range(len(ids))), [SeqSlice(0, len(ids), len(ids), table)], [len(ids) - 1])
    for _ in range(13):
        want, got = eager.run_model(step), native.run_model(step)
        diff = (got.float() - want.float()).abs()
        # Logits here are within +-2, where a bfloat16 step is 1/128: a few steps at most.
        assert float(diff.max()) <= 0.04 and float(diff.mean()) <= 0.008, (float(diff.max()), float(diff.mean()))
        pos = step.positions[-1] + 1
        step = StepInputs([int(want.argmax())], [pos], [SeqSlice(0, 1, pos + 1, table)], [0])


def test_steps_with_a_shared_prefix_take_the_cascade_path(dense_llama4, monkeypatch):
    """Requests sharing a cached 140-token prefix decode through the Python cascade (the prefix
    read once per group) rather than the C++ step, and still get what each gets alone."""
    engine = engine_for(dense_llama4, compile=True, num_kv_blocks=240, max_model_len=200,
                        max_num_batched_tokens=64)
    prefix = _prompts(1, [140])[0]
    prompts = [prefix + tail for tail in _prompts(5, [3, 9, 17, 6, 12])]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    verdicts, rule = [], model_runner.shares_prefix

    def recorded(slices, block_size):
        verdicts.append((len(slices), rule(slices, block_size)))
        return verdicts[-1][1]

    monkeypatch.setattr(model_runner, "shares_prefix", recorded)
    reqs = [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    out = run(engine, [reqs[:1], [], reqs[1:]])
    assert (5, True) in verdicts
    for i, p in enumerate(prompts):
        assert out[f"r{i}"].outputs[0].token_ids == list(generate_tokens(dense_llama4.model, p, 10)), f"request {i}"


needs_vnni = pytest.mark.skipif(not nd.extension().vnni_supported(), reason="this CPU has no AVX-512 VNNI")


@needs_vnni
@pytest.mark.parametrize("lin", [Int4Linear.from_float(torch.randn(48, 128), 32),
                                 Int4Linear.from_float(torch.randn(32, 256), 64),
                                 Int8Linear(torch.randn(112, 96) * torch.linspace(0.1, 2, 112)[:, None])],
                         ids=["int4-g32", "int4-g64", "int8"])
def test_vnni_linears_round_only_the_activations(lin):
    """Against the float weights each layer holds: int8 activations in groups of 32 cost ~0.5%
    (a wrong code, scale or layout costs tens of %); every row's result is the same bits alone
    as inside a batch of 1..7 (the kernel tiles rows in fours); and the kernel takes the weights
    over (the layer keeps no second copy) and hands them back intact."""
    x = torch.randn(7, lin.in_features, generator=torch.Generator().manual_seed(3))
    want = x @ lin.dequantized().T
    codes, torch_kernels = lin.codes(), lin(x)
    vnni = nd._vnni_kernel(nd.extension(), lin)
    got = vnni(x)
    for y in (got, torch_kernels):
        err = float((y - want).norm() / want.norm())
        assert err < 0.01, err
    assert not torch.equal(got, torch_kernels)  # two different roundings of the activations
    for B in range(1, 7):
        assert torch.equal(vnni(x[:B]), got[:B]), B
    lin.attach(vnni)  # what use_vnni_kernels does: the module's forward runs it
    assert torch.equal(lin(x.view(7, 1, -1)).view(7, -1), got)
    assert torch.equal(lin.codes(), codes) and (lin.packed if type(lin) is Int4Linear else lin.weight_int8).numel() == 0
    lin.detach()
    assert torch.equal(lin(x), torch_kernels)
    # Rows come in blocks of 16 and inputs in groups of 32; other layers keep torch's kernels.
    assert nd._vnni_kernel(nd.extension(), Int8Linear(torch.randn(100, 96))) is None


@needs_vnni
def test_int4_model_batched_equals_alone_through_the_vnni_step(dense_llama4):
    """The int4 model's decode steps in the VNNI kernels: under continuous batching and
    preemption each request gets what the same engine gives it alone."""
    loaded = load_model(dense_llama4.path, dtype="float32")
    quantize_model(loaded.model)
    engine = engine_for(loaded, compile=True)
    assert engine.runner.native is not None
    prompts = _prompts(6, [5, 27, 40, 9, 33, 18])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    together = run(engine, [reqs[:2], [], reqs[2:]])
    assert engine.stats.num_preemptions > 0
    for i, req in enumerate(reqs):
        alone = run(engine, [[req]])
        assert together[f"r{i}"].outputs[0].token_ids == alone[f"r{i}"].outputs[0].token_ids, f"request {i}"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_float32_gemms_round_like_the_bfloat16_ones(dense_llama4):
    """cpu_gemm: a bfloat16 layer given a float32 copy runs GEMMs of MIN_ROWS rows or more from it,
    its output rounded to bfloat16 (so within a bfloat16 step of the bfloat16 GEMM's), in Python and
    in the C++ step's Linear alike, and smaller ones on the bfloat16 weight itself. An engine over a
    bfloat16 model gets the copies by default on a CPU without bfloat16 arithmetic."""
    model = load_model(dense_llama4.path, dtype="bfloat16").model
    count = cpu_gemm.use_float32_gemms(model)
    assert count == 4 * len(model.layers) + 1 and type(model.lm_head) is Float32GemmLinear  # the tied head
    assert cpu_gemm.use_float32_gemms(model) == count  # once only
    lin = model.layers[0].feed_forward.down_proj
    step_linear = nd._native_linear(nd.extension(), lin, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for rows in (4, cpu_gemm.MIN_ROWS - 1, cpu_gemm.MIN_ROWS, 64):
        x = torch.randn(rows, lin.in_features, generator=g).bfloat16()
        got, bf16 = lin(x), F.linear(x, lin.weight)
        if rows < cpu_gemm.MIN_ROWS:
            assert torch.equal(got, bf16)
        else:
            assert torch.equal(got, F.linear(x.float(), lin.weight.float()).bfloat16())
            torch.testing.assert_close(got, bf16, rtol=2 ** -7, atol=1e-3)
        assert torch.equal(step_linear(x.float()), got.float())
    fresh = {}
    for setting in (None, False):
        loaded = load_model(dense_llama4.path, dtype="bfloat16")
        engine_for(loaded, float32_gemms=setting)
        fresh[setting] = type(loaded.model.layers[0].self_attn.qkv_proj)
    assert fresh[False] is nn.Linear
    bf16_arithmetic = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert fresh[None] is (nn.Linear if bf16_arithmetic else Float32GemmLinear)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "native-decode"])
def test_bfloat16_kv_cache_under_a_float32_model(dense_llama4, compile):
    """kv_cache_dtype="bfloat16" on a float32 model: the cache holds bfloat16 (half the bytes a
    block), and under continuous batching with preemption every request gets what the same engine
    gives it alone; the C++ step (which rounds keys and values as it stores them) and the eager path
    give the same tokens."""
    def engine(**kw):
        return engine_for(dense_llama4, kv_cache_dtype="bfloat16", **kw)

    batched = engine(compile=compile)
    assert batched.runner.k_caches[0].dtype == torch.bfloat16 and (batched.runner.native is not None) == compile
    prompts = _prompts(8, [5, 13, 27, 40, 9, 33, 18, 50])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    out = run(batched, [reqs[:3], [], reqs[3:6], reqs[6:]])
    assert batched.stats.num_preemptions > 0
    alone = engine(compile=False)
    for rid, prompt, p in reqs:
        want = run(alone, [[(rid, prompt, p)]])[rid].outputs[0].token_ids
        assert out[rid].outputs[0].token_ids == want, rid
    assert batched.blocks.num_free_blocks == batched.blocks.num_blocks
