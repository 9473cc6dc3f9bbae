"""Online serving, herd vs vLLM: start each server in turn, run the same loads, write a side-by-side file.

    .venv/bin/python benchmarks/serve_compare.py [--loads rate=inf rate=2 concurrency=1,n=16]
        [--servers herd vllm] [--num-requests 64] [--max-tokens 128] [--ignore-eos]
        [--workload chat-64x128] [--endpoint chat] [--wait-quiet 120]

Both servers serve herd's default model (herd its GGUF, vLLM the HF export of it; see
peers/export_default_hf.py) with the same max_model_len, on 127.0.0.1. Each load is serve.py's
(a Poisson rate in requests/s, `inf` for all at once, and/or a concurrency cap) and runs after
the machine has been quiet (--wait-quiet); other_cores_busy records how busy the rest of the
machine was meanwhile (the servers are this process's children, so they are not counted).
Writes benchmarks/results/<date>-serve-<workload>.md / .json (+ .png with matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import sys
from pathlib import Path

from report import bar_chart, machine_info, md_table
from serve import add_load_arguments, run_load
from servers import HERD_SERVERS, ROOT, Server, _common, available

HERE = Path(__file__).resolve().parent
METRICS = [("request_throughput", None, "req/s"), ("output_throughput", None, "output tok/s")] + [
    (m, p, f"{label} {p} ms") for m, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                                               ("e2e_ms", "E2E"))
    for p in ("p50", "p90", "p99")] + [("errors", None, "errors")]


def parse_load(spec: str) -> dict:
    """'rate=2', 'rate=inf', 'concurrency=1,n=16' (n: this load's --num-requests)."""
    load = {"rate": float("inf"), "concurrency": None}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = "num_requests" if key == "n" else key
        if key not in ("rate", "concurrency", "num_requests") or not value:
            raise SystemExit(f"--loads: bad entry {spec!r} (e.g. rate=2, rate=inf, concurrency=1,n=16)")
        load[key] = float(value) if key == "rate" else int(value)
    return load


def metric(summary: dict, key: str, pct: str | None):
    v = summary.get(key)
    return v.get(pct) if isinstance(v, dict) and pct else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", nargs="+", default=["herd", "vllm"], choices=[*HERD_SERVERS, "vllm"])
    ap.add_argument("--loads", nargs="+", default=["rate=inf", "rate=2", "concurrency=1,n=16"])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS")
    add_load_arguments(ap)
    args = ap.parse_args()
    loads = {spec: parse_load(spec) for spec in args.loads}
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    workdir = HERE / "work/serve" / stamp
    info = {"command": shlex.join([".venv/bin/python", *sys.argv]), "machine": machine_info()}

    runs: dict[str, dict] = {}
    for name in args.servers:
        if not available(name):
            print(f"note: {name} is not set up here; skipping it (bash benchmarks/setup_peers.sh)")
            continue
        server = Server(name, args.port, args.max_model_len, workdir / f"{name}.log")
        print(f"starting {name}: {server.command_line()}", flush=True)
        server.start()
        entry = {"server_command": server.command_line(), "start_s": server.start_s, "loads": {}}
        try:
            for spec, load in loads.items():
                largs = argparse.Namespace(**(vars(args) | load))
                quiet = _common.wait_quiet(args.wait_quiet)
                with _common.Timer() as t:
                    summary = asyncio.run(run_load(largs, server.base_url))
                summary["other_cores_busy"] = t.other_cores
                summary["other_cores_before"] = quiet
                entry["loads"][spec] = summary
                print(f"  {name} {spec}: {summary['request_throughput']} req/s, "
                      f"{summary['output_throughput']} tok/s, TTFT p50 {metric(summary, 'ttft_ms', 'p50')} ms, "
                      f"errors {summary['errors']} {summary['error_samples'][:1]}, "
                      f"other_cores_busy {t.other_cores}", flush=True)
            entry["peak_rss_mb"] = server.peak_rss_mb()
        finally:
            entry["exit_code"] = server.stop()
        runs[name] = entry
    if runs:
        write_report(args, loads, runs, info, stamp)


def write_report(args, loads: dict, runs: dict, info: dict, stamp: str) -> None:
    names = list(runs)
    out = HERE / "results" / f"{stamp[:10]}-serve-{Path(args.workload).stem}"
    out.parent.mkdir(exist_ok=True)
    lines = [f"# Online serving: herd vs vLLM ({Path(args.workload).stem})", "",
             (f"{args.num_requests} streaming {args.endpoint} requests per load (unless the load sets n), max_tokens {args.max_tokens}, "
              f"ignore_eos {args.ignore_eos}, greedy; prompts from workload {args.workload}; model: herd's "
              "default (SmolLM2-135M-Instruct; herd reads the GGUF, vLLM its bf16 HF export). "
              "Loads: rate = Poisson arrivals in requests/s (inf: all at once), concurrency = cap in flight. "
              "Ratios are herd / vLLM (throughput: higher is better for herd; latency: lower is)."), ""]
    herds = [n for n in names if n in HERD_SERVERS] if "vllm" in names else []
    cols = [("metric", "metric")] + [(n, n) for n in names] + [(f"ratio:{n}", f"{n}/vllm") for n in herds]
    for spec in loads:
        rows = []
        for key, pct, label in METRICS:
            row = {"metric": label}
            for n in names:
                row[n] = metric(runs[n]["loads"][spec], key, pct)
            b = row.get("vllm")
            for n in herds:
                a = row.get(n)
                row[f"ratio:{n}"] = round(a / b, 3) if a and b and key != "errors" else None
            rows.append(row)
        busy = ", ".join(f"{n} {runs[n]['loads'][spec]['other_cores_busy']}" for n in names)
        lines += [f"## Load {spec}", "", md_table(rows, cols), "", f"other_cores_busy during the load: {busy}", ""]
        for n in names:
            errs = runs[n]["loads"][spec]["error_samples"]
            if errs:
                lines += [f"{n} errors (first distinct messages):", "", *[f"- `{e}`" for e in errs], ""]
    lines += ["## Servers", "", md_table([{"server": n, "peak_rss_mb": runs[n].get("peak_rss_mb"),
                                           "start_s": runs[n]["start_s"], "exit_code": runs[n]["exit_code"]}
                                          for n in names],
                                         [("server", "server"), ("peak_rss_mb", "peak RSS MB (process tree)"),
                                          ("start_s", "start to healthy, s"), ("exit_code", "exit code on SIGTERM")]),
              "", *[f"- {n}: `{runs[n]['server_command']}`" for n in names], "",
              "## Command", "", "```", info["command"], "```", "",
              "## Machine", "", "```", json.dumps(info["machine"], indent=1), "```", ""]
    chart_rows = [{"engine": f"{n} {spec}", "output_throughput": s["output_throughput"],
                   "ttft_p50": metric(s, "ttft_ms", "p50"), "tpot_p50": metric(s, "tpot_ms", "p50")}
                  for spec in loads for n in names if (s := runs[n]["loads"][spec])]
    png = bar_chart(out.with_suffix(".png"), f"online serving, {Path(args.workload).stem}", chart_rows,
                    [("output_throughput", "output tok/s"), ("ttft_p50", "TTFT p50 ms"),
                     ("tpot_p50", "TPOT p50 ms")])
    if png:
        lines += [f"![chart]({png.name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": info["command"], "machine": info["machine"],
                                                    "servers": runs}, indent=1) + "\n")
    print(f"wrote {out}.md / .json" + (" / .png" if png else ""))
    print("\n".join(lines[:lines.index("## Command")]))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
