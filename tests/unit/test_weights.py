"""Strict loading: every bad checkpoint is a one-line CheckpointError naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError
from models.llama4 import DenseAttention, load_config, load_model, save_pretrained
from tests.parity import tiny_checkpoints as tiny


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    return tiny.save_llama4(tmp_path_factory.mktemp("l4"), interleave_moe_layer_step=2)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(ckpt, edit):
    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype="float32", tokenizer=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor_is_named(llama4_dir, tmp_path):
    ckpt = _copy(llama4_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.feed_forward.experts.down_proj"))
    assert "missing tensor model.layers.1.feed_forward.experts.down_proj" in _error(ckpt)


def test_wrong_shape_is_named(llama4_dir, tmp_path):
    ckpt = _copy(llama4_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    msg = _error(ckpt)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[16, 64]" in msg and "[32, 64]" in msg


def test_unexpected_tensor_is_named(llama4_dir, tmp_path):
    ckpt = _copy(llama4_dir, tmp_path)
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(8)}))
    assert "unexpected tensor model.layers.0.self_attn.rotary.inv_freq" in _error(ckpt)


def test_unknown_architecture_is_named(llama4_dir, tmp_path):
    ckpt = _copy(llama4_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture MistralForCausalLM" in _error(ckpt)


def test_invalid_config_field_is_named(llama4_dir, tmp_path):
    ckpt = _copy(llama4_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "num_key_value_heads" in _error(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_named(llama4_dir, tmp_path, keep):
    ckpt = _copy(llama4_dir, tmp_path)
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    msg = _error(ckpt)
    assert str(file) in msg and "truncated" in msg


def test_pickled_weights_are_refused(tmp_path, llama4_dir):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    shutil.copy(llama4_dir / "config.json", ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "never loaded" in _error(ckpt)


def test_missing_path_and_config(tmp_path):
    assert "no such checkpoint" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")


@torch.inference_mode()
def _logits(model, n=20):
    ids = torch.arange(3, 3 + n)
    pos = torch.arange(n)
    return model.compute_logits(model(ids, pos, DenseAttention([n], pos)))


def test_save_sharded_round_trip_loads_in_ours_and_transformers(llama4_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = load_model(llama4_dir, dtype="float32", tokenizer=False).model
    out = save_pretrained(original, tmp_path / "saved", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    again = load_model(out, dtype="float32", tokenizer=False).model
    assert torch.equal(_logits(again), _logits(original))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = ref(input_ids=torch.arange(3, 23)[None]).logits[0]
    assert (expected - _logits(original)).abs().max() < 1e-4


def test_dtype_cast_on_load(llama4_dir):
    loaded = load_model(llama4_dir, dtype="bfloat16", tokenizer=False)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.inv_freq.dtype == torch.float32  # RoPE angles stay exact
    assert load_config(llama4_dir).moe_layers == (1, 3)
