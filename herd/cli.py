"""`herd <command>`: parse arguments and hand over to the command's module (imported lazily,
so `herd generate` never imports what `herd train` needs)."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module with add_arguments(parser) and run(args) -> exit code
COMMANDS = {
    "serve": ("herd.serve_cmd", "serve a model over OpenAI-compatible HTTP and gRPC"),
    "batch": ("herd.batch_cmd", "run an OpenAI Batch file (JSONL) of requests, resumably"),
    "generate": ("herd.generate_cmd", "generate text from a prompt on one model, in-process"),
    "train": ("herd.train_cmd", "train or fine-tune a model from a config (YAML or Python)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd", description="Serve, batch and train Llama 4.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text,
                                                                     description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError: one line, no traceback
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
