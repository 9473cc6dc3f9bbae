"""MoE kernels' Triton paths (router top-k + sigmoid; permute, grouped GEMMs, combine) against the
plain-PyTorch references, forward and backward."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from kernels.dispatch import interpreting
from kernels.moe import moe_experts, moe_experts_reference
from kernels.moe_routing import moe_route, moe_route_reference

# bf16 results may differ from the reference's by a few bf16 ulps: the reference rounds its partial
# results to bf16 where the kernels keep fp32. Gradients span a wide range, so bf16 ones are compared
# against the largest reference value rather than element by element.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}
BF16_REL = 2e-2


@pytest.fixture(autouse=True)
def gpu_rounding_in_interpreter(monkeypatch):
    """Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, which biases
    every stored bf16 value; emulate the GPU so bf16 results are held to the reference's accuracy."""
    if not interpreting():
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def assert_close(actual, expected, tol, name=""):
    assert actual.dtype == expected.dtype, name
    if "rel" in tol:
        err = (actual.float() - expected.float()).abs().max().item()
        scale = expected.float().abs().max().item()
        assert err <= tol["rel"] * scale + 1e-3, f"{name}: max error {err} vs max |reference| {scale}"
    else:
        torch.testing.assert_close(actual, expected, **tol, msg=name)


@contextlib.contextmanager
def reference_mode():
    """Run the reference with every kernel it calls (silu_and_mul) on its reference path too."""
    before = os.environ.get("HERD_KERNELS")
    os.environ["HERD_KERNELS"] = "reference"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HERD_KERNELS"]
        else:
            os.environ["HERD_KERNELS"] = before


def distinct_logits(T, E, gen, dtype=torch.float32):
    """Logits without ties in any dtype, so every top-k is unambiguous."""
    ranks = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)]).float()
    return ((ranks - E / 2) / 2).to(dtype)


def experts_inputs(T, K, E, D, I, dtype, seed=0, unused_expert=None):
    g = torch.Generator().manual_seed(seed)
    logits = distinct_logits(T, E, g)
    if unused_expert is not None:
        logits[:, unused_expert] = -1e4
    top, ids = torch.topk(logits, K, dim=-1)
    return {
        "x_TD": torch.randn(T, D, generator=g).to(dtype),
        "topk_ids_TK": ids,
        "topk_weights_TK": torch.sigmoid(top / 2).to(dtype),
        "w_gate_up_EDF": (torch.randn(E, D, 2 * I, generator=g) / D ** 0.5).to(dtype),
        "w_down_EID": (torch.randn(E, I, D, generator=g) / I ** 0.5).to(dtype),
        "shared_TD": torch.randn(T, D, generator=g).to(dtype),
    }


DIFFERENTIABLE = ("x_TD", "topk_weights_TK", "w_gate_up_EDF", "w_down_EID", "shared_TD")


def run_with_grads(fn, inputs, d_out):
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in DIFFERENTIABLE else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in DIFFERENTIABLE], d_out)
    return out, dict(zip(DIFFERENTIABLE, grads))


