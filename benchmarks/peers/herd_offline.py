"""Offline generation timing with herd (serving.LLM), in herd's own .venv.

    .venv/bin/python benchmarks/peers/herd_offline.py --model default|CHECKPOINT --workload W.json --out R.json

--model default is the built-in default model (the GGUF herd ships; models/default.py finds it).
Chat requests are rendered with the model's own chat template (herd's Tokenizer.encode_chat: the
template writes its special tokens, none are added on top -- what llm.chat does, and the same ids
the HF-tokenizer peers get; prompt_ids_sha256 in the result lets a driver check that) and the
token ids are passed to llm.generate, outside the timed region.

Timing: the engine is built and warmed up once with the whole workload at --warmup-tokens output
tokens; then, --repeats times, its prefix cache is emptied and llm.generate(all requests) is
timed (continuous batching with prefix caching on, as in vllm_offline.py).
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import _common


def extra_args(ap):
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--memory-utilization", type=float, default=0.3,
                    help="fraction of total memory for weights + activations + KV cache")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the longest prompt + max_tokens, rounded up to 256")
    ap.add_argument("--compile", action="store_true",
                    help="compile the decode step (herd's C++ step where the model allows, else torch.compile)")
    ap.add_argument("--dtype", default=None, help="default: the workload's (with --quantization int4 "
                    "pass auto: float32 activations)")
    ap.add_argument("--quantization", default=None, help="e.g. int4 (herd's weight-only int4 on CPU)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the activations' dtype), bfloat16, float32")
    ap.add_argument("--warmup-tokens", type=int, default=4)


def main():
    args = _common.parse_args("herd", "'default' (the built-in default model), a .gguf file or an "
                              "HF checkpoint dir", extra_args)
    workload = _common.load_workload(args.workload)

    import torch

    import serving
    from models.default import default_model_path
    from serving import LLM, SamplingParams

    model = default_model_path() if str(args.model) == "default" else args.model
    from models.llama4.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(model) if model.suffix == ".gguf" else Tokenizer.from_dir(model)
    prompts = [r["prompt_token_ids"] if "prompt_token_ids" in r else tok.encode_chat(r["messages"])
               for r in workload["requests"]]
    max_tokens = workload["max_tokens"]
    max_len = args.max_model_len or -(-(max(map(len, prompts)) + max_tokens) // 256) * 256
    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype=args.dtype or workload["dtype"], max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              memory_utilization=args.memory_utilization, enable_prefix_caching=True,
              seed=0, quantization=args.quantization, compile=args.compile, kv_cache_dtype=args.kv_cache_dtype)
    load_s = time.perf_counter() - t0

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=workload["ignore_eos"])

    token_prompts = [{"prompt_token_ids": p} for p in prompts]
    with _common.Timer() as warm:
        llm.generate(token_prompts, params(min(args.warmup_tokens, max_tokens)), use_tqdm=False)

    first = []

    def run_all():
        outs = llm.generate(token_prompts, params(max_tokens), use_tqdm=False)
        if not first:
            first.extend(outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    stats = llm.engine.get_stats()
    runs = _common.Runs(run_all, args.repeats, args.wait_quiet,
                        before=llm.engine.blocks.reset_prefix_cache)
    blocks = llm.engine.blocks
    res = _common.result(
        "herd", getattr(serving, "__version__", None) or _herd_version(), workload, runs,
        load_s=round(load_s, 2), warmup_s=round(warm.s, 2),
        settings={"model": str(model), "max_model_len": max_len, "max_num_seqs": args.max_num_seqs,
                  "max_num_batched_tokens": args.max_num_batched_tokens,
                  "memory_utilization": args.memory_utilization, "num_kv_blocks": stats.num_kv_blocks,
                  "enable_prefix_caching": True, "compile": args.compile, "quantization": args.quantization, "torch": torch.__version__,
                  "threads": torch.get_num_threads(),
                  "chat": "model chat template (Tokenizer.encode_chat) -> token ids -> llm.generate"},
        prefix_cache_hit_rate_all_runs=round(blocks.stats.hit_rate, 3),  # warm-up included
        **_common.prompt_fields(prompts),
        finish_reasons=[o.outputs[0].finish_reason for o in first],
        texts=[o.outputs[0].text for o in first],
    )
    _common.write_result(args.out, res)


def _herd_version() -> str:
    import subprocess
    from importlib import metadata
    try:
        v = metadata.version("herd")
    except metadata.PackageNotFoundError:
        v = "?"
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         check=False, capture_output=True, text=True).stdout.strip()
    return f"{v} ({sha})" if sha else v


if __name__ == "__main__":
    main()
