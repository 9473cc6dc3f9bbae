"""Autoscaling on queue depth: a burst adds a replica, quiet drains it away again; no request
is lost on the way."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from models.llama4.loader import load_tokenizer
from serving.cluster.autoscaler import Autoscaler, ScalePolicy
from serving.cluster.client import ClusterClient
from serving.cluster.replica import Replica
from serving.engine import EngineConfig
from tests.integration.test_cluster import _run


@pytest.fixture(scope="module")
def one_replica(tiny_llama4_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = EngineConfig(model=str(tiny_llama4_dir), dtype="float32", block_size=4, num_kv_blocks=400,
                       max_model_len=128)
    client = ClusterClient([Replica(cfg)], load_tokenizer(tiny_llama4_dir), make_replica=lambda: Replica(cfg))
    yield client
    client.shutdown()
    ray.shutdown()


def test_policy_is_validated():
    with pytest.raises(ValueError, match="min_replicas"):
        ScalePolicy(3, 2)


def test_burst_scales_up_then_quiet_drains_down(one_replica):
    client = one_replica
    client.autoscaler = Autoscaler(client, ScalePolicy(1, 2, target_in_flight=2, interval_s=0.1,
                                                       upscale_cooldown_s=0, downscale_cooldown_s=1.0))
    peak = []

    async def burst():
        async def watch():
            while True:
                peak.append(len(client.live_replicas()))
                await asyncio.sleep(0.05)
        watcher = asyncio.create_task(watch())
        # Waves of long requests keep the queue deep while the second replica loads.
        results = []
        for wave in range(6):
            results += await asyncio.gather(*(_run(client, [wave + 1, i + 1, 3], f"w{wave}-{i}", max_tokens=100)
                                              for i in range(8)))
            if max(peak) == 2 and wave >= 2:
                break
        watcher.cancel()
        return results
    results = asyncio.run(burst())
    assert all(len(r.outputs[0].token_ids) == 100 for r in results)  # nothing lost while scaling
    assert max(peak) == 2
    deadline = time.monotonic() + 60
    while len(client.live_replicas()) != 1:
        assert time.monotonic() < deadline, "did not scale back down"
        time.sleep(0.1)
    assert sum(client.retired) == 1 and len(client.replica_states()) == 1
    client.autoscaler.stop()
