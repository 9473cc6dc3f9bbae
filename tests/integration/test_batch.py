"""Batch files through the engine: every line answered once, bodies equal to the HTTP API's."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.api.admission import Admission
from serving.batch.runner import run_batch
from tests.integration.servers import HttpServer, async_engine, wait_idle

DEFAULT = "SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a red fox", "prime numbers", "Paris", "the moon", "bread", "rain", "a violin",
          "chess", "volcanoes"]


@pytest.fixture(scope="module")
def engine(default_fp32):
    eng = async_engine(default_fp32, served_model_name=DEFAULT)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    admission = Admission()
    admission.client = engine
    srv = HttpServer(admission)
    yield srv
    srv.stop()


def valid_request(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    kind = i % 5
    if kind == 0:
        return {"url": "/v1/chat/completions", "body": {
            "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
            "max_tokens": 6, "temperature": 0}}
    if kind == 1:
        return {"url": "/v1/chat/completions", "body": {
            "model": DEFAULT, "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": f"Name a fact about {topic}."}],
            "max_completion_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}}
    if kind == 2:
        return {"url": "/v1/completions", "body": {"prompt": f"A poem about {topic}:", "max_tokens": 6,
                                                   "temperature": 0, "stop": ["\n\n"]}}
    if kind == 3:
        return {"url": "/v1/completions", "body": {"prompt": [f"{topic} is", f"I saw {topic}"], "max_tokens": 4,
                                                   "temperature": 0, "echo": True, "logprobs": 1}}
    return {"url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": f"Say something about {topic}."}], "max_tokens": 5,
        "temperature": 0.8, "seed": i, "n": 2}}


MALFORMED = [  # (line text, the field the error names)
    ('{"custom_id": "broken", "url": ', None),
    (json.dumps({"url": "/v1/completions", "body": {"prompt": "x"}}), "custom_id"),
    (json.dumps({"custom_id": "req-3", "url": "/v1/completions", "body": {"prompt": "dup"}}), "custom_id"),
    (json.dumps({"custom_id": "bad-url", "url": "/v1/embeddings", "body": {"input": "x"}}), "url"),
    (json.dumps({"custom_id": "bad-max", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 0}}),
     "body.max_tokens"),
    (json.dumps({"custom_id": "bad-field", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": "x"}], "temprature": 1}}), "body.temprature"),
    (json.dumps({"custom_id": "too-long", "url": "/v1/completions",
                 "body": {"prompt": "word " * 1100, "max_tokens": 4}}), "body.prompt"),
    (json.dumps({"custom_id": "bad-model", "url": "/v1/completions",
                 "body": {"model": "gpt-4o", "prompt": "x"}}), "body.model"),
    (json.dumps({"custom_id": "streamed", "url": "/v1/completions",
                 "body": {"prompt": "x", "stream": True}}), "body.stream"),
    (json.dumps({"custom_id": "no-body", "url": "/v1/completions", "body": [1, 2]}), "body"),
]


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """200 lines: 190 valid requests with 10 malformed ones spread among them."""
    lines, valid, bad_lines = [], {}, {}
    bad = iter(MALFORMED)
    for n in range(1, 201):
        if n % 20 == 7:
            text, field = next(bad)
            lines.append(text)
            bad_lines[n] = field
        else:
            req = {"custom_id": f"req-{len(valid)}", "method": "POST", **valid_request(len(valid))}
            valid[req["custom_id"]] = req
            lines.append(json.dumps(req))
    path = tmp_path_factory.mktemp("batch") / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, valid, bad_lines


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def strip_ids(body: dict) -> dict:
    """Without what differs between two runs of a request: ids, times, prefix-cache hits."""
    body = {k: v for k, v in body.items() if k not in ("id", "created")}
    body["usage"] = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return body


def same(a, b, path="body") -> None:
    """Equal, except logprobs within 1e-4: batch mates change the float sums a little."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) < 1e-4, path
    else:
        assert a == b, path


