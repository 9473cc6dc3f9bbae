"""Replicas on Ray behind the gateway's engine interface: routing by prefix and load, errors and
aborts across the process boundary, and `herd serve --replicas 2` with the openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import ray

from models.llama4.loader import load_tokenizer
from serving.cluster.client import ClusterClient
from serving.cluster.replica import Replica
from serving.cluster.router import Router
from serving.engine import EngineConfig, SamplingParams
from serving.engine.async_engine import EngineDeadError
from serving.engine.sampling_params import ParamError
from tests.integration.servers import free_port, wait_healthy


def test_router_keeps_a_prefix_on_one_replica_and_spreads_the_rest():
    r = Router(3, prefix_tokens=4, max_imbalance=3, seed=1)
    shared = [r.pick([7, 7, 7, 7, i]) for i in range(5)]
    assert len(set(shared)) == 1
    for i in range(30):  # distinct prompts, each still in flight: load spreads them
        r.started(r.pick([i, i + 1, i + 2, i + 3]))
    assert max(r.in_flight) - min(r.in_flight) <= 3
    owner = shared[0]
    r.in_flight[owner] += 10  # overloaded: the prefix moves
    assert r.pick([7, 7, 7, 7, 9]) != owner
    r.healthy = [i == 2 for i in range(3)]
    assert r.pick([1, 2, 3, 4]) == 2
    assert r.pick([5]) == 2  # shorter than the prefix: load only


@pytest.fixture(scope="module")
def cluster(tiny_llama4_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = EngineConfig(model=str(tiny_llama4_dir), dtype="float32", block_size=4, num_kv_blocks=64,
                       max_model_len=128)
    client = ClusterClient([Replica(cfg), Replica(cfg)], load_tokenizer(tiny_llama4_dir),
                           Router(2, prefix_tokens=32), make_replica=lambda: Replica(cfg))
    yield client
    client.shutdown()
    ray.shutdown()


async def _run(client, prompt_ids, rid, max_tokens=4):
    merged = None
    async for out in client.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True), rid):
        if merged is None:
            merged = out
        else:
            merged.merge(out)
    return merged


def test_shared_prefix_goes_to_one_replica_distinct_prompts_to_both(cluster):
    before = [s.prompt_tokens for s in cluster.replica_stats()]
    system = [(i * 7) % 250 for i in range(40)]

    async def go():  # the first alone, so that the system prompt is cached when the rest come
        await _run(cluster, system + [100, 5], "p0")
        await asyncio.gather(*(_run(cluster, system + [100 + i, 5], f"p{i}") for i in range(1, 6)))
    asyncio.run(go())
    after = [s.prompt_tokens for s in cluster.replica_stats()]
    grew = [a - b for a, b in zip(after, before)]
    assert sorted(grew) == [0, 6 * 42]  # all six on one replica ...
    hits = [s.prefix_hit_tokens for s in cluster.replica_stats()]
    assert max(hits) >= 5 * 40 - 8  # ... where the later five found the system prompt cached

    async def spread():
        await asyncio.gather(*(_run(cluster, [i, (i * 13) % 250, 3, 4, 5], f"d{i}") for i in range(12)))
    before = after
    asyncio.run(spread())
    grew = [a - b for a, b in zip((s.prompt_tokens for s in cluster.replica_stats()), before)]
    assert all(g > 0 for g in grew)
    assert cluster.stats().prompt_tokens == sum(s.prompt_tokens for s in cluster.replica_stats())


def test_bad_request_raises_param_error_and_early_close_frees_blocks(cluster):
    with pytest.raises(ParamError) as e:
        asyncio.run(_run(cluster, list(range(120)), "too-long", max_tokens=50))
    assert e.value.param == "max_tokens"  # 120 + 50 tokens do not fit in max_model_len 128

    async def leave_early():
        stream = cluster.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(
            max_tokens=100, ignore_eos=True), "early")
        await stream.__anext__()
        await stream.aclose()
    asyncio.run(leave_early())
    deadline = time.monotonic() + 5
    while True:
        free = [ray.get(r.leader.free_blocks.remote()) for r in cluster.replicas]
        if all(f == n for f, n in free):
            break
        assert time.monotonic() < deadline, free
        time.sleep(0.05)
    assert cluster.num_in_flight() == 0


def test_a_killed_replica_is_routed_around_and_comes_back(cluster):
    victim = 0
    pid = cluster.replicas[victim].pids()[0]

    async def one(i):
        return await _run(cluster, [i + 1, 2, 3, 4, 5], f"k{i}", max_tokens=100)

    async def load():
        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    results = asyncio.run(load())
    done = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, EngineDeadError) and "died" in str(e) for e in failed), failed
    assert done and all(len(r.outputs[0].token_ids) == 100 for r in done)
    assert not cluster.router.healthy[victim] or cluster.restarts[victim] == 1
    deadline = time.monotonic() + 180
    while not cluster.router.healthy[victim]:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.2)
    assert cluster.restarts[victim] == 1 and cluster.replicas[victim].pids()[0] != pid

    async def spread():
        await asyncio.gather(*(_run(cluster, [i, 9, 8, 7], f"after{i}") for i in range(8)))
    asyncio.run(spread())
    assert cluster.replica_stats()[victim].prompt_tokens > 0  # traffic returned to it


def _descendants(root: int) -> list[int]:
    """Processes below `root` (the server's Ray cluster lives under it), from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _rank_workers(root: int) -> list[int]:
    out = []
    for pid in _descendants(root):
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::RankWorker"):
                out.append(pid)
        except OSError:
            pass
    return out


def _kill_a_replica_under_openai_load(client, model, url, server_pid):
    """SIGKILL one replica's actor while the openai client keeps requests in flight: each one
    completes or gets a clear 503, none hangs; the replica comes back and takes traffic."""
    workers = _rank_workers(server_pid)
    assert len(workers) == 2, workers
    outcomes = []

    def one(i):
        try:
            r = client.with_options(timeout=60).completions.create(
                model=model, prompt=f"load {i}", max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
            outcomes.append(r.usage.completion_tokens)
        except openai.APIStatusError as e:
            outcomes.append(e.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(outcomes) == 8 and set(outcomes) <= {60, 503}, outcomes
    deadline = time.monotonic() + 180
    while True:
        health = httpx.get(url + "/health").json()
        if [r["healthy"] for r in health["replicas"]] == [True, True]:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert sum(r["restarts"] for r in health["replicas"]) == 1
    back = next(r["replica"] for r in health["replicas"] if r["restarts"])

    def rebuilt_prompt_tokens() -> float:
        line = f'herd:replica_prompt_tokens_total{{model_name="{model}",replica="{back}"}} '
        return float(next(x for x in httpx.get(url + "/metrics").text.splitlines()
                          if x.startswith(line)).split()[-1])
    assert rebuilt_prompt_tokens() == 0
    for i in range(12):  # traffic returns to the rebuilt replica (load spreads over both)
        threads = [threading.Thread(target=client.completions.create,
                                    kwargs=dict(model=model, prompt=f"after {i} {j}", max_tokens=8))
                   for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert rebuilt_prompt_tokens() > 0


def test_herd_serve_two_replicas_with_the_openai_client(tiny_llama4_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", str(tiny_llama4_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "-1",
                             "--replicas", "2", "--dtype", "float32", "--max-model-len", "128", "--enforce-eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 240)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="abc", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        chunks = list(client.completions.create(model=model, prompt="xyz", max_tokens=4, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length" and len(chunks) == 4
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="a" * 10, max_tokens=500)
        text = httpx.get(url + "/metrics").text
        counted = [line for line in text.splitlines() if line.startswith("herd:prompt_tokens_total")]
        assert float(counted[0].split()[-1]) >= 6  # both requests' prompts, summed over replicas
        assert f'herd:replica_up{{model_name="{model}",replica="1"}} 1' in text
        health = httpx.get(url + "/health").json()
        assert health["replicas"] == [{"replica": i, "healthy": True, "restarts": 0} for i in range(2)]
        _kill_a_replica_under_openai_load(client, model, url, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
