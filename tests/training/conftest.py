"""Shared pieces of the training tests: a byte-level tokenizer, a small slice of the stdlib
corpus, and a tiny Llama 4 run config (MoE top-2 on every other layer, a NoPE layer, chunks of 8
tokens inside 64-token windows)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.parity import tiny_checkpoints as tiny

TINY_LLAMA4 = {"architectures": ["Llama4ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
               "intermediate_size_mlp": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
               "interleave_moe_layer_step": 2, "no_rope_layer_interval": 4, "attention_chunk_size": 8,
               "floor_scale": 4, "attn_scale": 0.5, "max_position_embeddings": 512, "rope_theta": 10000.0}


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byte_tokenizer")
    tiny.save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    from training.corpus import write_docs

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    write_docs(path, max_bytes=60_000)
    return path


@pytest.fixture(scope="session")
def small_chat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [[{"role": "user", "content": f"What is {a} plus {b}?"},
             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}] for a in range(4) for b in range(3)]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def run_config(out_dir: Path, tokenizer_dir: Path, data_path: Path, /, **sections) -> dict:
    """A plain-dict config for the tiny Llama 4; `sections` deep-merge over it."""
    raw = {
        "model": {"config": dict(TINY_LLAMA4), "tokenizer": str(tokenizer_dir)},
        "data": {"paths": [str(data_path)], "seq_len": 64, "batch_size": 2, "seed": 0},
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
        "train": {"steps": 8, "dtype": "float32", "seed": 0, "device": "cpu"},
        "output": {"dir": str(out_dir), "progress": False, "plot": False, "tensorboard": False,
                   "export": False},
    }
    out = copy.deepcopy(raw)
    for section, fields in sections.items():
        out.setdefault(section, {}).update(fields)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' ops are microseconds of work: a second intra-op thread only adds fork/join
    cost, and on a busy 2-core machine a descheduled OpenMP worker stalls every op (20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
