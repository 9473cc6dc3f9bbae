"""Does it matter which thread steps the engine? Median inter-token time of one greedy request
(64 tokens, the default model, bf16, compiled decode) stepped on the main thread, then on a new
thread, then on the main thread again, in one process.

    .venv/bin/python benchmarks/engine_thread.py [--repeats 3] [--no-compile] [--load-in-worker]

Measured with this command on the 2-core Xeon (2026-11-29, 22:00): main 32.9 / 34.5 / 30.3 ms, new
thread 54.0 / 48.6 / 42.0, main again 29.3 / 29.9 / 29.6. With --load-in-worker (loaded and compiled
in a worker thread, as `herd serve` does so that /health answers while it loads): main 27.4 / 26.6 /
26.4, new thread 43.0 / 48.9 / 48.2, main again 32.9 / 31.6 / 31.7. Stepping off the main thread is
~1.5x slower either way. An earlier ad-hoc run with the model loaded in a worker measured ~57 ms on
every thread; this command did not reproduce that. Yet `herd serve` stepping on its event loop
(main thread) measured 50.3 ms TPOT vs 53.4 with its engine thread (results/2026-11-29-serve-chat-64x128-
{inline-front,herd-compile}.md, vLLM 44.0 and 45.7 in the same runs): the serve gap is not explained.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
    ap.add_argument("--load-in-worker", action="store_true", help="load the model in a worker thread")
    args = ap.parse_args()
    config = EngineConfig(dtype="bfloat16", max_model_len=1024, memory_utilization=0.3, compile=not args.no_compile)
    if args.load_in_worker:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            engine = pool.submit(LLMEngine.from_config, config).result()
    else:
        engine = LLMEngine.from_config(config)

    def run(label: str) -> None:
        print(label, [round(median_itl_ms(engine, f"{label}{i}"), 1) for i in range(args.repeats)], "ms", flush=True)

    run("main thread")
    worker = threading.Thread(target=run, args=("new thread",))
    worker.start()
    worker.join()
    run("main thread again")


if __name__ == "__main__":
    main()
