"""Structured outputs: a chat batch with every other request held to a JSON schema, against the same
batch unconstrained, in herd and in vLLM-CPU, side by side (target: herd's mixed batch under 10%
slower than its unconstrained one).

    .venv/bin/python benchmarks/structured.py [--requests 64] [--max-tokens 128]

Each engine runs benchmarks/peers/structured_offline.py in its own venv. Writes
benchmarks/results/<date>-structured-<N>x<max_tokens>.md and .json; logs go to
benchmarks/work/structured/<stamp>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from report import md_table, reused_rows, write_results

HF_EXPORT = HERE / "work/smollm2-135m-instruct-hf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", nargs="+", default=["herd", "vllm"], choices=["herd", "vllm"])
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier results JSON of the same workload: its rows for the engines not re-run")
    args = ap.parse_args()
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    outdir = HERE / "work/structured" / stamp
    outdir.mkdir(parents=True)
    runner = HERE / "peers/structured_offline.py"
    engines = {"herd": [str(ROOT / ".venv/bin/python"), str(runner), "--engine", "herd"]}
    vllm_py = HERE / ".venv-vllm/bin/python"
    if vllm_py.exists():
        if not HF_EXPORT.exists():
            subprocess.run([sys.executable, str(HERE / "peers/export_default_hf.py")], check=True, cwd=ROOT)
        engines["vllm"] = [str(vllm_py), str(runner), "--engine", "vllm", "--model", str(HF_EXPORT)]
    else:
        print("vLLM venv missing (bash benchmarks/setup_peers.sh): herd only")
    rows = reused_rows(args.reuse, "engine", set(args.engines))
    for name, cmd in engines.items():
        if name not in args.engines:
            continue
        out = outdir / f"{name}.json"
        cmd = [*cmd, "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--out", str(out)]
        print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
        with (outdir / f"{name}.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
        if rc != 0:
            print(f"{name} failed; see {outdir / f'{name}.log'}")
            continue
        res = json.loads(out.read_text())
        free, matched, mixed = res["unconstrained"], res["matched"], res["half_schema"]
        rows.append({"engine": name, "mixed_tok_s": mixed["tokens_per_s"], "matched_tok_s": matched["tokens_per_s"],
                     "mixed_vs_matched": round(mixed["tokens_per_s"] / matched["tokens_per_s"], 3),
                     "free_tok_s": free["tokens_per_s"],
                     "mixed_vs_free": round(mixed["tokens_per_s"] / free["tokens_per_s"], 3),
                     "valid_json": f"{mixed['valid_json']}/{res['constrained_requests']}",
                     "mixed_tokens": mixed["output_tokens"], "free_tokens": free["output_tokens"],
                     "command": shlex.join(cmd)})
    by = {r["engine"]: r for r in rows}
    ratios = {}
    if "herd" in by and "vllm" in by:
        ratios = {"herd/vllm half-schema": round(by["herd"]["mixed_tok_s"] / by["vllm"]["mixed_tok_s"], 3),
                  "herd/vllm matched": round(by["herd"]["matched_tok_s"] / by["vllm"]["matched_tok_s"], 3),
                  "herd/vllm unconstrained": round(by["herd"]["free_tok_s"] / by["vllm"]["free_tok_s"], 3)}
    out, command, info = write_results(f"structured-{args.requests}x{args.max_tokens}", "structured.py", rows, ratios)
    date = out.name[:10]
    cols = [("engine", "engine"), ("mixed_tok_s", "half-schema tok/s"), ("matched_tok_s", "matched tok/s"),
            ("mixed_vs_matched", "half-schema / matched"), ("free_tok_s", "unconstrained tok/s"),
            ("mixed_vs_free", "half-schema / unconstrained"), ("valid_json", "valid JSON"),
            ("mixed_tokens", "tokens (half-schema = matched)"), ("free_tokens", "tokens (unconstrained)")]
    md = [(f"# Structured outputs: {args.requests} chats x {args.max_tokens} tokens, every other one with a "
          f"JSON schema ({date})"), "", f"Command: `{command}`", "", f"Machine: {info}", "", md_table(rows, cols), "",
          "Ratios: " + (", ".join(f"{k} = {v}" for k, v in ratios.items()) or "-"), "",
          ("Constrained requests stop when their JSON is complete, so the half-schema batch generates fewer "
           "tokens than the unconstrained one (128 each) and its batch thins out early. \"matched\" runs the "
           "same batch unconstrained with each request held to its half-schema length: the same tokens and "
           "batch sizes, so half-schema / matched is what the masks cost (the target: >= 0.9)."), "",
          "Commands:", "", *[f"- {r['engine']}: `{r['command']}`" for r in rows], ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
