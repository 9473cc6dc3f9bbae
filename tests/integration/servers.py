"""Start the HTTP and gRPC gateways in-process on free loopback ports for tests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import httpx
import uvicorn

from serving.api.admission import Admission
from serving.api.grpc_server import start_grpc_server
from serving.api.openai_http import build_app
from serving.engine import EngineConfig, LLMEngine
from serving.engine.async_engine import AsyncEngine


def async_engine(loaded, inline: bool = False, **overrides) -> AsyncEngine:
    cfg = dict(num_kv_blocks=256, block_size=16, max_model_len=1024, max_num_batched_tokens=512)
    cfg.update(overrides)
    return AsyncEngine(LLMEngine(loaded, EngineConfig(model=str(loaded.path), **cfg)), inline=inline)


class HttpServer:
    def __init__(self, admission: Admission, api_key: str | None = None, max_body_bytes: int = 2**20) -> None:
        self.admission = admission
        app = build_app(admission, api_key, max_body_bytes)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class GrpcServer:
    """The gRPC gateway on its own event loop in a thread; `target` is host:port."""

    def __init__(self, admission: Admission, api_key: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gateway = asyncio.run_coroutine_threadsafe(
            start_grpc_server(admission, "127.0.0.1", 0, api_key), self.loop).result(timeout=30)
        self.target = f"127.0.0.1:{self.gateway.bound_port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(0), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def wait_idle(engine: AsyncEngine, timeout: float = 1.0) -> None:
    """Returns once nothing runs or waits and every KV block is free; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    eng = engine.engine
    while time.monotonic() < deadline:
        if not eng.scheduler.running and not eng.scheduler.waiting and \
                eng.blocks.num_free_blocks == eng.blocks.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: running={len(eng.scheduler.running)} "
                         f"free={eng.blocks.num_free_blocks}/{eng.blocks.num_blocks}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Polls `url`/health until 200; fails with the process's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, (proc.stdout or proc.stderr).read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)
