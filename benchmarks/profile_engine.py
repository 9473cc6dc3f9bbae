"""Where herd's engine spends a workload's time: torch.profiler over llm.generate, ops ranked by
self CPU time and summed into categories (linear, attention, KV gather/scatter, sampling, the
compiled graph's fused kernels and its runtime, herd's C++ decode step, rest), plus the Python that
runs outside any op.

    .venv/bin/python benchmarks/profile_engine.py --workload benchmarks/peers/workloads/chat-64x128.json \
        [--quantization int4] [--dtype bfloat16] [--enforce-eager] [--out benchmarks/results/profile.md]

Like `LLM(...)`, the decode step is compiled unless --enforce-eager: herd's C++ step where the
model allows it, else torch.compile, whose C++ kernels are then profiled one by one (inductor's
enable_kernel_profile). The profiler adds a
few microseconds to every op: shares are the point, not the wall time.
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

from serving.engine.native_decode import PROFILE_NAME

CATEGORIES = (  # first match wins, on the op name (a fused kernel's name lists the ops it fused)
    ("compiled fused kernels (norms, rope, KV write/gather, SiLU)", ("cpp_fused_",)),
    ("herd's C++ decode step outside ATen (norms, RoPE, KV write, attention, SiLU)", (PROFILE_NAME,)),
    ("linear (weights)", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "_weight_int4pack_mm",
                          "int4mm_packed", "_weight_int8pack_mm")),
    ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("KV gather/scatter", ("aten::index_select", "aten::index_put", "aten::index", "aten::gather")),
    ("sampling", ("aten::sort", "aten::topk", "aten::softmax", "aten::log_softmax", "aten::multinomial",
                  "aten::cumsum", "aten::argmax")),
    ("torch.compile runtime (guards, input prep, graph wrapper)",
     ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher", "CompiledFxGraph",
      "Torch-Compiled Region")),
)
OUTSIDE = "Python outside any op (engine loop, scheduling, batch building)"


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
    ap.add_argument("--enforce-eager", action="store_true", help="profile the eager decode step")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = ap.parse_args()

    import torch
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True

    from serving import LLM, SamplingParams

    w = json.loads(args.workload.read_text())
    llm = LLM(dtype=args.dtype or w.get("dtype", "bfloat16"), quantization=args.quantization,
              max_model_len=1024, memory_utilization=0.3, enforce_eager=args.enforce_eager)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": r.get("prompt_token_ids") or tok.encode_chat(r["messages"])}
               for r in w["requests"]]
    params = SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=w.get("ignore_eos", False))
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    llm.engine.blocks.reset_prefix_cache()  # as in a timed run: nothing cached from the warm-up
    steps, step = 0, llm.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counted_step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    by_cat: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():  # self times are exclusive: they add up to the time inside ops
        by_cat[category(e.key)] += e.self_cpu_time_total / 1e6
    by_cat[OUTSIDE] = max(0.0, wall - sum(by_cat.values()))
    total = sum(by_cat.values())
    lines = [f"# Engine profile: {w['name']}",
             "",
             f"Command: `{' '.join(sys.argv)}`  ",
             (f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
              f"threads, torch {torch.__version__}  "),
             (f"{len(prompts)} requests, {tokens} output tokens in {steps} engine steps, {wall:.2f}s "
              f"({tokens / wall:.1f} tok/s, {1e3 * wall / steps:.1f} ms per step; profiler on: slower than a "
              "timed run)"),
             decode_note(llm, args.enforce_eager),
             "",
             "| category | self CPU s | ms per step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {c} | {s:.2f} | {1e3 * s / steps:.2f} | {s / total:.0%} |"
              for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Top {args.top} ops by self CPU time:", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), "```"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


def decode_note(llm, eager: bool) -> str:
    if eager:
        return "Decode step eager."
    if llm.engine.runner.native is not None:
        return "Decode step: herd's C++ step (serving/engine/native_decode.py)."
    return ("Decode step: torch.compile. The profiler's own cost of recording each op the compiled graph calls "
            "lands in the graph wrapper's self time: its row is an upper bound.")


if __name__ == "__main__":
    main()
