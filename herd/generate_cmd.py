"""`herd generate PROMPT`: load a model, stream one completion to stdout."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint's, else bfloat16), bfloat16, float32, float16")
    p.add_argument("--quantization", "-q", choices=["int4"], default=None,
                   help="int4: 4-bit weights (Q4_1 scheme, CPU), 8-bit output head; default: none")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat template")
    p.add_argument("--stats", action="store_true", help="report load time and tokens/s on stderr")


def run(args: argparse.Namespace) -> int:

    from models.default import default_model_path
    from models.llama4 import load_model
    from models.llama4.detokenizer import IncrementalDetokenizer
    from models.llama4.generate import generate_tokens

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    t0 = time.perf_counter()
    loaded = load_model(args.model or default_model_path(), dtype=args.dtype,
                        quantization=args.quantization)
    load_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    if args.raw or tok.chat_template is None:
        prompt_ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        prompt_ids = tok.encode_chat(messages, add_generation_prompt=True)

    detok = IncrementalDetokenizer(tok, prompt_ids)
    t1 = time.perf_counter()
    first = None
    n = 0
    for token in generate_tokens(loaded.model, prompt_ids, args.max_tokens, args.temperature,
                                 args.seed, tok.stop_token_ids):
        first = first or time.perf_counter()
        n += 1
        if token in tok.stop_token_ids:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    end = time.perf_counter()
    if args.stats:
        decode_s = end - (first or end)
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
        print(f"[herd] model {loaded.path.name}: {loaded.model.num_parameters() / 1e6:.0f}M params, "
              f"{next(loaded.model.parameters()).dtype}, loaded in {load_s:.2f}s; "
              f"prompt {len(prompt_ids)} tokens, first token after {(first or end) - t1:.3f}s; "
              f"{n} tokens at {rate:.1f} tokens/s", file=sys.stderr)
    return 0
