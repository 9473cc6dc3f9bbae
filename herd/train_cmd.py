"""`herd train CONFIG`: train or fine-tune a model from a YAML or Python config (docs/training.md).

One process: `herd train tiny`. FSDP2 / tensor parallel: `torchrun --nproc-per-node N -m herd train
CONFIG` with parallel.dp * parallel.tp == N.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML or Python config file, or a shipped config: tiny, scout, maverick, "
                                  "finetune-default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (VALUE in YAML syntax), e.g. --set train.steps=50; repeatable")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and stop after this step (the schedule still spans train.steps); "
                        "running again resumes")
    p.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")


def run(args: argparse.Namespace) -> int:
    from training.config import load_train_config

    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at: must be >= 1, got {args.stop_at}")

    from training.trainer import Trainer

    trainer = Trainer(config)
    try:
        result = trainer.train(stop_at=args.stop_at)
    finally:
        trainer.close()
    if result.history and trainer.ctx.is_main:
        first, last = result.history[0], result.history[-1]
        print(f"step {result.step}/{config.train.steps}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"{last['tokens_per_s']:,.0f} tokens/s, MFU {100 * last['mfu']:.1f}%"
              + (f"; exported {result.export_dir}" if result.export_dir else ""))
    return 0
