"""`herd serve`: the OpenAI-compatible HTTP + gRPC gateway on one in-process engine, or on
Ray replicas (--replicas, --tensor-parallel-size, --ray-address)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal


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
    p.add_argument("--replicas", type=int, default=1, help="model replicas, each a group of Ray actors")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks (Ray actors) per replica")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto': the one `ray start` made here) instead of a local one")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many (default: --replicas)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many (default: --replicas)")
    p.add_argument("--scale-target", type=float, default=16.0,
                   help="requests in flight per replica above which a replica is added")
    p.add_argument("--no-prefix-affinity", dest="prefix_affinity", action="store_false",
                   help="route by load only (default: requests sharing a prompt prefix go to one replica)")
    add_engine_arguments(p)


def make_cluster_client(args: argparse.Namespace, config, policy):
    """Ray replicas behind one ClusterClient (runs in the gateway's loader thread)."""
    import ray

    from models.default import default_model_path
    from models.llama4.loader import load_tokenizer
    from serving.cluster.autoscaler import Autoscaler
    from serving.cluster.client import ClusterClient
    from serving.cluster.replica import Replica
    from serving.cluster.router import Router

    if not ray.is_initialized():
        # A local cluster gets a CPU per rank even past the core count (oversubscribed rather
        # than waiting forever for a placement group it cannot place).
        ranks = policy.max_replicas * args.tensor_parallel_size
        cpus = None if args.ray_address else max(os.cpu_count() or 1, ranks)
        ray.init(address=args.ray_address, num_cpus=cpus, include_dashboard=False, configure_logging=False)
    replicas = [Replica(config, args.tensor_parallel_size) for _ in range(args.replicas)]
    tokenizer = load_tokenizer(config.model or default_model_path())
    client = ClusterClient(replicas, tokenizer, Router(args.replicas, affinity=args.prefix_affinity),
                           make_replica=lambda: Replica(config, args.tensor_parallel_size))
    if policy.max_replicas > policy.min_replicas:
        client.autoscaler = Autoscaler(client, policy)
    return client


def scale_policy(args: argparse.Namespace):
    from serving.cluster.autoscaler import ScalePolicy

    lo = args.replicas if args.min_replicas is None else args.min_replicas
    hi = max(args.replicas, lo) if args.max_replicas is None else args.max_replicas
    if not lo <= args.replicas <= hi:
        raise ValueError(f"replicas: {args.replicas} is outside --min-replicas {lo} .. --max-replicas {hi}")
    return ScalePolicy(lo, hi, target_in_flight=args.scale_target)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", "-q", choices=["int4"], default=None,
                   help="int4: 4-bit weights (Q4_1 scheme, CPU), 8-bit output head; default: none")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--memory-utilization", "--gpu-memory-utilization", dest="memory_utilization",
                   type=float, default=0.5, help="fraction of device memory for weights + activations + KV")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model step (faster single requests; slower warm-up)")


def engine_config(args: argparse.Namespace):
    from serving.engine import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                        served_model_name=getattr(args, "served_model_name", None),
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                        memory_utilization=args.memory_utilization, enable_prefix_caching=args.prefix_caching,
                        compile=args.compile)


def run(args: argparse.Namespace) -> int:
    from serving.api.server import GatewayConfig, run_gateway
    from serving.engine import LLMEngine
    from serving.engine.async_engine import AsyncEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config(args)  # validates before anything starts
    for name in ("replicas", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    policy = scale_policy(args)  # validates --min/--max-replicas before anything starts
    cfg = GatewayConfig(host=args.host, port=args.port, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
                        api_key=args.api_key, max_queued_requests=args.max_queued_requests,
                        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout)

    def ready(host: str, port: int, grpc_port: int | None) -> None:
        grpc = f", gRPC on {host}:{grpc_port}" if grpc_port else ""
        logging.getLogger("herd.serve").info("HTTP on http://%s:%d%s; loading the model", host, port, grpc)

    # uvicorn re-raises the signal it drained on with the handler it found: make that a no-op,
    # so that the drain below finishes and the exit code is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if policy.max_replicas > 1 or args.tensor_parallel_size > 1 or args.ray_address:
        def make_client():
            return make_cluster_client(args, config, policy)
    else:
        def make_client():
            return AsyncEngine(LLMEngine.from_config(config))
    return asyncio.run(run_gateway(make_client, cfg, ready))
