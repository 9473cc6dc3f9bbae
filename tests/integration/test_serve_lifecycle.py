"""`herd serve` as a process, as a user starts it (decode compiled, the CPU default): health while
loading, both protocols up, SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai

from protos.herd.v1 import herd_pb2 as pb
from protos.herd.v1 import herd_pb2_grpc as pb_grpc
from tests.integration.servers import free_port


def test_sigterm_finishes_in_flight_then_exits_zero():
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--grpc-port", str(grpc_port), "--max-num-batched-tokens", "256",
                             "--max-model-len", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400  # loading and compiling the decode step
        saw_loading = False
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                status = httpx.get(url + "/health", timeout=1).status_code
                if status == 200:
                    break
                saw_loading |= status == 503
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            reply = pb_grpc.HerdStub(ch).Generate(pb.GenerateRequest(
                text="Hello", params=pb.SamplingParams(max_tokens=2, ignore_eos=True)), timeout=60)
            assert next(reply).usage.completion_tokens == 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        result = {}

        def long_request() -> None:
            r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time",
                                          max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
            result["tokens"] = r.usage.completion_tokens

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)  # in flight
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert result.get("tokens") == 64  # finished, not cut off
        assert proc.wait(timeout=60) == 0
        assert "decode step compiled" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
