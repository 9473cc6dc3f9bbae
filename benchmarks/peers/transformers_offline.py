"""Offline generation timing with Hugging Face transformers (generate, static left-padded batches).

    .venv/bin/python benchmarks/peers/transformers_offline.py \
        --model CHECKPOINT_DIR --workload W.json --out R.json [--batch-size N]

Runs in herd's own .venv. Requests are split in order into batches of --batch-size (default: all
at once), each left-padded and run through model.generate with greedy decoding; a batch runs
until its longest member is done (no continuous batching). Chat requests are rendered with the
checkpoint's chat template exactly as in vllm_offline.py, outside the timed region.

ignore_eos (vLLM's meaning: do not stop at EOS, but EOS is not banned): generate gets no EOS ids
to stop on (eos_token_id=[]), so every request runs to max_tokens and may emit EOS. This is not
min_new_tokens=max_tokens, which would ban EOS and change the tokens after the point where the
model wants to stop; --ignore-eos-mode min_new_tokens selects that instead.
Without ignore_eos a finished row is cut after its first stop token (kept, as vLLM keeps it).

Timing: one warm-up generate on the first batch (--warmup-tokens tokens), then --repeats timed
runs of all batches in turn.
torch uses all cores (torch.get_num_threads() is recorded).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def extra_args(ap):
    ap.add_argument("--batch-size", type=int, default=None, help="default: all requests at once")
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager (default: HF's)")
    ap.add_argument("--ignore-eos-mode", choices=["no_stop", "min_new_tokens"], default="no_stop")


def main():
    args = _common.parse_args("transformers", "HF Llama checkpoint dir", extra_args)
    workload = _common.load_workload(args.workload)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, workload["dtype"])
    kwargs = {"dtype": dtype}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    load_s = time.perf_counter() - t0

    prompts = [
        r["prompt_token_ids"] if "prompt_token_ids" in r else _common.hf_chat_ids(tok, r["messages"])
        for r in workload["requests"]
    ]
    gen_cfg = model.generation_config
    stop_ids = gen_cfg.eos_token_id
    stop_ids = set([stop_ids] if isinstance(stop_ids, int) else (stop_ids or []))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
        gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else min(stop_ids, default=0))
    max_tokens = workload["max_tokens"]
    ignore_eos = workload["ignore_eos"]
    bs = args.batch_size or len(prompts)
    batches = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]

    def left_pad(idx):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        return ids, mask

    def generate(idx, n):
        ids, mask = left_pad(idx)
        kw = {"max_new_tokens": n, "do_sample": False, "pad_token_id": pad_id,
              "temperature": None, "top_p": None, "top_k": None}
        if ignore_eos and args.ignore_eos_mode == "no_stop":
            kw["eos_token_id"] = []
        elif ignore_eos:
            kw["min_new_tokens"] = n
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        rows = []
        for row in out[:, ids.shape[1]:].tolist():
            if not ignore_eos:
                for j, t in enumerate(row):
                    if t in stop_ids:
                        row = row[: j + 1]
                        break
            rows.append(row)
        return rows

    with _common.Timer() as warm:
        generate(batches[0], min(args.warmup_tokens, max_tokens))

    def run_all():
        return [row for idx in batches for row in generate(idx, max_tokens)]

    runs = _common.Runs(run_all, args.repeats, args.wait_quiet)
    res = _common.result(
        "transformers", transformers.__version__, workload, runs,
        load_s=round(load_s, 2), warmup_s=round(warm.s, 2),
        settings={"batch_size": bs, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "attn_implementation": model.config._attn_implementation,
                  "ignore_eos_mode": args.ignore_eos_mode if ignore_eos else None,
                  "chat": "HF tokenizer chat template -> token ids -> generate"},
        **_common.prompt_fields(prompts),
        texts=[tok.decode(o) for o in runs.outputs],
    )
    _common.write_result(args.out, res)


if __name__ == "__main__":
    main()
