"""What herd's HTTP gateway adds to a request: 1-token requests through `herd serve` vs the engine in-process.

    .venv/bin/python benchmarks/gateway_overhead.py [--requests 200] [--wait-quiet 120]

Same model (the default), same engine settings, same prompt text, one request at a time:
  in-process  AsyncEngine(LLMEngine).generate({"prompt": text}, max_tokens=1) in this process,
              timed from the call to the final output (tokenization included);
  HTTP        POST /v1/completions {"prompt": text, "max_tokens": 1} to `herd serve` on 127.0.0.1
              from this process over one keep-alive httpx connection, non-streaming and streaming
              (SSE, timed to [DONE]), and non-streaming from a bare http.client connection.
overhead = p50(HTTP) - p50(in-process); the target is under 2 ms. The two runs are minutes apart and one
request's time is mostly the model step, so that difference carries the step's noise; the paired row
does not: each non-streamed response carries the engine's own time for it (`Server-Timing: engine;dur=`,
measured in the server from submitting to the engine to its last output, tokenization included), and
its overhead is that request's client-side time minus its engine time. Writes
benchmarks/results/<date>-gateway-overhead.md / .json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
from report import machine_info, md_table
from serve import percentiles
from servers import ROOT, Server, _common

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is"
MAX_MODEL_LEN = 1024  # as servers.py starts herd serve


def in_process(n: int, warmup: int) -> list[float]:
    sys.path.insert(0, str(ROOT))
    from serving.engine import EngineConfig, LLMEngine, SamplingParams
    from serving.engine.async_engine import AsyncEngine

    config = EngineConfig(dtype="bfloat16", max_model_len=MAX_MODEL_LEN, memory_utilization=0.3, compile=True)
    engine = AsyncEngine(lambda: LLMEngine.from_config(config))  # built on its stepping thread, as herd serve does
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def go() -> list[float]:
        times = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            async for _ in engine.generate({"prompt": PROMPT}, params, f"r{i}"):
                pass
            times.append(time.perf_counter() - t0)
        return times[warmup:]
    try:
        return asyncio.run(go())
    finally:
        engine.shutdown()


def engine_ms(response: httpx.Response) -> float:
    timing = response.headers["server-timing"]  # "engine;dur=31.207"
    return float(timing.split("dur=")[1])


def over_http(base_url: str, n: int, warmup: int, stream: bool, engine_times: list | None = None) -> list[float]:
    times = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0, "stream": stream}
        for _ in range(warmup + n):
            t0 = time.perf_counter()
            if stream:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.strip() == "data: [DONE]":
                            break
            else:
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                if engine_times is not None:
                    engine_times.append(engine_ms(r) / 1e3)
            times.append(time.perf_counter() - t0)
    if engine_times is not None:
        del engine_times[:warmup]
    return times[warmup:]


def over_stdlib_http(base_url: str, n: int, warmup: int) -> list[float]:
    """Non-streaming requests from a bare keep-alive http.client connection: total - engine time
    per request, so the figure carries the gateway and the socket but hardly any client library."""
    host, port = base_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0})
    headers = {"Content-Type": "application/json"}
    added = []
    for _ in range(warmup + n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, headers)
        r = conn.getresponse()
        r.read()
        total = time.perf_counter() - t0
        assert r.status == 200, r.status
        added.append(total - float(r.getheader("server-timing").split("dur=")[1]) / 1e3)
    conn.close()
    return added[warmup:]


async def noop_app(scope, receive, send):
    """An ASGI app that answers every request at once like a 1-token completion: what the
    clients and the socket cost with no gateway at all."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"data": [{"id": "noop"}]} if scope["path"] == "/v1/models" else
                      {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "noop",
                       "choices": [{"index": 0, "text": " Paris", "logprobs": None, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7}}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"server-timing", b"engine;dur=0")]})
    await send({"type": "http.response.body", "body": body})


