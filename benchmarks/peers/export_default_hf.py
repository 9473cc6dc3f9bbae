"""Writes herd's default model (the SmolLM2-135M-Instruct Q4_1 GGUF) as an HF checkpoint dir, so
the peers that read HF checkpoints (vLLM, transformers) run the same weights herd runs.

    .venv/bin/python benchmarks/peers/export_default_hf.py [--out DIR] [--force]

Uses herd's own loader (the GGUF is dequantized to bf16 on load) and save_pretrained (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the chat template), plus a
generation_config.json with the stop ids, which peers read for their defaults.
Default DIR: benchmarks/work/smollm2-135m-instruct-hf (git-ignored). An existing export is kept
unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks/work/smollm2-135m-instruct-hf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="rewrite an existing export")
    args = ap.parse_args()
    if not args.force and (args.out / "model.safetensors").exists() and (args.out / "tokenizer.json").exists():
        print(f"{args.out} exists; leaving it (--force rewrites it)")
        return

    from models.default import default_model_path
    from models.llama4.loader import load_model, save_pretrained

    gguf = default_model_path()
    loaded = load_model(gguf, dtype="bfloat16")
    save_pretrained(loaded.model, args.out, loaded.tokenizer)
    tok = loaded.tokenizer
    stops = sorted(set(loaded.config.eos_token_ids) | set(tok.stop_token_ids))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tok.pad_token_id}
    (args.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    print(f"wrote {args.out} from {gguf}")


if __name__ == "__main__":
    main()
