"""Fine-tuning the built-in model (SmolLM2-135M-Instruct) on a small chat set lowers its loss on
that set, and the result is served by herd serve."""

from __future__ import annotations

import pytest

from training.config import load_train_config
from training.trainer import Trainer


@pytest.mark.slow
def test_finetune_default_lowers_its_loss_and_is_served(tmp_path, small_chat):
    from tests.training.test_train_tiny import serve_and_chat

    cfg = load_train_config("finetune-default", [
        f"data.paths=[{small_chat}]", "data.seq_len=64", "data.batch_size=2", "train.steps=6",
        "train.grad_accum=1", "train.activation_checkpointing=false", "optim.lr=1e-4",
        "schedule.warmup_steps=1", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "output.plot=false", "output.tensorboard=false"])
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    trainer.close()
    assert after < before - 0.3, (before, after)
    answer = serve_and_chat(result.export_dir, "What is 2 plus 3?")
    assert answer.strip()