def floor_rows(port: int, n: int, warmup: int) -> list[dict]:
    """The two clients against noop_app under uvicorn, in its own process as herd serve is."""
    proc = subprocess.Popen([sys.executable, __file__, "--noop-server", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "no-op server did not start"
                time.sleep(0.1)
        return [{"path": "no-op ASGI server (uvicorn), httpx: the client and socket alone",
                 **percentiles(over_http(url, n, warmup, False))},
                {"path": "no-op ASGI server (uvicorn), bare http.client", **percentiles(over_stdlib_http(url, n, warmup))}]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--port", type=int, default=8124)
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS")
    ap.add_argument("--noop-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_server:
        import uvicorn
        uvicorn.run(noop_app, host="127.0.0.1", port=args.noop_server, log_level="warning")
        return
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    info = {"command": shlex.join([".venv/bin/python", *sys.argv]), "machine": machine_info()}
    rows = []

    def measure(name, fn):
        quiet = _common.wait_quiet(args.wait_quiet)
        with _common.Timer() as t:
            times = fn()
        rows.append({"path": name, **percentiles(times), "other_cores_busy": t.other_cores,
                     "other_cores_before": quiet, "_times": times})
        print({k: v for k, v in rows[-1].items() if k != "_times"}, flush=True)

    measure("in-process AsyncEngine", lambda: in_process(args.requests, args.warmup))
    server = Server("herd", args.port, MAX_MODEL_LEN, HERE / "work/serve" / stamp / "herd-overhead.log")
    server.start()
    try:
        engine_times: list[float] = []
        measure("HTTP /v1/completions", lambda: over_http(server.base_url, args.requests, args.warmup, False,
                                                          engine_times))
        totals = rows[-1].pop("_times")
        paired = {"path": "HTTP /v1/completions, paired (total - Server-Timing engine)",
                  **percentiles([t - e for t, e in zip(totals, engine_times)])}
        measure("HTTP /v1/completions, bare http.client, paired (total - Server-Timing engine)",
                lambda: over_stdlib_http(server.base_url, args.requests, args.warmup))
        bare = rows.pop()
        measure("HTTP /v1/completions stream", lambda: over_http(server.base_url, args.requests, args.warmup, True))
    finally:
        server.stop()
    floors = floor_rows(args.port + 1, args.requests, args.warmup)
    for r in rows:
        r.pop("_times", None)
    base = rows[0]["p50"]
    for r in rows:
        r["added_p50_ms"] = round(r["p50"] - base, 3)
    bare.pop("_times", None)
    for r in (paired, bare, *floors):
        r["added_p50_ms"] = r["p50"]
        rows.append(r)

    cols = [("path", "path"), ("p50", "p50 ms"), ("p90", "p90 ms"), ("p99", "p99 ms"), ("mean", "mean ms"),
            ("added_p50_ms", "added vs in-process, p50 ms"), ("other_cores_busy", "other cores busy")]
    worst = paired["added_p50_ms"]
    lines = ["# herd gateway overhead", "",
             (f"{args.requests} sequential requests (after {args.warmup} warm-up) of prompt {PROMPT!r}, "
              "max_tokens 1, greedy, on the default model; the client runs in the same process as the "
              "in-process engine, and as a separate process from `herd serve`."), "",
             md_table(rows, cols), "",
             (f"Gateway overhead, paired p50: {worst:.2f} ms with httpx, the openai SDK's client; "
              f"{bare['p50']:.2f} ms from a bare http.client connection. Target < 2 ms: "
              f"{'met' if bare['p50'] < 2 else 'NOT met'} with the bare client, {'met' if worst < 2 else 'NOT met'} "
              f"with httpx. The same clients against a server that does nothing take {floors[0]['p50']:.2f} ms "
              f"(httpx) and {floors[1]['p50']:.2f} ms (http.client), so herd's own share is about "
              f"{worst - floors[0]['p50']:.2f} / {bare['p50'] - floors[1]['p50']:.2f} ms."),
             "",
             ("The in-process client shares its process (and GIL) with the engine thread, while the HTTP "
              "client does not, and one request's time is mostly the model step (its p50-p90 spread is se"
              "veral ms): differences of a few ms between rows are within that noise; compare the non-streaming and streaming rows with each other too."), "",
             f"Server: `{server.command_line()}`", "", "## Command", "", "```", info["command"], "```", "",
             "## Machine", "", "```", json.dumps(info["machine"], indent=1), "```", ""]
    out = HERE / "results" / f"{stamp[:10]}-gateway-overhead"
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": info["command"], "machine": info["machine"],
                                                    "server": server.command_line(), "prompt": PROMPT,
                                                    "results": rows}, indent=1) + "\n")
    print(md_table(rows, cols))
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
