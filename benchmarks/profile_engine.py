"""Where herd's engine spends a workload's time: torch.profiler over llm.generate, ops ranked by
self CPU time and summed into categories (linear, attention, KV gather/scatter, sampling, rest).

    .venv/bin/python benchmarks/profile_engine.py --workload benchmarks/peers/workloads/chat-64x128.json \
        [--quantization int4] [--dtype bfloat16] [--out benchmarks/results/profile.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORIES = (  # first match wins, on the aten op name
    ("linear (weights)", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "_weight_int4pack_mm",
                          "_weight_int8pack_mm")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("KV gather/scatter", ("aten::index_select", "aten::index_put", "aten::index", "aten::gather")),
    ("sampling", ("aten::sort", "aten::topk", "aten::softmax", "aten::log_softmax", "aten::multinomial",
                  "aten::cumsum", "aten::argmax")),
)


def category(op: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in op for k in keys):
            return name
    return "rest (norms, rope, elementwise, copies)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", type=Path, required=True)
    ap.add_argument("--dtype", default=None, help="default: the workload's")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from serving import LLM, SamplingParams

    w = json.loads(args.workload.read_text())
    llm = LLM(dtype=args.dtype or w.get("dtype", "bfloat16"), quantization=args.quantization,
              max_model_len=1024, memory_utilization=0.3)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": r.get("prompt_token_ids") or tok.encode_chat(r["messages"])}
               for r in w["requests"]]
    params = SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=w.get("ignore_eos", False))
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    llm.engine.blocks.reset_prefix_cache()  # as in a timed run: nothing cached from the warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "herd"))]
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total / 1e6
    total = sum(by_cat.values())
    lines = [f"# Engine profile: {w['name']}",
             "",
             f"Command: `{' '.join(sys.argv)}`  ",
             (f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
              f"threads, torch {torch.__version__}  "),
             (f"{len(prompts)} requests, {tokens} output tokens in {wall:.2f}s ({tokens / wall:.1f} tok/s, "
              "profiler on: slower than a timed run)"),
             "",
             "| category | self CPU s | share |", "|---|---:|---:|"]
    lines += [f"| {c} | {s:.2f} | {s / total:.0%} |" for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Top {args.top} ops by self CPU time:", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), "```"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
