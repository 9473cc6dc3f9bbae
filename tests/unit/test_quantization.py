"""Weight-only int4/int8 layers and model quantization against float references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.int4_linear import Int4Linear, dequantize_int4, quantize_int4
from kernels.int8_linear import Int8Linear
from models.llama4 import load_model, save_pretrained
from models.llama4.attention import DenseAttention
from models.llama4.quantize import quantize_model


def test_quantize_int4_recovers_q4_1_codes():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 128), generator=g, dtype=torch.uint8)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # Q4_1 groups span their own min and max
    scales = torch.rand(32, 4, generator=g) * 0.1 + 0.01
    mins = -torch.rand(32, 4, generator=g)
    again, s2, m2 = quantize_int4(dequantize_int4(codes, scales, mins), 32)
    assert torch.equal(again, codes)
    torch.testing.assert_close(s2, scales) and torch.testing.assert_close(m2, mins)


def _close_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Relative Frobenius error: what bf16 activations (8-bit mantissa) are allowed to cost."""
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("M", [1, 5, 64])
def test_int4_linear_matches_dequantized_float(group, M):
    g = torch.Generator().manual_seed(M)
    w = torch.randn(48, 128, generator=g)
    lin = Int4Linear.from_float(w, group)
    codes, scales, mins = quantize_int4(w, group)
    # The kernel multiplies by exactly the codes with bf16-rounded scale and zero point.
    torch.testing.assert_close(lin.dequantized(), dequantize_int4(codes, scales, mins, torch.bfloat16),
                               atol=1e-6, rtol=0)
    assert torch.equal(lin.codes(), codes)  # out of torch's packed layout again
    ref_w = dequantize_int4(codes, scales, mins)
    assert (ref_w - w).abs().max() <= (w.max() - w.min()) / 15  # within a quantization step
    assert (lin.dequantized() - ref_w).abs().max() < 0.02  # bf16 scales move weights very little
    x = torch.randn(M, 128, generator=g)
    y = lin(x)
    assert y.dtype == torch.float32
    _close_rel(y, x @ ref_w.T, 1e-2)
    y = Int4Linear.from_float(w, group).to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    _close_rel(y, x @ ref_w.T, 1e-2)


def test_int4_linear_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_float(torch.randn(40, 64))
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_float(torch.randn(32, 48))


def test_int8_linear_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, 64, generator=g) * torch.linspace(0.01, 3, 100)[:, None]
    lin = Int8Linear(w)
    # half a step of rounding, plus the bf16 scale's own rounding (2^-8 relative)
    assert ((lin.dequantized() - w).abs() <= w.abs().amax(1, keepdim=True) * (1 / 254 + 1 / 256) + 1e-6).all()
    x = torch.randn(7, 64, generator=g)
    _close_rel(lin(x), x @ w.T, 1e-2)


def _dequantized_twin(path) -> nn.Module:
    """The float model with every weight the quantizer touches replaced by its dequantized value."""
    model = load_model(path, dtype="float32", tokenizer=False).model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and name not in ("router", "lm_head"):
                child.weight.data = dequantize_int4(*quantize_int4(child.weight.data, 32), torch.bfloat16)
    head = Int8Linear(model.embed_tokens.weight.data if model.lm_head is None else model.lm_head.weight.data)
    model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False)
    model.lm_head.weight.data = head.dequantized()
    return model


def test_quantized_llama4_equals_its_dequantized_twin(tiny_llama4_dir, tmp_path):
    quant = load_model(tiny_llama4_dir, quantization="int4", tokenizer=False).model
    assert quant.quantization == "int4" and next(quant.parameters()).dtype == torch.float32  # auto
    layer = quant.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(quant.lm_head, Int8Linear)
    twin = _dequantized_twin(tiny_llama4_dir)
    ids = torch.arange(3, 40) % 250
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        got = quant.compute_logits(quant(ids, pos, DenseAttention([len(ids)], pos)))
        want = twin.compute_logits(twin(ids, pos, DenseAttention([len(ids)], pos)))
    _close_rel(got, want, 2e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="quantized"):
        save_pretrained(quant, tmp_path / "out")


def test_unknown_method_is_refused(tiny_llama4_dir):
    model = load_model(tiny_llama4_dir, dtype="float32", tokenizer=False).model
    with pytest.raises(ValueError, match="quantization: 'int3'"):
        quantize_model(model, "int3")
