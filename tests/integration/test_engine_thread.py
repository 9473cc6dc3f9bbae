"""AsyncEngine given a factory builds its engine on the thread that steps it (one OpenMP team
per process: serving/engine/compute_thread.py), and a failed build leaves no thread behind."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.engine import EngineConfig, LLMEngine, SamplingParams
from serving.engine.async_engine import AsyncEngine
from serving.engine.compute_thread import ComputeThread


def test_compute_thread_runs_calls_in_order_on_one_thread():
    compute = ComputeThread("probe")
    seen = []
    futures = [compute.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
    for f in futures:
        f.result(timeout=5)
    assert seen == [(i, "probe") for i in range(5)]
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)
    assert compute.call(lambda: 7) == 7  # an exception does not end the thread
    compute.close(timeout=5)
    assert not compute._thread.is_alive()


def test_engine_is_built_and_stepped_on_one_thread(tiny_llama4):
    built_on, stepped_on = [], set()

    class Probe(LLMEngine):
        def step(self):
            stepped_on.add(threading.get_ident())
            return super().step()

    def build() -> LLMEngine:
        built_on.append(threading.get_ident())
        return Probe(tiny_llama4, EngineConfig(model=str(tiny_llama4.path), num_kv_blocks=32, block_size=4,
                                               max_model_len=96))

    engine = AsyncEngine(build)

    async def go() -> list[int]:
        ids = []
        async for out in engine.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, ignore_eos=True,
                                                                                        temperature=0.0), "r"):
            ids += out.outputs[0].token_ids
        return ids

    try:
        assert len(asyncio.run(go())) == 4
    finally:
        engine.shutdown()
    assert len(built_on) == 1 and built_on[0] != threading.get_ident()
    assert stepped_on == set(built_on)  # warm-up too: the factory ran on the stepping thread
    assert not engine._compute._thread.is_alive()


def test_failed_build_raises_and_ends_its_thread():
    def build() -> LLMEngine:
        raise ValueError("model: no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        AsyncEngine(build)
    assert not any(t.name == "herd-engine" and t.is_alive() for t in threading.enumerate())
