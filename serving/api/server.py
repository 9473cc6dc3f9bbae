"""Runs the gateway: HTTP (uvicorn) and gRPC over one engine; loads the model in the
background (health says 503 until it is ready) and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from serving.api.admission import Admission
from serving.api.engine_client import EngineClient
from serving.api.openai_http import build_app

log = logging.getLogger("herd.serve")


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    grpc_port: int | None = 50051  # None: no gRPC server
    api_key: str | None = None
    max_queued_requests: int | None = None
    max_body_bytes: int = 8 * 2**20
    drain_timeout: float = 30.0
    files_dir: str | None = None  # /v1/files and /v1/batches keep their data here (None: no such routes)
    max_file_bytes: int = 512 * 2**20


class _Server(uvicorn.Server):
    """uvicorn, but a signal first stops admission (new requests get 503) and then exits."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame) -> None:
        self.on_signal()
        super().handle_exit(sig, frame)


async def run_gateway(make_client: Callable[[], EngineClient], cfg: GatewayConfig,
                      ready: Callable[[str, int, int | None], None] | None = None) -> int:
    """Serves until SIGTERM/SIGINT; returns the exit code. `make_client` runs in a thread."""
    admission = Admission(cfg.max_queued_requests)
    routers, jobs = [], None
    if cfg.files_dir is not None:
        from serving.batch.files import FileStore
        from serving.batch.http_routes import batch_router
        from serving.batch.jobs import BatchJobs

        files = FileStore(cfg.files_dir)
        jobs = BatchJobs(cfg.files_dir, files, lambda: admission.client if admission.ready else None)
        routers.append(batch_router(files, jobs, cfg.max_file_bytes))
    app = build_app(admission, cfg.api_key, cfg.max_body_bytes, routers, cfg.max_file_bytes)
    server = _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                    timeout_graceful_shutdown=int(cfg.drain_timeout), access_log=False),
                     on_signal=lambda: setattr(admission, "draining", True))
    grpc_server = None
    if cfg.grpc_port is not None:
        from serving.api.grpc_server import start_grpc_server

        grpc_server = await start_grpc_server(admission, cfg.host, cfg.grpc_port, cfg.api_key)

    async def load() -> None:
        t0 = time.perf_counter()
        admission.client = await asyncio.to_thread(make_client)
        log.info("model %s ready in %.1fs", admission.client.models()[0].id, time.perf_counter() - t0)

    loader = asyncio.create_task(load())
    if jobs is not None:
        jobs.resume_all()  # unfinished batches carry on once the model is loaded
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if ready is not None and server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        ready(cfg.host, port, getattr(grpc_server, "bound_port", None))
    await serving  # returns once a signal has set should_exit and HTTP requests have finished
    admission.draining = True
    if jobs is not None:
        await jobs.stop()  # batches stay in progress on disk and resume at the next start
    if grpc_server is not None:
        await grpc_server.stop(grace=cfg.drain_timeout)
    if not loader.done():
        loader.cancel()
        return 0
    if loader.exception() is not None:
        log.error("model failed to load: %s", loader.exception())
        return 1
    client = admission.client
    deadline = time.monotonic() + cfg.drain_timeout
    while client.num_in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    client.shutdown()
    return 0
