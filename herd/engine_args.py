"""Engine and cluster options shared by `herd serve` and `herd batch`, and the engine client
they build from them: one in-process engine, or Ray replicas behind a router."""

from __future__ import annotations

import argparse
import os


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="what the KV cache holds (auto: the model's activation dtype; bfloat16 halves the "
                        "cache of a float32 or int4 model)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--tool-call-parser", default="auto", choices=["auto", "llama4", "pythonic", "json", "hermes"],
                   help="how tool calls are read from the model's output (auto: from its chat template)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                      help="compile the decode step (the default on CPU): herd's C++ step for dense "
                           "float32/bfloat16 models (built once, about a minute), torch.compile for others "
                           "(a minute or two at each start); on CUDA, CUDA graphs of decode steps")
    step.add_argument("--enforce-eager", dest="compile", action="store_const", const=False,
                      help="run the model eagerly: quick start, slower decode (the default off CPU until "
                           "compiled decode is checked there)")


def engine_config(args: argparse.Namespace):
    from serving.engine.config import EngineConfig, default_compile

    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                        served_model_name=getattr(args, "served_model_name", None),
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                        memory_utilization=args.memory_utilization, enable_prefix_caching=args.prefix_caching,
                        kv_cache_dtype=args.kv_cache_dtype,
                        compile=default_compile(args.device, args.compile))


def validate(args: argparse.Namespace):
    """Checks every option before anything starts; returns the engine config."""
    config = engine_config(args)
    for name in ("replicas", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    scale_policy(args)
    return config


def make_client(args: argparse.Namespace, config, inline: bool = False):
    """The engine client the options ask for (loads the model; call it off the event loop).
    `inline`: an in-process engine steps on the caller's event loop (offline batch)."""
    policy = scale_policy(args)
    if policy.max_replicas > 1 or args.tensor_parallel_size > 1 or args.ray_address:
        client = make_cluster_client(args, config, policy)
    else:
        from serving.engine import LLMEngine
        from serving.engine.async_engine import AsyncEngine

        client = AsyncEngine(lambda: LLMEngine.from_config(config), inline=inline)
    client.tool_call_parser = None if args.tool_call_parser == "auto" else args.tool_call_parser
    return client
