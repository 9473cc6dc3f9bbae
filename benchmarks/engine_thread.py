"""Does it matter which thread steps the engine? Median inter-token time of one greedy request
(64 tokens, the default model, bf16, compiled decode) stepped on the main thread, then on a new
thread, then on the main thread again, in one process.

    .venv/bin/python benchmarks/engine_thread.py [--repeats 3] [--no-compile]

Measured on the 2-core Xeon (2026-11-29): main 34.0 / 33.9 ms, new thread 60.5 / 61.3 / 58.0 ms,
main again 38.0 / 32.5 / 30.6 ms: why `herd serve` and `herd batch` step the engine on their
event loop's (main) thread (serving/engine/async_engine.py).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT = "Tell me a long story about a herd of llamas."


def median_itl_ms(engine: LLMEngine, rid: str) -> float:
    engine.add_request(rid, {"prompt": PROMPT}, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    stamps = []
    while engine.has_unfinished():
        for _ in engine.step():
            stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    engine = LLMEngine.from_config(EngineConfig(dtype="bfloat16", max_model_len=1024, memory_utilization=0.3,
                                                compile=not args.no_compile))

    def run(label: str) -> None:
        print(label, [round(median_itl_ms(engine, f"{label}{i}"), 1) for i in range(args.repeats)], "ms", flush=True)

    run("main thread")
    worker = threading.Thread(target=run, args=("new thread",))
    worker.start()
    worker.join()
    run("main thread again")


if __name__ == "__main__":
    main()
