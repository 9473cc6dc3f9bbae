"""fused_linear_cross_entropy (chunked, gradients taken in the forward) against the plain reference.

Both chunked paths run here: the Triton kernel in Triton's interpreter, and the torch step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.cross_entropy as ce
from kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture(params=["triton", "torch"])
def path(request):
    """Which chunked step runs: the Triton kernel (interpreted on CPU) or the torch one."""
    request.getfixturevalue("triton_kernels" if request.param == "triton" else "reference_kernels")
    return request.param


def _set_chunk_rows(monkeypatch, rows: int, n_vocab: int, dtype: torch.dtype) -> None:
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", rows * n_vocab * dtype.itemsize)


def _inputs(n, d, v, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_ND = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    # Scaled so that logits spread over a few units: softmax neither uniform nor one-hot.
    weight_VD = (torch.randn(v, d, generator=gen) * 0.3).to(dtype).requires_grad_()
    labels_N = torch.randint(0, v, (n,), generator=gen)
    return hidden_ND, weight_VD, labels_N


def _loss_and_grads(fn, hidden_ND, weight_VD, labels_N, **kw):
    loss = fn(hidden_ND, weight_VD, labels_N, **kw)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden_ND, weight_VD))
    return loss, grad_hidden, grad_weight


def _assert_matches_reference(hidden_ND, weight_VD, labels_N, **kw):
    got = _loss_and_grads(fused_linear_cross_entropy, hidden_ND, weight_VD, labels_N, **kw)
    want = _loss_and_grads(linear_cross_entropy_reference, hidden_ND, weight_VD, labels_N, **kw)
    tol = TOL[hidden_ND.dtype]
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w, name in zip(got[1:], want[1:], ("grad_hidden", "grad_weight")):
        assert g.dtype == w.dtype, name
        # bf16 gradients: compare against the gradient's own scale, elementwise rounding differs.
        atol = tol["atol"] * max(1.0, float(w.float().abs().max()))
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=tol["rtol"], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n_vocab", [300, 100])  # 300: two full blocks of 128 and a partial; 100: under one
def test_matches_reference(path, monkeypatch, dtype, reduction, n_vocab):
    # 21 rows in chunks of 8: the last chunk is partial.
    _set_chunk_rows(monkeypatch, 8, n_vocab, dtype)
    hidden_ND, weight_VD, labels_N = _inputs(21, 32, n_vocab, dtype)
    labels_N[[2, 5, 17]] = -100
    _assert_matches_reference(hidden_ND, weight_VD, labels_N, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_with_every_label_ignored(path, monkeypatch, dtype):
    _set_chunk_rows(monkeypatch, 4, 150, dtype)
    hidden_ND, weight_VD, labels_N = _inputs(10, 16, 150, dtype)
    labels_N[4:8] = -100  # the whole second chunk
    for reduction in ("mean", "sum"):
        _assert_matches_reference(hidden_ND, weight_VD, labels_N, reduction=reduction)


def test_custom_ignore_index_inside_vocab(path, monkeypatch):
    _set_chunk_rows(monkeypatch, 4, 130, torch.float32)
    hidden_ND, weight_VD, labels_N = _inputs(9, 16, 130, torch.float32)
    labels_N[[0, 3, 4]] = 7
    _assert_matches_reference(hidden_ND, weight_VD, labels_N, ignore_index=7)


def test_int32_labels(path, monkeypatch):
    _set_chunk_rows(monkeypatch, 4, 130, torch.float32)
    hidden_ND, weight_VD, labels_N = _inputs(9, 16, 130, torch.float32)
    labels_N[1] = -100
    got = fused_linear_cross_entropy(hidden_ND, weight_VD, labels_N.int())
    torch.testing.assert_close(got, linear_cross_entropy_reference(hidden_ND, weight_VD, labels_N),
                               **TOL[torch.float32])


def test_every_label_ignored(path, monkeypatch):
    """Mean over zero tokens is NaN (0/0) as in torch, gradients are zero; sum is 0."""
    _set_chunk_rows(monkeypatch, 4, 130, torch.float32)
    hidden_ND, weight_VD, _ = _inputs(10, 16, 130, torch.float32)
    labels_N = torch.full((10,), -100)
    fused = fused_linear_cross_entropy
    loss, grad_hidden, grad_weight = _loss_and_grads(fused, hidden_ND, weight_VD, labels_N)
    want = linear_cross_entropy_reference(hidden_ND, weight_VD, labels_N)
    assert torch.isnan(want) and torch.isnan(loss)
    assert not grad_hidden.any() and not grad_weight.any()
    loss, grad_hidden, grad_weight = _loss_and_grads(fused, hidden_ND, weight_VD, labels_N, reduction="sum")
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_weight_tied_to_embedding(path, monkeypatch):
    """The head's gradient adds to the embedding's in the same weight.grad."""
    _set_chunk_rows(monkeypatch, 8, 200, torch.float32)
    gen = torch.Generator().manual_seed(3)
    ids_N = torch.randint(0, 200, (20,), generator=gen)
    labels_N = torch.randint(0, 200, (20,), generator=gen)
    mix_DD = torch.randn(16, 16, generator=gen)

    def run(loss_fn):
        weight_VD = (torch.randn(200, 16, generator=torch.Generator().manual_seed(4)) * 0.3).requires_grad_()
        hidden_ND = torch.tanh(F.embedding(ids_N, weight_VD) @ mix_DD)
        loss_fn(hidden_ND, weight_VD, labels_N).backward()
        return weight_VD.grad

    torch.testing.assert_close(run(fused_linear_cross_entropy), run(linear_cross_entropy_reference),
                               **TOL[torch.float32])


def test_grad_output_scales_and_graph_can_be_retained(path, monkeypatch):
    _set_chunk_rows(monkeypatch, 8, 130, torch.float32)
    hidden_ND, weight_VD, labels_N = _inputs(12, 16, 130, torch.float32)
    loss = fused_linear_cross_entropy(hidden_ND, weight_VD, labels_N)
    once = torch.autograd.grad(loss * 2.5, (hidden_ND, weight_VD), retain_graph=True)
    twice = torch.autograd.grad(loss * 2.5, (hidden_ND, weight_VD))
    ref = linear_cross_entropy_reference(hidden_ND, weight_VD, labels_N)
    want = torch.autograd.grad(ref * 2.5, (hidden_ND, weight_VD))
    for got in (once, twice):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_frozen_weight_and_no_grad(path, monkeypatch):
    _set_chunk_rows(monkeypatch, 8, 130, torch.float32)
    hidden_ND, weight_VD, labels_N = _inputs(12, 16, 130, torch.float32)
    frozen_VD = weight_VD.detach()
    loss = fused_linear_cross_entropy(hidden_ND, frozen_VD, labels_N)
    (grad_hidden,) = torch.autograd.grad(loss, hidden_ND)
    ref = linear_cross_entropy_reference(hidden_ND, frozen_VD, labels_N)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(ref, hidden_ND)[0], **TOL[torch.float32])
    with torch.no_grad():
        loss_nograd = fused_linear_cross_entropy(hidden_ND, weight_VD, labels_N)
    assert loss_nograd.grad_fn is None
    torch.testing.assert_close(loss_nograd, ref.detach(), **TOL[torch.float32])


def test_logits_are_never_whole(path, monkeypatch):
    """Every chunk step sees at most the budgeted rows, never all N."""
    n_vocab, n_rows = 140, 30
    _set_chunk_rows(monkeypatch, 7, n_vocab, torch.float32)
    seen = []
    if path == "triton":
        import kernels.cross_entropy_triton as cet

        module, name = cet, "cross_entropy_grad_"
    else:
        module, name = ce, "cross_entropy_grad_torch_"
    step = getattr(module, name)

    def spy(logits_CV, *args):
        seen.append(logits_CV.shape[0])
        return step(logits_CV, *args)

    monkeypatch.setattr(module, name, spy)
    hidden_ND, weight_VD, labels_N = _inputs(n_rows, 16, n_vocab, torch.float32)
    _assert_matches_reference(hidden_ND, weight_VD, labels_N)
    assert seen == [7, 7, 7, 7, 2]


def test_chunk_rows():
    assert ce.chunk_rows(10_000, 202_048, 2, budget_bytes=512 * 2**20) == 1328
    assert ce.chunk_rows(100, 202_048, 2, budget_bytes=512 * 2**20) == 100
    assert ce.chunk_rows(100, 202_048, 4, budget_bytes=1) == 1  # always progress
    assert ce.chunk_rows(0, 10, 4) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_strided_logits(triton_kernels, dtype):
    """The kernel alone, on a transposed (column-stride != 1) chunk, against the torch step."""
    from kernels.cross_entropy_triton import cross_entropy_grad_

    gen = torch.Generator().manual_seed(5)
    logits_CV = (torch.randn(260, 6, generator=gen) * 3).to(dtype).T
    labels_C = torch.tensor([0, 259, -100, 128, 127, 3])
    scale = torch.tensor([0.25])
    got_logits, want_logits = logits_CV.clone(), logits_CV.clone()
    assert got_logits.stride() == (1, 6)
    got_loss, want_loss = torch.empty(6), torch.empty(6)
    cross_entropy_grad_(got_logits, labels_C, got_loss, scale, -100, True)
    ce.cross_entropy_grad_torch_(want_logits, labels_C, want_loss, scale, -100, True)
    torch.testing.assert_close(got_loss, want_loss, **TOL[torch.float32])
    torch.testing.assert_close(got_logits.float(), want_logits.float(), **TOL[dtype])
    assert not got_logits[2].any()


def _bad(**override):
    hidden_ND, weight_VD, labels_N = _inputs(6, 8, 20, torch.float32)
    args = {"hidden_ND": hidden_ND, "weight_VD": weight_VD, "labels_N": labels_N}
    args.update(override)
    return args


@pytest.mark.parametrize("override,field", [
    ({"hidden_ND": torch.randn(2, 3, 8)}, "hidden_ND"),
    ({"weight_VD": torch.randn(20, 9)}, "weight_VD"),
    ({"labels_N": torch.zeros(5, dtype=torch.long)}, "labels_N"),
    ({"labels_N": torch.zeros(6)}, "labels_N"),
    ({"weight_VD": torch.randn(20, 8, dtype=torch.bfloat16)}, "weight_VD"),
    ({"hidden_ND": torch.zeros(6, 8, dtype=torch.int32), "weight_VD": torch.zeros(20, 8, dtype=torch.int32)},
     "hidden_ND"),
    ({"labels_N": torch.tensor([0, 1, 2, 20, 4, 5])}, "labels_N\\[3\\] = 20"),
    ({"labels_N": torch.tensor([0, 1, -3, 2, 4, 5])}, "labels_N\\[2\\] = -3"),
    ({"reduction": "none"}, "reduction"),
    ({"ignore_index": 1.5}, "ignore_index"),
])
def test_bad_input_names_the_argument(path, override, field):
    with pytest.raises(ValueError, match=field):
        fused_linear_cross_entropy(**_bad(**override))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(monkeypatch, dtype):
    monkeypatch.setenv("HERD_KERNELS", "auto")
    n_vocab = 32_003  # odd: neither the block nor 16-byte vectors divide it
    _set_chunk_rows(monkeypatch, 1000, n_vocab, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden_ND = torch.randn(2500, 512, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight_VD = (torch.randn(n_vocab, 512, device="cuda", generator=gen) * 0.05).to(dtype).requires_grad_()
    labels_N = torch.randint(0, n_vocab, (2500,), device="cuda", generator=gen)
    labels_N[::7] = -100
    _assert_matches_reference(hidden_ND, weight_VD, labels_N)
