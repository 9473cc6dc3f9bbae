"""Offline batch throughput: `herd batch` on an OpenAI Batch file, beside herd's engine on the same
requests (serving.LLM, the engine benchmark's runner) and vLLM's `run_batch` on the same file.

    .venv/bin/python benchmarks/batch.py [--requests 1000] [--max-tokens 128] [--runs herd-engine herd-batch vllm]

The file: N chat requests (varied one-line questions, greedy, ignore_eos, max_tokens each) on the
default model. herd batch reads herd's GGUF; vLLM reads the HF export of it (as in throughput.py).
Processing time excludes model load for every run: herd-engine times llm.generate, herd batch
reports its own run time (first line read to last result written), vLLM's run_batch its progress
bar's elapsed time (requests submitted to last response; it writes the output file afterwards).
Wall time including start-up is reported beside it.

Writes benchmarks/results/<date>-batch-<N>x<max_tokens>.md and .json (command, machine, results,
ratios) and a .png chart; raw outputs and logs go to benchmarks/work/batch/<stamp>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from report import bar_chart, md_table, reused_rows, write_results

HF_EXPORT = HERE / "work/smollm2-135m-instruct-hf"
MODEL = "SmolLM2-135M-Instruct"
TASKS = ["Explain", "Write a short story about", "List three facts about", "Describe", "Give advice about",
         "Write a poem about", "Summarise the history of", "Compare cats with", "Teach a child about",
         "Argue for"]
TOPICS = ["the ocean", "volcanoes", "bread", "the moon", "chess", "rain", "libraries", "bicycles", "bees",
          "glaciers", "trains", "music", "gardens", "deserts", "clocks", "honey", "maps", "bridges", "owls",
          "salt", "kites", "coral", "lighthouses", "forests", "mathematics"]


def make_inputs(n: int, max_tokens: int, outdir: Path) -> tuple[Path, Path]:
    """The batch file and the same requests as an engine-benchmark workload."""
    messages = [[{"role": "user", "content": f"{TASKS[i % len(TASKS)]} {TOPICS[(i // len(TASKS)) % len(TOPICS)]}"
                  f" (#{i})."}] for i in range(n)]
    batch = outdir / "requests.jsonl"
    with batch.open("w") as f:
        for i, m in enumerate(messages):
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "messages": m, "max_tokens": max_tokens,
                                         "temperature": 0, "ignore_eos": True}}) + "\n")
    workload = outdir / "workload.json"
    workload.write_text(json.dumps({"name": f"batch-{n}x{max_tokens}", "requests": [{"messages": m} for m in messages],
                                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0,
                                    "dtype": "bfloat16"}))
    return batch, workload


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 7200) -> tuple[int, float]:
    print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout,
                            check=False).returncode
    return rc, time.perf_counter() - t0


def completion_tokens(output: Path) -> tuple[int, int]:
    """(answered requests, generated tokens) in an OpenAI Batch output file."""
    n = tokens = 0
    for line in output.read_text().splitlines():
        obj = json.loads(line)
        if obj.get("error") is None and obj["response"]["status_code"] == 200:
            n += 1
            tokens += obj["response"]["body"]["usage"]["completion_tokens"]
    return n, tokens


def herd_engine(workload: Path, outdir: Path, args) -> dict:
    out = outdir / "herd-engine.json"
    cmd = [str(ROOT / ".venv/bin/python"), str(HERE / "peers/herd_offline.py"), "--model", "default",
           "--workload", str(workload), "--out", str(out), "--repeats", "1", "--memory-utilization", "0.3",
           "--max-model-len", str(args.max_model_len)]
    rc, wall = run(cmd, outdir / "herd-engine.log")
    if rc != 0:
        raise SystemExit(f"herd engine run failed; see {outdir / 'herd-engine.log'}")
    res = json.loads(out.read_text())
    return {"run": "herd-engine", "requests": res["n_requests"], "output_tokens": res["output_tokens"],
            "processing_s": res["elapsed_s"], "wall_s": round(wall, 1), "command": shlex.join(cmd)}


def herd_batch(batch: Path, outdir: Path, args) -> dict:
    out = outdir / "herd-batch-results.jsonl"
    out.unlink(missing_ok=True)
    cmd = [str(ROOT / ".venv/bin/herd"), "batch", "-i", str(batch), "-o", str(out), "--no-progress",
           "--max-model-len", str(args.max_model_len), "--memory-utilization", "0.3"]
    log = outdir / "herd-batch.log"
    rc, wall = run(cmd, log)
    found = re.search(r"; ([\d.]+)s, [\d.]+ generated tokens/s", log.read_text())
    if rc != 0 or not found:
        raise SystemExit(f"herd batch failed; see {log}")
    n, tokens = completion_tokens(out)
    return {"run": "herd-batch", "requests": n, "output_tokens": tokens, "processing_s": float(found[1]),
            "wall_s": round(wall, 1), "command": shlex.join(cmd)}


def vllm_run_batch(batch: Path, outdir: Path, args) -> dict | None:
    py = HERE / ".venv-vllm/bin/python"
    if not py.exists():
        print("vLLM venv missing (bash benchmarks/setup_peers.sh): skipped")
        return None
    out = outdir / "vllm-results.jsonl"
    cmd = [str(py), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch), "-o", str(out),
           "--model", str(HF_EXPORT), "--served-model-name", MODEL, "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len), "--enable-prefix-caching"]
    # as in throughput.py: 1 GiB of KV cache, and no AOT-compile reload (broken in this build)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"}
    log = outdir / "vllm.log"
    rc, wall = run(cmd, log, env)
    bars = re.findall(r"Running batch: +100% Completed \| (\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log.read_text())
    if rc != 0 or not bars:
        print(f"vLLM run_batch failed (rc={rc}); see {log}")
        return None
    _, h, m, s = bars[-1]
    n, tokens = completion_tokens(out)
    return {"run": "vllm-run-batch", "requests": n, "output_tokens": tokens,
            "processing_s": int(h or 0) * 3600 + int(m) * 60 + int(s), "wall_s": round(wall, 1),
            "command": shlex.join(cmd) + "  (env VLLM_CPU_KVCACHE_SPACE=1 VLLM_USE_AOT_COMPILE=0)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--runs", nargs="+", default=["herd-engine", "herd-batch", "vllm"],
                    choices=["herd-engine", "herd-batch", "vllm"])
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier results JSON of the same workload: its rows for the runs not re-run")
    args = ap.parse_args()
    if "vllm" in args.runs and not HF_EXPORT.exists():
        subprocess.run([sys.executable, str(HERE / "peers/export_default_hf.py")], check=True, cwd=ROOT)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    outdir = HERE / "work/batch" / stamp
    outdir.mkdir(parents=True)
    batch, workload = make_inputs(args.requests, args.max_tokens, outdir)
    makers = {"herd-engine": lambda: herd_engine(workload, outdir, args),
              "herd-batch": lambda: herd_batch(batch, outdir, args),
              "vllm": lambda: vllm_run_batch(batch, outdir, args)}
    rows = [r for r in (makers[name]() for name in args.runs) if r is not None]
    for r in rows:
        r["tokens_per_s"] = round(r["output_tokens"] / r["processing_s"], 1)
        print(f"{r['run']}: {r['requests']} requests, {r['output_tokens']} tokens in {r['processing_s']:.1f}s "
              f"= {r['tokens_per_s']} tok/s (wall {r['wall_s']}s)")
    names = {"herd-engine": "herd-engine", "herd-batch": "herd-batch", "vllm": "vllm-run-batch"}
    rows = reused_rows(args.reuse, "run", {names[n] for n in args.runs}) + rows
    by = {r["run"]: r for r in rows}
    ratios = {}
    if "herd-batch" in by:
        for other in ("herd-engine", "vllm-run-batch"):
            if other in by:
                ratios[f"herd-batch / {other}"] = round(by["herd-batch"]["tokens_per_s"] / by[other]["tokens_per_s"], 3)
    name = f"batch-{args.requests}x{args.max_tokens}"
    out, command, info = write_results(name, "batch.py", rows, ratios)
    date = out.name[:10]
    cols = [("run", "run"), ("requests", "requests"), ("output_tokens", "output tokens"),
            ("processing_s", "processing s"), ("tokens_per_s", "tok/s"), ("wall_s", "wall s (with start-up)")]
    md = [f"# Offline batch: {args.requests} chat requests x {args.max_tokens} tokens ({date})", "",
          f"Command: `{command}`", "", f"Machine: {info}", "", md_table(rows, cols), "",
          "Ratios (tok/s): " + ", ".join(f"{k} = {v}" for k, v in ratios.items()), "",
          "Commands:", "", *[f"- {r['run']}: `{r['command']}`" for r in rows], ""]
    png = bar_chart(out.with_suffix(".png"), name, rows, [("tokens_per_s", "generated tok/s")], label="run")
    if png is not None:
        md.insert(-1, f"![chart]({png.name})")
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
