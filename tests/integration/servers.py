"""Start the HTTP gateway in-process on a free loopback port for tests."""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from serving.api.admission import Admission
from serving.api.openai_http import build_app
from serving.engine import EngineConfig, LLMEngine
from serving.engine.async_engine import AsyncEngine


def async_engine(loaded, **overrides) -> AsyncEngine:
    cfg = dict(num_kv_blocks=256, block_size=16, max_model_len=1024, max_num_batched_tokens=512)
    cfg.update(overrides)
    return AsyncEngine(LLMEngine(loaded, EngineConfig(model=str(loaded.path), **cfg)))


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
