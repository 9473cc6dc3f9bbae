"""Offline throughput: herd and each available peer on the same workload and model, one after another.

    .venv/bin/python benchmarks/throughput.py [--workload chat-64x128 prefix-64x64 chat-1x256]
        [--engines herd vllm llamacpp transformers] [--repeats 3] [--wait-quiet 120]

Each engine runs as its own subprocess in its own venv (benchmarks/peers/*_offline.py; vLLM in
benchmarks/.venv-vllm, llama.cpp in benchmarks/.venv-llamacpp, herd and transformers in .venv);
an engine whose venv is missing is skipped with a note (bash benchmarks/setup_peers.sh makes them).
Model: herd's default model. herd and llama.cpp read its GGUF; vLLM and transformers read the HF
export of it (benchmarks/peers/export_default_hf.py, run here if the export is missing).
An engine run whose timed region saw other processes use more than --busy-threshold cores is
retried (--retries); the least disturbed attempt is kept.

Writes benchmarks/results/<date>-throughput-<workload>.md and .json (command, machine, versions,
results, herd/peer ratios, token agreement with herd) and a .png bar chart when matplotlib is
installed. Raw runner outputs and logs go to benchmarks/work/throughput/<stamp>/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
sys.path.insert(0, str(PEERS))
import _common
from report import bar_chart, machine_info, md_table

HF_EXPORT = HERE / "work/smollm2-135m-instruct-hf"
HERD_VARIANTS = {  # name -> herd_offline.py options
    "herd": [],
    "herd-compile": ["--compile"],
    # the GGUF's own 4-bit codes, float32 activations (bf16 matmuls)
    "herd-int4": ["--quantization", "int4", "--dtype", "auto"],
    "herd-int4-compile": ["--quantization", "int4", "--dtype", "auto", "--compile"],
    # the same with a bfloat16 KV cache (half the float32 one)
    "herd-int4-compile-kv16": ["--quantization", "int4", "--dtype", "auto", "--compile", "--kv-cache-dtype",
                               "bfloat16"],
}
PEER_ENGINES = ("vllm", "llamacpp", "transformers")
ENGINES = (*HERD_VARIANTS, *PEER_ENGINES)


def engine_command(engine: str, gguf: Path) -> list[str] | None:
    """The runner's command line without its common arguments, or None when unavailable."""
    herd_py = ROOT / ".venv/bin/python"
    if engine in HERD_VARIANTS:
        return [str(herd_py), str(PEERS / "herd_offline.py"), "--model", "default", *HERD_VARIANTS[engine]]
    if engine == "transformers":
        if importlib.util.find_spec("transformers") is None:
            return None
        return [str(herd_py), str(PEERS / "transformers_offline.py"), "--model", str(HF_EXPORT)]
    if engine == "vllm":
        py = HERE / ".venv-vllm/bin/python"
        # 1 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE), far more than any workload here needs; left
        # unset, vLLM-CPU sizes it from gpu_memory_utilization and its RSS grows by GiBs.
        return [str(py), str(PEERS / "vllm_offline.py"), "--model", str(HF_EXPORT),
                "--kv-cache-gib", "1"] if py.exists() else None
    if engine == "llamacpp":
        py = HERE / ".venv-llamacpp/bin/python"
        return [str(py), str(PEERS / "llamacpp_offline.py"), "--model", str(gguf)] if py.exists() else None
    raise ValueError(engine)


def reused(engine: str, workload: Path, args) -> dict | None:
    """The least disturbed result of an earlier run in --reuse DIR, if it is under --busy-threshold."""
    if args.reuse is None:
        return None
    found = [json.loads(f.read_text()) | {"reused_from": str(f.resolve().relative_to(ROOT))}
             for f in sorted(args.reuse.glob(f"{engine}-{workload.stem}-*.json"))]
    found = [r for r in found if (r.get("other_cores_busy") or 0.0) <= args.busy_threshold]
    if not found:
        return None
    best = min(found, key=lambda r: r.get("other_cores_busy") or 0.0)
    best["engine"] = engine
    log = Path(ROOT / best["reused_from"]).with_suffix(".log")
    best["command"] = f"(reused {best['reused_from']}; log {log.relative_to(ROOT)})"
    print(f"reusing {best['reused_from']}: {best['tokens_per_s']} tok/s")
    return best


