"""The step's parts: the MoE balance loss, the schedule, and the equivalences the step promises
(accumulation and activation checkpointing change nothing but speed; bf16 autocast keeps float32
master weights)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.training.conftest import run_config
from training.aux_loss import load_balancing_loss
from training.config import TrainConfig
from training.schedule import lr_at
from training.trainer import Trainer


def test_balance_loss_is_one_when_even_and_e_when_collapsed():
    T, E = 64, 4
    even = torch.zeros(T, E)
    even[torch.arange(T), torch.arange(T) % E] = 1.0  # each expert wins a quarter of the tokens
    assert float(load_balancing_loss(even, top_k=1)) == pytest.approx(1.0, abs=0.05)
    collapsed = torch.full((T, E), -20.0)
    collapsed[:, 0] = 20.0
    assert float(load_balancing_loss(collapsed, top_k=1)) == pytest.approx(E, rel=1e-3)
    # The gradient pushes the overloaded expert's logits down.
    skewed = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    skewed[:, 0] += 2.0
    skewed.requires_grad_(True)
    load_balancing_loss(skewed, top_k=2).backward()
    assert skewed.grad[:, 0].mean() > 0 > skewed.grad[:, 1:].mean()
    # Padding tokens count in neither average.
    valid = torch.zeros(T, dtype=torch.bool)
    valid[: T // 2] = True
    mixed = torch.cat([even[: T // 2], collapsed[T // 2:]])
    assert float(load_balancing_loss(mixed, 1, valid)) == pytest.approx(float(load_balancing_loss(even[: T // 2], 1)))


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def _trainer(tmp_path, tok_dir, corpus, name, **sections) -> Trainer:
    return Trainer(TrainConfig.from_dict(run_config(tmp_path / name, tok_dir, corpus, **sections)))


def _run(trainer: Trainer, steps: int) -> list[float]:
    out = trainer.train(stop_at=steps).losses
    trainer.close()
    return out


def test_accumulation_and_checkpointing_change_nothing_but_speed(tmp_path, byte_tokenizer_dir, small_corpus):
    args = (tmp_path, byte_tokenizer_dir, small_corpus)
    # No balance loss here: it is a product of batch means, so it is not additive over micro-batches.
    whole = _trainer(*args, "whole", data={"batch_size": 4}, train={"aux_loss_coef": 0.0})
    split = _trainer(*args, "split", data={"batch_size": 2},
                     train={"grad_accum": 2, "activation_checkpointing": True, "aux_loss_coef": 0.0})
    assert _run(whole, 3) == pytest.approx(_run(split, 3), abs=1e-5)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_router_logits_are_recorded_once_per_forward_under_checkpointing(tmp_path, byte_tokenizer_dir,
                                                                          small_corpus):
    from training.step import forward_loss

    t = _trainer(tmp_path, byte_tokenizer_dir, small_corpus, "ac", train={"activation_checkpointing": True})
    batch = t.next_batches()[0]
    with t.router.capture() as logits:
        pass
    ce, aux = forward_loss(t.model, batch, t.precision, t.router)
    (ce + aux).backward()  # recomputes the checkpointed layers, hooks and all
    assert len(t.router._logits) == len(t.model_config.moe_layers) == 2
    assert logits == []  # an earlier capture's list is left alone
    assert t.model.layers[1].feed_forward.router.weight.grad.abs().sum() > 0
    t.close()


def test_bf16_autocast_trains_float32_master_weights(tmp_path, byte_tokenizer_dir, small_corpus):
    args = (tmp_path, byte_tokenizer_dir, small_corpus)
    fp32 = _run(_trainer(*args, "fp32"), 3)
    t = _trainer(*args, "bf16", train={"dtype": "bfloat16"})
    bf16 = _run(t, 3)
    assert bf16 == pytest.approx(fp32, abs=0.05)
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in t.optimizer.state.values()} == {torch.float32}
