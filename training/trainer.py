"""A training run from its config: build the model, data and optimiser, resume, step, checkpoint,
record, export. Parallelism, activation checkpointing, mixed precision and the MoE balance loss
are all applied to the shared Llama4Model from outside.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.activation_checkpoint import apply_activation_checkpointing
from training.aux_loss import RouterLogits
from training.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.corpus import materialise as materialise_data
from training.distributed import DistContext, setup, teardown
from training.documents import read_documents
from training.export import export_hf
from training.flops import peak_flops, train_flops
from training.loader import BatchLoader
from training.model_setup import (
    load_checkpoint_model,
    load_training_tokenizer,
    materialise,
    model_config_from_fields,
    new_model_on_meta,
)
from training.optim import build_optimizer
from training.packing import IGNORE, Batch, PackedWindows
from training.precision import Precision
from training.records import Records, plot_loss
from training.schedule import lr_at
from training.step import evaluate_loss, train_step

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RunResult:
    step: int  # the step the run stopped at
    history: list[dict[str, Any]] = field(default_factory=list)  # this call's metrics records
    export_dir: Path | None = None
    checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        cfg = config
        self.ctx: DistContext = setup(cfg.parallel, cfg.train.device)
        self.out_dir = Path(cfg.output.dir)
        self.device = self.ctx.device
        self.dtype = _DTYPES[cfg.train.dtype]
        torch.manual_seed(cfg.train.seed)

        if cfg.model.checkpoint is not None:
            model, self.tokenizer = load_checkpoint_model(cfg.model, self.device)
            on_meta = False
        else:
            self.tokenizer = self._main_first(lambda: load_training_tokenizer(cfg.model.tokenizer))
            model = new_model_on_meta(model_config_from_fields(cfg.model.config, self.tokenizer))
            on_meta = True
        self.model_config = model.config
        if cfg.data.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is past the model's max_position_embeddings "
                              f"({self.model_config.max_position_embeddings})")
        self.windows = self._load_data()

        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.ctx.distributed:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            from training.parallelize import parallelize

            # bf16 FSDP2 gathers bf16 copies of the float32 shards (half the traffic); gradients are
            # reduced in float32. Inputs are left alone: a layer's RoPE frequencies must stay float32.
            policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
            model = parallelize(model, self.ctx.mesh, fsdp=cfg.parallel.dp > 1, tp=cfg.parallel.tp > 1,
                                mp_policy=policy)
        if on_meta:
            materialise(model, self.device, cfg.model.init_std, cfg.train.seed)
        self.model = model.train()
        self.precision = Precision(model, self.dtype, self.device.type)
        self.router = RouterLogits(model) if self.model_config.is_moe else None
        self.optimizer = build_optimizer(model, cfg.optim, self.device.type)
        self.loader = BatchLoader(self.windows, cfg.data.batch_size, cfg.data.seed, self.ctx.dp_rank,
                                  self.ctx.dp_size)
        self.step = 0
        self.resumed_from = self._resume()

    # ---- set-up ----------------------------------------------------------------------------------

    def _load_data(self) -> PackedWindows:
        cfg = self.config.data
        paths = self._main_first(lambda: [materialise_data(p) for p in cfg.paths])
        docs = [d for p in paths for d in read_documents(p, cfg.kind, self.tokenizer, cfg.text_field)]
        tok = self.tokenizer
        pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        windows = PackedWindows(docs, cfg.seq_len, pad, cfg.seed)
        if windows.num_labels() == 0:
            raise ConfigError(f"data.paths: no token to train on in {', '.join(cfg.paths)} "
                              "(chat data without assistant turns?)")
        self.note(f"data: {len(docs)} documents, {windows.num_real_tokens:,} tokens, {len(windows)} windows of "
                  f"{cfg.seq_len}, {windows.num_labels():,} label tokens")
        return windows

    def _main_first(self, make):
        """make() on rank 0, then on the others: what it writes to disk (the builtin corpus and
        tokenizer) is written once, by one process."""
        if self.ctx.is_main:
            value = make()
        self.ctx.barrier()
        return value if self.ctx.is_main else make()

    def _resume(self) -> Path | None:
        choice = self.config.output.resume
        if choice == "never":
            return None
        path = latest_checkpoint(self.out_dir) if choice == "auto" else Path(choice)
        if path is None:
            return None
        state = load_checkpoint(path, self.model, self.optimizer, self.ctx)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.note(f"resumed from {path} at step {self.step}")
        return path

    def note(self, text: str) -> None:
        if self.ctx.is_main:
            import sys

            print(f"[herd train] {text}", file=sys.stderr)

    # ---- running ---------------------------------------------------------------------------------

    def next_batches(self) -> list[Batch]:
        return [self.loader.next_batch().to(self.device) for _ in range(self.config.train.grad_accum)]

    def train(self, stop_at: int | None = None) -> RunResult:
        """Steps until train.steps (or `stop_at`), checkpointing every output.checkpoint_every steps
        and at the stop; exports at the end of the schedule when output.export."""
        cfg = self.config
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        result = RunResult(step=self.step)
        if self.step >= end:
            return result
        records = Records(self.out_dir, cfg.train.steps, self.step, progress=cfg.output.progress,
                          tensorboard=cfg.output.tensorboard) if self.ctx.is_main else None
        peak, peak_source = peak_flops(self.device, self.dtype, cfg.output.peak_tflops)
        self.note(f"model: {self.model_config.architecture}, {sum(p.numel() for p in self.model.parameters()):,} "
                  f"parameters on {self.device} ({cfg.train.dtype} compute); MFU against "
                  f"{peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
        started = time.perf_counter()
        try:
            while self.step < end:
                batches = self.next_batches()
                lr = lr_at(self.step, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.train.steps,
                           cfg.schedule.min_lr_ratio)
                t0 = time.perf_counter()
                out = train_step(self.model, self.optimizer, batches, lr, precision=self.precision,
                                 router=self.router, aux_coef=cfg.train.aux_loss_coef,
                                 grad_clip=cfg.optim.grad_clip, ctx=self.ctx)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.step += 1
                if not math.isfinite(out.loss):
                    raise FloatingPointError(f"step {self.step}: loss is {out.loss}; lower optim.lr or "
                                             "raise schedule.warmup_steps")
                flops = sum(train_flops(self.model_config, b.seq_lens) for b in batches) * self.ctx.dp_size
                record = {"step": self.step, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                          "tokens": out.tokens, "tokens_per_s": out.tokens / dt,
                          "mfu": flops / (dt * peak * self.ctx.world_size), "step_time_s": dt,
                          "epoch": self.loader.epoch, "elapsed_s": time.perf_counter() - started}
                if out.aux_loss is not None:
                    record["aux_loss"] = out.aux_loss
                result.history.append(record)
                if records is not None:
                    if self.step % cfg.output.log_every == 0 or self.step == end:
                        records.log(record)
                    records.progress(self.step, out.loss, record["tokens_per_s"], record["mfu"])
                every = cfg.output.checkpoint_every
                if (every and self.step % every == 0) or self.step == end:
                    result.checkpoint = self.save()
        finally:
            if records is not None:
                records.close()
        result.step = self.step
        if self.step == cfg.train.steps:
            if cfg.output.export:
                result.export_dir = self.export(self.out_dir / "export")
            if cfg.output.plot and self.ctx.is_main:
                plot_loss(self.out_dir)
        return result

    def save(self) -> Path:
        path = checkpoint_dir(self.out_dir, self.step)
        return save_checkpoint(path, self.model, self.optimizer,
                               {"step": self.step, "loader": self.loader.state_dict()}, self.ctx)

    def export(self, out_dir: Path) -> Path | None:
        path = export_hf(self.model, self.tokenizer, out_dir, self.ctx)
        if path is not None:
            self.note(f"exported {path} (herd serve --model {path})")
        return path

    def evaluate(self, max_windows: int | None = None) -> float:
        """Mean loss per label token over the data's windows in order (no shuffle, no update)."""
        n = len(self.windows) if max_windows is None else min(max_windows, len(self.windows))
        per_step = self.config.data.batch_size * self.ctx.dp_size
        batches = []
        for first in range(0, n, per_step):
            mine = list(range(first, min(n, first + per_step)))
            block = mine[self.ctx.dp_rank * self.config.data.batch_size:][:self.config.data.batch_size]
            batch = self.windows.batch(block or [0])
            if not block:  # every rank runs as many forwards (FSDP2 gathers in each); this one counts nothing
                batch.labels_T.fill_(IGNORE)
            batches.append(batch.to(self.device))
        return evaluate_loss(self.model, batches, self.precision, self.ctx)

    def close(self) -> None:
        self.precision.remove()
        if self.router is not None:
            self.router.remove()
        teardown(self.ctx)