def run_engine(engine: str, cmd: list[str], workload: Path, outdir: Path, args) -> dict | None:
    best = reused(engine, workload, args)
    if best is not None:
        return best
    for attempt in range(1 + args.retries):
        out = outdir / f"{engine}-{workload.stem}-{attempt}.json"
        log = outdir / f"{engine}-{workload.stem}-{attempt}.log"
        full = cmd + ["--workload", str(workload), "--out", str(out), "--repeats", str(args.repeats),
                      "--wait-quiet", str(args.wait_quiet)]
        print(f"[{time.strftime('%H:%M:%S')}] {engine} {workload.stem} attempt {attempt + 1}", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as f:
            try:
                rc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0 or not out.exists():
            print(f"  failed (rc={rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-8:]))
            continue
        res = json.loads(out.read_text())
        res["engine"] = engine  # every herd variant runs the herd runner; the table names the variant
        res["command"] = shlex.join(full)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["attempt"] = attempt + 1
        busy = res.get("other_cores_busy") or 0.0
        print(f"  {res['tokens_per_s']} tok/s, peak RSS {res['peak_rss_mb']} MB, other_cores_busy {busy}")
        if best is None or busy < (best.get("other_cores_busy") or 0.0):
            best = res
        if busy <= args.busy_threshold:
            break
    return best


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarise(results: dict[str, dict]) -> list[dict]:
    herd = results.get("herd")
    rows = []
    for engine, r in results.items():
        row = {k: r.get(k) for k in ("engine", "version", "tokens_per_s", "ms_per_token", "elapsed_s",
                                     "elapsed_runs_s", "repeats", "peak_rss_mb", "load_s", "other_cores_busy",
                                     "output_tokens", "prompt_ids_sha256", "attempt", "command")}
        if herd is not None and engine != "herd":
            row["herd_over_peer_tokens_per_s"] = _ratio(herd["tokens_per_s"], r["tokens_per_s"])
            row["herd_over_peer_ms_per_token"] = _ratio(herd.get("ms_per_token"), r.get("ms_per_token"))
            row["herd_over_peer_peak_rss"] = _ratio(herd["peak_rss_mb"], r["peak_rss_mb"])
            pre = [common_prefix(a, b) for a, b in zip(herd["outputs"], r["outputs"])]
            row["exact_outputs_vs_herd"] = f"{sum(a == b for a, b in zip(herd['outputs'], r['outputs']))}/{len(pre)}"
            row["mean_common_prefix_vs_herd"] = round(sum(pre) / len(pre), 1)
        rows.append(row)
    return rows


def variants_vs_peers(rows: list[dict], key: str, higher_is_better: bool) -> list[str]:
    """A table: each herd variant's speed over each peer's (>1 means herd is faster)."""
    herds = [r for r in rows if r["engine"] in HERD_VARIANTS and r.get(key)]
    peers = [r for r in rows if r["engine"] in PEER_ENGINES and r.get(key)]
    if not herds or not peers:
        return []
    cells = [{"variant": h["engine"], **{p["engine"]: _ratio(*((h[key], p[key]) if higher_is_better
                                                            else (p[key], h[key]))) for p in peers}}
             for h in herds]
    what = "tok/s over the peer's" if higher_is_better else "speed (peer's ms/token over herd's)"
    return [f"Each herd variant's {what}; above 1 means herd is faster:", "",
            md_table(cells, [("variant", "herd variant")] + [(p["engine"], f"vs {p['engine']}") for p in peers]), ""]


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def write_report(name: str, rows: list[dict], info: dict, args, stamp: str) -> None:
    out = HERE / "results" / f"{stamp[:10]}-throughput-{name}"
    out.parent.mkdir(exist_ok=True)
    single = any(r["ms_per_token"] for r in rows)
    cols = [("engine", "engine"), ("version", "version"), ("tokens_per_s", "tok/s")]
    cols += [("ms_per_token", "ms/token")] if single else []
    cols += [("peak_rss_mb", "peak RSS MB"), ("herd_over_peer_tokens_per_s", "herd/peer tok/s")]
    cols += [("herd_over_peer_ms_per_token", "herd/peer ms/token")] if single else []
    cols += [("herd_over_peer_peak_rss", "herd/peer RSS"), ("repeats", "repeats"),
             ("other_cores_busy", "other cores busy"),
             ("load_s", "load s"), ("exact_outputs_vs_herd", "same ids as herd"),
             ("mean_common_prefix_vs_herd", "common prefix w/ herd")]
    shas = {r["prompt_ids_sha256"] for r in rows}
    w = json.loads(args.workload_paths[name].read_text())
    lines = [
        f"# Offline throughput: {name}", "",
        (f"{len(w['requests'])} requests x {w['max_tokens']} output tokens, ignore_eos={w['ignore_eos']}, "
         f"greedy, {w['dtype']}; model: herd's default (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized "
         "to bf16; vLLM and transformers read its HF export, llama.cpp the GGUF in its Q4_1 types)."),
        ("tok/s = all output tokens / wall time of generating all requests (prefill included), "
         "median of `repeats` runs; ratios are herd / peer."), "",
        md_table(rows, cols), "",
        *variants_vs_peers(rows, "ms_per_token" if single else "tokens_per_s", not single),
        "Same prompt token ids in every engine: " + ("yes" if len(shas) == 1 else f"NO ({sorted(shas)})"),
        "", "## Command", "", "```", info["command"], "```", "",
        "## Machine", "", "```", json.dumps(info["machine"], indent=1), "```", "",
        "## Per-engine commands", "",
        *[f"- {r['engine']}: `{r['command']}`" for r in rows], "",
    ]
    png = bar_chart(out.with_suffix(".png"), f"offline {name}", rows,
                    [("tokens_per_s", "output tokens/s (higher is better)")]
                    + ([("ms_per_token", "ms/token (lower is better)")] if single else [])
                    + [("peak_rss_mb", "peak RSS, MB (lower is better)")])
    if png:
        lines += [f"![chart]({png.name})", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"workload": w | {"requests": len(w["requests"])}, "command": info["command"],
         "machine": info["machine"], "results": rows}, indent=1) + "\n")
    print(f"wrote {out}.md / .json" + (" / .png" if png else ""))
    print(md_table(rows, cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", nargs="+", default=["chat-64x128", "prefix-64x64", "chat-1x256"],
                    help="names in benchmarks/peers/workloads/ or paths to workload JSON")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS")
    ap.add_argument("--busy-threshold", type=float, default=0.15, help="cores; see --retries")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine run")
    ap.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                    help="take undisturbed results of an interrupted run from DIR (work/throughput/<stamp>)")
    args = ap.parse_args()

    from models.default import default_model_path
    gguf = default_model_path()
    if not (HF_EXPORT / "model.safetensors").exists() and {"vllm", "transformers"} & set(args.engines):
        subprocess.run([sys.executable, str(PEERS / "export_default_hf.py")], check=True, cwd=ROOT)
    args.workload_paths = {}
    for w in args.workload:
        p = Path(w) if w.endswith(".json") else PEERS / "workloads" / f"{w}.json"
        _common.load_workload(p)  # fail early on a bad file
        args.workload_paths[p.stem] = p
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    outdir = HERE / "work/throughput" / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    info = {"command": shlex.join([str(Path(sys.executable).relative_to(ROOT) if
                                       Path(sys.executable).is_relative_to(ROOT) else sys.executable),
                                   *sys.argv]),
            "machine": machine_info()}
    commands = {e: engine_command(e, gguf) for e in args.engines}
    for e, c in commands.items():
        if c is None:
            print(f"note: {e} is not set up here; skipping it (bash benchmarks/setup_peers.sh)")
    for name, path in args.workload_paths.items():
        results = {}
        for engine, cmd in commands.items():
            if cmd is not None and (r := run_engine(engine, cmd, path, outdir, args)) is not None:
                results[engine] = r
        if results:
            write_report(name, summarise(results), info, args, stamp)


if __name__ == "__main__":
    main()
