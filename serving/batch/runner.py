"""Runs an OpenAI Batch file through an engine client: lines are streamed in, requests are fed
to the engine as fast as it takes them (a window of requests in flight, never fixed chunks),
and each result is appended and flushed as it arrives. Every input line yields exactly one
output line; a rerun of the same command after a kill resumes without repeating any."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from serving.api.engine_client import EngineClient
from serving.api.http_errors import ApiError
from serving.api.openai_calls import check_model, start_chat, start_completion
from serving.batch.ledger import Ledger
from serving.batch.lines import BatchRequest, LineError, custom_id_of, error_line, parse_request, result_line

RETRIES = 3  # a request whose replica died is resubmitted this many times before the run stops


class EngineGone(RuntimeError):
    """The engine stopped serving: the run stops, and a rerun resumes where it stopped."""


@dataclass
class BatchCounts:
    total: int = 0  # request lines in the input (blank lines are not requests)
    completed: int = 0  # results in the output, this run's and earlier runs'
    failed: int = 0  # error lines, likewise
    resumed: int = 0  # lines an earlier run had already answered
    blank: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    new_completion_tokens: int = field(default=0, repr=False)

    def summary(self) -> str:
        rate = self.new_completion_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.completed} completed, {self.failed} failed of {self.total} requests"
                f"{f' ({self.resumed} from an earlier run)' if self.resumed else ''}"
                f"{f', {self.blank} blank lines skipped' if self.blank else ''}; "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens; "
                f"{self.seconds:.1f}s, {rate:.1f} generated tokens/s")


class _Writer:
    """Appends one JSON object per line and flushes it, so a kill loses at most a partial line."""

    def __init__(self, output: Path, errors: Path | None) -> None:
        self.out = open(output, "ab")  # noqa: SIM115 - closed by close()
        self.err = open(errors, "ab") if errors is not None and errors != output else self.out  # noqa: SIM115

    def write(self, obj: dict[str, Any], error: bool) -> None:
        f: IO[bytes] = self.err if error else self.out
        f.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
        f.flush()

    def close(self) -> None:
        self.out.close()
        if self.err is not self.out:
            self.err.close()


def count_lines(path: Path) -> tuple[int, int]:
    """(request lines, blank lines), read as a stream."""
    requests = blank = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                requests += 1
            else:
                blank += 1
    return requests, blank


async def run_batch(client: EngineClient, input_path: Path | str, output_path: Path | str,
                    errors_path: Path | str | None = None, *, max_in_flight: int = 512,
                    progress: bool = True, on_update: Callable[[BatchCounts], None] | None = None,
                    cancel: asyncio.Event | None = None, endpoints: set[str] | None = None) -> BatchCounts:
    """`endpoints` limits the urls lines may name (an online batch has one endpoint)."""
    input_path, output_path = Path(input_path), Path(output_path)
    errors_path = Path(errors_path) if errors_path is not None else None
    ledger = Ledger.load(output_path, errors_path)
    counts = BatchCounts(completed=len(ledger.result_ids), failed=len(ledger.error_lines),
                         resumed=ledger.num_done, prompt_tokens=ledger.prompt_tokens,
                         completion_tokens=ledger.completion_tokens)
    counts.total, counts.blank = count_lines(input_path)
    served = client.models()[0].id
    writer = _Writer(output_path, errors_path)
    bar = tqdm(total=counts.total, initial=counts.resumed, unit="req", desc="batch", disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    window = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task] = set()
    gone: list[BaseException] = []

    def finished(obj: dict[str, Any], error: bool) -> None:
        writer.write(obj, error)
        if error:
            counts.failed += 1
        else:
            counts.completed += 1
            used = obj["response"]["body"]["usage"]
            counts.prompt_tokens += used["prompt_tokens"]
            counts.completion_tokens += used["completion_tokens"]
            counts.new_completion_tokens += used["completion_tokens"]
        counts.seconds = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(failed=counts.failed, tok_s=f"{counts.new_completion_tokens / max(counts.seconds, 1e-9):.1f}",
                        refresh=False)
        if on_update is not None:
            on_update(counts)

    async def serve(req: BatchRequest) -> None:
        try:
            body = await _answer(client, req)
            finished(result_line(req.custom_id, body), False)
        except LineError as e:
            finished(error_line(e), True)
        except EngineGone as e:
            gone.append(e)
        finally:
            window.release()

    seen: set[str] = set()
    try:
        with open(input_path, "rb") as f:  # noqa: ASYNC230 - a local file, a line at a time
            for n, raw in enumerate(f, 1):
                if gone or (cancel is not None and cancel.is_set()):
                    break
                if not raw.strip():
                    continue
                cid, first = None, True
                try:
                    obj, cid = custom_id_of(n, raw)
                    first = cid not in seen
                    seen.add(cid)
                    if ledger.is_done(n, cid, first):
                        continue
                    if not first:
                        raise LineError(n, cid, f"custom_id: {cid!r} is a duplicate of an earlier line",
                                        "custom_id", code="duplicate_custom_id")
                    req = parse_request(n, obj, cid, served, endpoints)
                except LineError as e:
                    if not ledger.is_done(n, cid, first):
                        finished(error_line(e), True)
                    continue
                await window.acquire()
                task = asyncio.create_task(serve(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        while tasks and not gone and not (cancel is not None and cancel.is_set()):
            await asyncio.wait(list(tasks), timeout=0.25)
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        counts.seconds = time.perf_counter() - start
        bar.close()
        writer.close()
    if gone:
        raise gone[0]
    return counts


async def _answer(client: EngineClient, req: BatchRequest) -> dict[str, Any]:
    """The HTTP API's response body for the request; LineError for what it would refuse."""
    for attempt in range(RETRIES + 1):
        try:
            check_model(client, req.body.model)
            start = start_chat if req.url == "/v1/chat/completions" else start_completion
            return await start(client, req.body).run()
        except ApiError as e:
            if e.status != 503:
                raise LineError.from_api(req.line, req.custom_id, e, "body.") from None
            if attempt == RETRIES:
                raise EngineGone(f"line {req.line}: {e.message}") from None
            await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
