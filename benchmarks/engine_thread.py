"""Does it matter which thread loads and steps the engine? Median inter-token time of one greedy
request (64 tokens, the default model, bf16, compiled decode), each layout in its own process:

  main        load and step on the main thread (LLM, herd batch)
  split       load on the main thread, step on a new thread (herd serve before compute_thread.py)
  one-thread  load and step on one worker thread, the main thread runs no torch op (herd serve now)

    .venv/bin/python benchmarks/engine_thread.py [--repeats 3] [--no-compile] [--layouts ...]
    .venv/bin/python benchmarks/engine_thread.py --ops    # the mechanism: one op's time by thread

Why they differ: libgomp gives each thread that starts a parallel region its own team, and once it
manages more threads than there are cores it stops spinning idle workers (serving/engine/
compute_thread.py). Measured on the 2-core Xeon: results/2026-11-29-engine-thread.md (split 1.8x
slower than one-thread, compiled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Tell me a long story about a herd of llamas."
LAYOUTS = ("main", "split", "one-thread")


def median_itl_ms(engine, rid: str) -> float:
    from serving.engine import SamplingParams

    engine.add_request(rid, {"prompt": PROMPT}, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    stamps = []
    while engine.has_unfinished():
        for _ in engine.step():
            stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)) * 1e3


def measure(layout: str, repeats: int, compile: bool) -> list[float]:
    """Runs in the child process: loads and steps as `layout` says."""
    from serving.engine import EngineConfig, LLMEngine

    config = EngineConfig(dtype="bfloat16", max_model_len=1024, memory_utilization=0.3, compile=compile)
    result: list[float] = []

    def load():
        return LLMEngine.from_config(config)

    def steps(engine):
        result.extend(round(median_itl_ms(engine, f"r{i}"), 1) for i in range(repeats))

    def on_thread(fn):
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    if layout == "main":
        steps(load())
    elif layout == "split":
        engine = load()
        on_thread(lambda: steps(engine))
    else:
        on_thread(lambda: steps(load()))
    return result


def op_us() -> dict[str, float]:
    """Runs in the child process: one SiLU over 64x576 bf16 values (one OpenMP parallel region),
    microseconds per call, on the main thread, then on a second thread once the main one has a team."""
    import torch

    x = torch.randn(64, 576, dtype=torch.bfloat16)

    def per_call() -> float:
        for _ in range(50):
            torch.nn.functional.silu(x)
        t0 = time.perf_counter()
        for _ in range(2000):
            torch.nn.functional.silu(x)
        return round((time.perf_counter() - t0) / 2000 * 1e6, 1)

    out = {"main thread": per_call()}
    t = threading.Thread(target=lambda: out.update({"second thread": per_call()}))
    t.start()
    t.join()
    return out


def ops() -> None:
    """The mechanism behind the layouts: one op's time by thread, with libgomp's default spinning
    and with GOMP_SPINCOUNT=0 (idle workers sleep at once)."""
    for env in ({}, {"GOMP_SPINCOUNT": "0"}):
        out = subprocess.run([sys.executable, __file__, "--child-op"], check=True, capture_output=True,
                             text=True, env={**os.environ, **env}).stdout
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "default"
        print(f"SiLU 64x576 bf16, us per call ({label}): {json.loads(out.strip().splitlines()[-1])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--ops", action="store_true", help="only time one op per thread (seconds, not minutes)")
    ap.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    ap.add_argument("--child-op", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_op:
        print(json.dumps(op_us()))
        return
    if args.ops:
        ops()
        return
    if args.child:
        print(json.dumps(measure(args.child, args.repeats, not args.no_compile)))
        return
    rows = {}
    for layout in args.layouts:
        cmd = [sys.executable, __file__, "--child", layout, "--repeats", str(args.repeats)]
        cmd += ["--no-compile"] if args.no_compile else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[layout] = json.loads(out.strip().splitlines()[-1])
        print(f"{layout:>10}: median inter-token ms per request {rows[layout]}", flush=True)
    best = min(statistics.median(v) for v in rows.values())
    for layout, v in rows.items():
        print(f"{layout:>10}: {statistics.median(v) / best:.2f}x the fastest layout")


if __name__ == "__main__":
    main()
