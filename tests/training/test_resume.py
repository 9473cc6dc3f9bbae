"""Exact resume: N steps straight and N/2 + checkpoint + a fresh trainer + N/2 give the same loss
at every step (float32, deterministic), with gradient accumulation, activation checkpointing and
the MoE balance loss on, because model, AdamW state, data position and RNG all come back."""

from __future__ import annotations

import torch

from tests.training.conftest import run_config
from training.checkpoint import latest_checkpoint
from training.config import TrainConfig
from training.trainer import Trainer

N = 8


def _config(out, tok_dir, corpus) -> TrainConfig:
    return TrainConfig.from_dict(run_config(
        out, tok_dir, corpus, train={"steps": N, "grad_accum": 2, "activation_checkpointing": True},
        output={"checkpoint_every": N // 2, "resume": "auto"}))


def test_half_resume_half_equals_straight(tmp_path, byte_tokenizer_dir, small_corpus):
    straight = Trainer(_config(tmp_path / "straight", byte_tokenizer_dir, small_corpus))
    all_losses = straight.train().losses
    straight.close()

    out = tmp_path / "resumed"
    first = Trainer(_config(out, byte_tokenizer_dir, small_corpus))
    first_half = first.train(stop_at=N // 2)
    position = first.loader.position
    first.close()
    del first
    assert latest_checkpoint(out).name == f"step_{N // 2:06d}"

    torch.manual_seed(1234)  # a different process state: the checkpoint must bring the RNG back
    rng_at_save = torch.load(latest_checkpoint(out) / "train_state_rank0.pt", weights_only=False)["rng"]["cpu"]
    second = Trainer(_config(out, byte_tokenizer_dir, small_corpus))
    assert second.step == N // 2 and second.loader.position == position
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    second_half = second.train()
    second.close()

    assert first_half.losses + second_half.losses == all_losses  # bit for bit
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    # The resumed run's metrics file reads as one run.
    from training.records import read_metrics

    assert [r["loss"] for r in read_metrics(out)] == all_losses