def check_experts(inputs, dtype, tol=None):
    tol = tol or (TOL[torch.float32] if dtype == torch.float32 else {"rel": BF16_REL})
    T, D = inputs["x_TD"].shape
    d_out = torch.randn(T, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    out_t, grads_t = run_with_grads(moe_experts, inputs, d_out)
    with reference_mode():
        out_r, grads_r = run_with_grads(moe_experts_reference, inputs, d_out)
    assert_close(out_t, out_r, tol, "out")
    for name in DIFFERENTIABLE:
        assert_close(grads_t[name], grads_r[name], tol, name)
    return grads_t


# T = 37 is not a multiple of any block; D = 40 and I = 24 are not multiples of the GEMM blocks.
CASES = {
    "top2-ragged-empty-expert": {"T": 37, "K": 2, "E": 5, "D": 40, "I": 24, "unused_expert": 3},
    "top1": {"T": 20, "K": 1, "E": 4, "D": 40, "I": 24},
    "one-token": {"T": 1, "K": 2, "E": 4, "D": 40, "I": 24},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_experts_match_reference(triton_kernels, dtype, case):
    params = dict(CASES[case])
    unused = params.pop("unused_expert", None)
    grads = check_experts(experts_inputs(**params, dtype=dtype, unused_expert=unused), dtype)
    if unused is not None:
        # An expert with no tokens launches no GEMM tiles and its weight gradients are exactly zero.
        assert not grads["w_gate_up_EDF"][unused].any() and not grads["w_down_EID"][unused].any()


def test_experts_inference_and_without_shared(triton_kernels):
    inputs = experts_inputs(T=19, K=2, E=4, D=40, I=24, dtype=torch.float32, seed=3)
    shared = inputs.pop("shared_TD")
    with torch.no_grad():
        out = moe_experts(**inputs)
        with_shared = moe_experts(**inputs, shared_TD=shared)
    with reference_mode():
        ref = moe_experts_reference(**inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(with_shared, ref + shared, **TOL[torch.float32])


def test_experts_strided_inputs(triton_kernels):
    """Views (a row slice of x, transposed-storage weights) go through their strides; int32 ids."""
    inputs = experts_inputs(T=9, K=2, E=3, D=40, I=24, dtype=torch.float32, seed=4)
    inputs["topk_ids_TK"] = inputs["topk_ids_TK"].int()
    inputs["x_TD"] = torch.cat([inputs["x_TD"], inputs["x_TD"]], dim=1)[:, 3:43]
    inputs["w_down_EID"] = inputs["w_down_EID"].transpose(1, 2).contiguous().transpose(1, 2)
    check_experts(inputs, torch.float32)


def test_experts_under_autocast(triton_kernels):
    """Training's bf16 autocast over float32 master weights: the weights are cast for the kernels and
    their gradients come back float32, as with the reference under autocast."""
    inputs = experts_inputs(T=13, K=2, E=3, D=40, I=24, dtype=torch.float32, seed=10)
    inputs["x_TD"] = inputs["x_TD"].bfloat16()
    inputs["shared_TD"] = inputs["shared_TD"].bfloat16()
    d_out = torch.randn(13, 40, generator=torch.Generator().manual_seed(11)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, grads_t = run_with_grads(moe_experts, inputs, d_out)
        with reference_mode():
            out_r, grads_r = run_with_grads(moe_experts_reference, inputs, d_out)
    assert grads_t["w_gate_up_EDF"].dtype == grads_t["w_down_EID"].dtype == torch.float32
    assert_close(out_t, out_r, {"rel": BF16_REL}, "out")
    for name in DIFFERENTIABLE:
        assert_close(grads_t[name], grads_r[name], {"rel": BF16_REL}, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_route_matches_reference(triton_kernels, dtype, top_k):
    T, E = 37, 6
    g = torch.Generator().manual_seed(top_k)
    logits = distinct_logits(T, E, g, dtype) + (torch.rand(T, E, generator=g) / 8).to(dtype)
    d_scores = torch.randn(T, top_k, generator=g).to(dtype)
    l_t = logits.clone().requires_grad_(True)
    l_r = logits.clone().requires_grad_(True)
    scores_t, ids_t = moe_route(l_t, top_k)
    scores_r, ids_r = moe_route_reference(l_r, top_k)
    assert ids_t.dtype == torch.int64 and scores_t.dtype == dtype
    assert torch.equal(ids_t, ids_r)
    torch.testing.assert_close(scores_t, scores_r, **TOL[dtype])
    (g_t,), (g_r,) = torch.autograd.grad(scores_t, l_t, d_scores), torch.autograd.grad(scores_r, l_r, d_scores)
    torch.testing.assert_close(g_t.float(), g_r.float(), **TOL[dtype])
    unchosen = torch.ones(T, E, dtype=torch.bool).scatter_(1, ids_r, False)
    assert not g_t[unchosen].any()


def test_route_edge_rows(triton_kernels):
    """One token; a row of -inf picks distinct ids lowest first; ties go to the lowest id; NaN."""
    scores, ids = moe_route(torch.tensor([[0.5, 2.0, -1.0]]), 2)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[2.0, 0.5]])))
    inf = float("-inf")
    scores, ids = moe_route(torch.tensor([[inf, inf, inf, inf], [1.0, 3.0, 3.0, 1.0]]), 3)
    assert ids.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert scores[0].eq(0).all()
    # NaN ranks first, as in torch.topk, and is not hidden: its score is NaN.
    scores, ids = moe_route(torch.tensor([[1.0, float("nan"), 0.0]]), 2)
    assert ids.tolist() == [[1, 0]] and scores[0, 0].isnan() and scores[0, 1] == torch.sigmoid(torch.tensor(1.0))


def test_routing_path_composed(triton_kernels):
    """The model's MoE: router -> moe_route -> moe_experts(+ shared) equals the reference composition,
    gradients included (router weight through the chosen logits)."""
    T, K, E, D, I = 21, 2, 4, 40, 24
    g = torch.Generator().manual_seed(5)
    params = {
        "router": torch.randn(E, D, generator=g) / D ** 0.5,
        "gate_up": torch.randn(E, D, 2 * I, generator=g) / D ** 0.5,
        "down": torch.randn(E, I, D, generator=g) / I ** 0.5,
        "shared": torch.randn(D, D, generator=g) / D ** 0.5,
    }
    x = torch.randn(T, D, generator=g)
    d_out = torch.randn(T, D, generator=g)

    def run(route, experts):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        x_TD = x.clone().requires_grad_(True)
        scores_TK, ids_TK = route(x_TD @ leaves["router"].T, K)
        out = experts(x_TD, ids_TK, scores_TK, leaves["gate_up"], leaves["down"], x_TD @ leaves["shared"])
        return out, torch.autograd.grad(out, [x_TD, *leaves.values()], d_out)

    out_t, grads_t = run(moe_route, moe_experts)
    with reference_mode():
        out_r, grads_r = run(moe_route_reference, moe_experts_reference)
    torch.testing.assert_close(out_t, out_r, **TOL[torch.float32])
    for name, a, b in zip(["x", *params], grads_t, grads_r):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_compiled_moe_experts_forward_and_backward(monkeypatch, mode):
    """torch.compile keeps herd::moe_experts opaque; its registered backward recomputes the forward."""
    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", mode)
    inputs = experts_inputs(T=7, K=2, E=3, D=16, I=16, dtype=torch.float32, seed=6)
    d_out = torch.randn(7, 16, generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(moe_experts, backend="aot_eager", fullgraph=True)
    out_c, grads_c = run_with_grads(compiled, inputs, d_out)
    with reference_mode():
        out_e, grads_e = run_with_grads(moe_experts_reference, inputs, d_out)
    torch.testing.assert_close(out_c, out_e, **TOL[torch.float32])
    for name in DIFFERENTIABLE:
        torch.testing.assert_close(grads_c[name], grads_e[name], **TOL[torch.float32], msg=name)


def _bad_experts_inputs(**changes):
    inputs = experts_inputs(T=4, K=2, E=3, D=16, I=8, dtype=torch.float32)
    inputs.update(changes)
    return inputs


BAD_EXPERTS = {
    "x_TD must be a 2-D float": {"x_TD": torch.randn(4, 16, 1)},
    "do not agree": {"w_down_EID": torch.randn(3, 8, 15)},
    "w_gate_up_EDF is torch.bfloat16": {"w_gate_up_EDF": torch.randn(3, 16, 16, dtype=torch.bfloat16)},
    "topk ids": {"topk_weights_TK": torch.rand(4, 1)},
    "topk_ids_TK must be int32 or int64": {"topk_ids_TK": torch.zeros(4, 2)},
    "topk_weights_TK must be floating": {"topk_weights_TK": torch.ones(4, 2, dtype=torch.int64)},
    r"topk_ids_TK must lie in \[0, 3\)": {"topk_ids_TK": torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]])},
    "shared_TD": {"shared_TD": torch.randn(4, 15)},
}


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_bad_input_names_the_argument(monkeypatch, mode):
    pytest.importorskip("triton")
    monkeypatch.setenv("HERD_KERNELS", mode)
    for message, changes in BAD_EXPERTS.items():
        with pytest.raises(ValueError, match=message):
            moe_experts(**_bad_experts_inputs(**changes))
    with pytest.raises(ValueError, match="top_k must be an int in"):
        moe_route(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        moe_route(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="logits_TE must be a 2-D float"):
        moe_route(torch.randn(4), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_scout_like_layer(dtype):
    """A Scout-shaped layer slice (16 experts, top-1, D 1024, I 512), 1000 tokens, one expert unused."""
    inputs = experts_inputs(T=1000, K=1, E=16, D=1024, I=512, dtype=dtype, seed=8, unused_expert=5)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    # fp32 sums over D = 1024 in another order than cuBLAS: tight, but relative to the largest value.
    check_experts(inputs, dtype, tol={"rel": 1e-4} if dtype == torch.float32 else None)
    logits = distinct_logits(1000, 128, torch.Generator().manual_seed(9), dtype).cuda()
    scores, ids = moe_route(logits, 2)
    scores_r, ids_r = moe_route_reference(logits, 2)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(scores, scores_r, **TOL[dtype])