def test_mixed_file_every_line_once_and_bodies_equal_http(engine, server, mixed_file, tmp_path):
    path, valid, bad_lines = mixed_file
    out, err = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    counts = asyncio.run(run_batch(engine, path, out, err, max_in_flight=64, progress=False))
    results, errors = read_lines(out), read_lines(err)
    assert (counts.total, counts.completed, counts.failed) == (200, 190, 10)
    assert len(results) == 190 and len(errors) == 10
    assert sorted(r["custom_id"] for r in results) == sorted(valid)  # each exactly once
    assert {e["error"]["line"]: e["error"]["param"] for e in errors} == bad_lines
    for e in errors:
        assert e["error"]["message"].startswith(f"line {e['error']['line']}: ")
    wait_idle(engine)

    def http(req: dict) -> dict:
        body = {"model": DEFAULT, **req["body"]}
        r = httpx.post(server.url + req["url"], json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        expected = dict(zip(valid, pool.map(http, valid.values())))
    for r in results:
        assert r["response"]["status_code"] == 200 and r["error"] is None
        body = r["response"]["body"]
        assert body["model"] == DEFAULT  # as /v1/models lists it, also when the line named none
        same(strip_ids(body), strip_ids(expected[r["custom_id"]]), r["custom_id"])


def test_rerun_skips_what_is_written_and_redoes_a_cut_line(engine, mixed_file, tmp_path):
    path, valid, bad_lines = mixed_file
    out = tmp_path / "all.jsonl"  # results and errors in one file
    asyncio.run(run_batch(engine, path, out, max_in_flight=32, progress=False))
    lines = out.read_bytes().splitlines(keepends=True)
    kept = lines[:150]
    out.write_bytes(b"".join(kept) + lines[150][:40])  # as if killed mid-write
    counts = asyncio.run(run_batch(engine, path, out, max_in_flight=32, progress=False))
    assert counts.resumed == 150 and (counts.completed, counts.failed) == (190, 10)
    final = read_lines(out)
    assert len(final) == 200
    assert sorted(r["custom_id"] for r in final if r["error"] is None) == sorted(valid)
    assert sorted(r["error"]["line"] for r in final if r["error"] is not None) == sorted(bad_lines)
    assert final[:150] == [json.loads(x) for x in kept]  # what was there is untouched


def test_cancel_stops_feeding_and_aborts_in_flight(engine, mixed_file, tmp_path):
    path, _, _ = mixed_file
    out = tmp_path / "cancelled.jsonl"

    async def run():
        cancel = asyncio.Event()

        def update(counts):
            if counts.completed >= 5:
                cancel.set()
        return await run_batch(engine, path, out, max_in_flight=8, progress=False, on_update=update,
                               cancel=cancel)

    counts = asyncio.run(run())
    assert 5 <= counts.completed < 190
    assert len(read_lines(out)) == counts.completed + counts.failed
    wait_idle(engine, timeout=5)  # the aborted requests freed their blocks


def test_inline_engine_steps_on_the_callers_loop_with_the_same_results(default_fp32, engine, mixed_file, tmp_path):
    """herd batch's engine front: no engine thread; the same lines come out as with the threaded one."""
    path, valid, _ = mixed_file
    inline = async_engine(default_fp32, served_model_name=DEFAULT, inline=True)
    try:
        asyncio.run(run_batch(inline, path, tmp_path / "inline.jsonl", max_in_flight=64, progress=False))
        asyncio.run(run_batch(engine, path, tmp_path / "threaded.jsonl", max_in_flight=64, progress=False))
    finally:
        inline.shutdown()
    assert inline._compute is None

    def split(name):
        lines = read_lines(tmp_path / name)
        return ({r["custom_id"]: r["response"]["body"] for r in lines if r["error"] is None},
                {r["error"]["line"]: r["error"]["message"] for r in lines if r["error"] is not None})
    (got, got_errors), (want, want_errors) = split("inline.jsonl"), split("threaded.jsonl")
    assert got.keys() == want.keys() == valid.keys() and got_errors == want_errors
    for cid in valid:
        same(strip_ids(got[cid]), strip_ids(want[cid]), cid)
