"""`herd serve`: the OpenAI-compatible HTTP + gRPC gateway on one in-process engine, or on
Ray replicas (--replicas, --tensor-parallel-size, --ray-address)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from herd.engine_args import add_cluster_arguments, add_engine_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1: no gRPC server)")
    p.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HERD_API_KEY)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse with 429 / RESOURCE_EXHAUSTED past this many waiting requests")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests after SIGTERM")
    p.add_argument("--files-dir", default=os.environ.get("HERD_FILES_DIR", "~/.cache/herd/files"),
                   help="where /v1/files and /v1/batches keep their files and batch records "
                        "(default: $HERD_FILES_DIR or ~/.cache/herd/files)")
    p.add_argument("--max-file-bytes", type=int, default=512 * 2**20, help="largest file /v1/files accepts")
    add_cluster_arguments(p)
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from herd.engine_args import make_client, validate
    from serving.api.server import GatewayConfig, run_gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = validate(args)
    cfg = GatewayConfig(host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
                        api_key=args.api_key, max_queued_requests=args.max_queued_requests,
                        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout,
                        files_dir=os.path.expanduser(args.files_dir), max_file_bytes=args.max_file_bytes)

    def ready(host: str, port: int, grpc_port: int | None) -> None:
        grpc = f", gRPC on {host}:{grpc_port}" if grpc_port else ""
        logging.getLogger("herd.serve").info("HTTP on http://%s:%d%s; loading the model", host, port, grpc)

    # uvicorn re-raises the signal it drained on with the handler it found: make that a no-op,
    # so that the drain below finishes and the exit code is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return asyncio.run(run_gateway(lambda: make_client(args, config), cfg, ready))
