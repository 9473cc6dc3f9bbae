"""Online load against any OpenAI-compatible server: streaming requests, latency percentiles.

    .venv/bin/python benchmarks/serve.py --base-url http://127.0.0.1:8000 [--endpoint chat|completions]
        [--num-requests 64] [--rate 4 | --concurrency 8] [--max-tokens 128] [--ignore-eos]
        [--workload chat-64x128] [--out R.json]

Requests take their prompts from a workload file (benchmarks/peers/workloads/, cycled when
--num-requests is larger): chat sends its messages, completions the text of its last message.
Arrivals are a Poisson process at --rate requests/s (default inf: all at once); --concurrency
caps requests in flight. --ignore-eos sends vLLM's extra field `ignore_eos`. Every request streams
with stream_options.include_usage, so output tokens come from the server's usage count.

Reported (as vLLM's serving benchmark defines them): TTFT, time to the first content chunk;
TPOT, (latency - TTFT) / (output tokens - 1) per request; ITL, the gaps between content chunks;
E2E latency; p50/p90/p99 and mean of each, in ms; request and output-token throughput over the
whole run; errors with their first messages. Runs in herd's .venv (httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

WORKLOADS = Path(__file__).resolve().parent / "peers/workloads"


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    chunks: int = 0


def percentiles(xs: list[float], scale: float = 1000.0) -> dict | None:
    """mean/p50/p90/p99 with linear interpolation between order statistics (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)

    def q(p):
        k = (len(s) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return {"mean": round(sum(s) / len(s) * scale, 3), **{f"p{p}": round(q(p) * scale, 3) for p in (50, 90, 99)},
            "n": len(s)}


def load_prompts(workload: str) -> list[list[dict]]:
    path = Path(workload) if workload.endswith(".json") else WORKLOADS / f"{workload}.json"
    return [r["messages"] for r in json.loads(path.read_text())["requests"]]


def request_body(args, model: str, messages: list[dict]) -> dict:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = messages[-1]["content"]
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    r = Result()
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return r
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"].get("completion_tokens", 0)
                for c in chunk.get("choices") or []:
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if r.ttft is None:
                            r.ttft = now - t0
                        else:
                            r.itl.append(now - last)
                        last = now
                        r.chunks += 1
        r.latency = time.perf_counter() - t0
        r.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300]
    return r


async def run_load(args, base_url: str, log=print) -> dict:
    """Runs the load described by args against base_url; returns the summary dict."""
    prompts = load_prompts(args.workload)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        url = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        bodies = [request_body(args, model, prompts[i % len(prompts)]) for i in range(args.num_requests)]
        for i in range(args.warmup):
            w = await one_request(client, url, bodies[i % len(bodies)] | {"max_tokens": 4})
            if not w.ok:
                log(f"warm-up request failed: {w.error}")
        sem = asyncio.Semaphore(args.concurrency) if args.concurrency else None
        rng = random.Random(args.seed)

        async def limited(body):
            if sem is None:
                return await one_request(client, url, body)
            async with sem:
                return await one_request(client, url, body)

        tasks = []
        t0 = time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    summary = {
        "base_url": base_url, "endpoint": args.endpoint, "model": model,
        "num_requests": args.num_requests, "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "rate": None if args.rate == float("inf") else args.rate, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "workload": args.workload,
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 2),
        "total_output_tokens": out_tokens,
        "tokens_per_chunk": round(out_tokens / max(sum(r.chunks for r in ok), 1), 3),
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.latency for r in ok]),
    }
    return summary


def add_load_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--model", default=None, help="default: the first id of /v1/models")
    ap.add_argument("--workload", default="chat-64x128", help="prompt source (name or path)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrivals, requests/s")
    ap.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--warmup", type=int, default=2, help="untimed short requests first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--request-timeout", type=float, default=600.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (no /v1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the summary JSON here")
    add_load_arguments(ap)
    args = ap.parse_args()
    summary = asyncio.run(run_load(args, args.base_url.rstrip("/").removesuffix("/v1")))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.exit(1 if summary["completed"] == 0 else 0)


if __name__ == "__main__":
    main()
