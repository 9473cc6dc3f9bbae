"""`herd batch -i requests.jsonl -o results.jsonl`: an OpenAI Batch file through one in-process
engine or Ray replicas (--replicas); rerun the same command after a kill to resume."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from herd.engine_args import add_cluster_arguments, add_engine_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, type=Path, help="OpenAI Batch input file (JSONL)")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="results (JSONL, appended; lines already there are not redone)")
    p.add_argument("--errors", type=Path, default=None,
                   help="failed lines go here (default: into the output file, with `error` set)")
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the model id bodies name")
    p.add_argument("--max-in-flight", type=int, default=1024,
                   help="requests handed to the engine ahead of completion (keeps batches full)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_cluster_arguments(p)
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from herd.engine_args import make_client, validate
    from serving.batch.runner import EngineGone, run_batch

    if args.max_in_flight < 1:
        raise ValueError(f"max_in_flight: must be >= 1, got {args.max_in_flight}")
    if not args.input.is_file():
        raise ValueError(f"input: {args.input} is not a file")
    config = validate(args)
    client = make_client(args, config, inline=True)
    try:
        counts = asyncio.run(run_batch(client, args.input, args.output, args.errors,
                                       max_in_flight=args.max_in_flight, progress=args.progress))
    except EngineGone as e:
        print(f"herd batch: the engine stopped serving ({e}); rerun the same command to resume",
              file=sys.stderr)
        return 1
    finally:
        client.shutdown()
    print(f"herd batch: {counts.summary()}", file=sys.stderr)
    return 0
