"""Offline generation timing with llama.cpp (llama-cpp-python).

    benchmarks/.venv-llamacpp/bin/python benchmarks/peers/llamacpp_offline.py \
        --model FILE.gguf --workload W.json --out R.json

llama-cpp-python has no continuous batching: requests run one after another, each with greedy
sampling over Llama.generate (the token loop under create_completion). Between requests it keeps
the KV cache of the previous prompt and reuses the longest common prefix (its built-in
single-entry prefix cache), as create_completion would.

Chat requests are rendered with the GGUF's own chat template (metadata tokenizer.chat_template,
through llama-cpp-python's Jinja2ChatFormatter, add_generation_prompt) and tokenized with
special tokens parsed and no BOS added (the template writes its own), outside the timed region.

ignore_eos (vLLM's meaning): the loop does not stop at an end-of-generation token, so the EOS is
kept in the output and generation goes on to max_tokens. Without ignore_eos it stops at any EOG
token of the vocab (llama_vocab_is_eog), keeping that token, as vLLM does.

Timing: one warm-up request (the first one, --warmup-tokens tokens); then, --repeats times, the
model state is reset (so the first request finds no cached prefix) and all requests are timed in
turn. per_request_s is from the first timed run.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def extra_args(ap):
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=None,
                    help="default: the longest prompt + max_tokens, rounded up to 256")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--warmup-tokens", type=int, default=4)


def chat_ids(llm, formatter, messages) -> list[int]:
    prompt = formatter(messages=messages).prompt
    return llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


def run_one(llm, prompt: list[int], max_tokens: int, ignore_eos: bool, llama_cpp) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
        out.append(tok)
        if len(out) >= max_tokens:
            break
        if not ignore_eos and llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            break
    return out


def main():
    args = _common.parse_args("llama.cpp", "GGUF file", extra_args)
    workload = _common.load_workload(args.workload)
    if workload["dtype"] != "bfloat16":
        print(f"note: dtype {workload['dtype']} ignored; llama.cpp computes in the GGUF's types",
              file=sys.stderr)

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    t0 = time.perf_counter()
    # The context is sized for the prompts, so they are tokenized first, by a vocab-only instance.
    vocab = llama_cpp.Llama(str(args.model), vocab_only=True, verbose=False)
    template = vocab.metadata.get("tokenizer.chat_template")
    formatter = None
    if template is not None:
        eos, bos = vocab.token_eos(), vocab.token_bos()
        formatter = Jinja2ChatFormatter(
            template,
            eos_token=vocab._model.token_get_text(eos) if eos != -1 else "",
            bos_token=vocab._model.token_get_text(bos) if bos != -1 else "",
        )
    prompts = []
    for i, r in enumerate(workload["requests"]):
        if "prompt_token_ids" in r:
            prompts.append(r["prompt_token_ids"])
        elif formatter is None:
            raise SystemExit(f"requests[{i}].messages: {args.model} has no chat template")
        else:
            prompts.append(chat_ids(vocab, formatter, r["messages"]))
    del vocab

    max_tokens = workload["max_tokens"]
    n_ctx = args.n_ctx or -(-(max(map(len, prompts)) + max_tokens) // 256) * 256
    llm = llama_cpp.Llama(str(args.model), n_ctx=n_ctx, n_batch=args.n_batch,
                          n_threads=args.n_threads, n_threads_batch=args.n_threads,
                          seed=0, verbose=False)
    load_s = time.perf_counter() - t0

    with _common.Timer() as warm:
        run_one(llm, prompts[0], min(args.warmup_tokens, max_tokens), workload["ignore_eos"],
                llama_cpp)

    per_request_s = []

    def run_all():
        outs, times = [], []
        for p in prompts:
            t = time.perf_counter()
            outs.append(run_one(llm, p, max_tokens, workload["ignore_eos"], llama_cpp))
            times.append(round(time.perf_counter() - t, 4))
        per_request_s.append(times)
        return outs

    runs = _common.Runs(run_all, args.repeats, args.wait_quiet, before=llm.reset)
    res = _common.result(
        "llama.cpp", f"llama-cpp-python {llama_cpp.__version__}", workload, runs,
        note="llama-cpp-python has no continuous batching: requests run one at a time",
        load_s=round(load_s, 2), warmup_s=round(warm.s, 2),
        settings={"n_threads": args.n_threads, "n_ctx": n_ctx, "n_batch": args.n_batch,
                  "gguf": str(args.model),
                  "chat": "GGUF chat template (Jinja2ChatFormatter) -> tokenize(special=True)"},
        per_request_s=per_request_s[0],
        **_common.prompt_fields(prompts),
        texts=[llm.detokenize(o).decode("utf-8", errors="replace") for o in runs.outputs],
    )
    _common.write_result(args.out, res)


if __name__ == "__main__":
    main()
