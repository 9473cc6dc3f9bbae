"""asyncio front of the engine: the step loop runs in its own thread; callers stream outputs.

Given a factory instead of an engine, that thread builds the engine too, so that loading, warm-up
and steps share one OpenMP team (why that matters: compute_thread.py).

Everything that touches the scheduler happens on the engine thread (requests and aborts are
queued to it); validation and tokenisation happen on the caller's side so that a bad request
fails at once with its ParamError.

`inline=True` runs the step loop as a task on the caller's event loop instead, for offline
batch, where that loop has nothing else to do: with one thread there is no GIL hand-off between
the loop and the engine in every step (`herd batch` on 2 cores: 0.81 of the engine's offline
throughput with a thread, 0.97 inline; benchmarks/results/*-batch-*). A step then blocks the loop
while it runs. Which thread steps matters on CPU too: benchmarks/engine_thread.py.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.engine.compute_thread import ComputeThread
from serving.engine.engine import LLMEngine, PromptInput
from serving.engine.outputs import ModelCard, RequestOutput
from serving.engine.sampling_params import ParamError, SamplingParams
from serving.engine.stats import EngineStats, ReplicaState


class EngineDeadError(RuntimeError):
    """The engine loop crashed; requests in flight end with this error."""


class AsyncEngine:
    tool_call_parser: str | None = None  # how the gateway reads tool calls (None: from the chat template)

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], inline: bool = False,
                 compute: ComputeThread | None = None) -> None:
        """`engine`: an engine, or a factory that builds one on the thread that will step it.
        `compute`: the thread to step on (default: a new one, closed by shutdown)."""
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self.created = int(time.time())
        self._inline, self._pump_task = inline, None
        self._compute, self._owns_compute, self._looping = None, compute is None, None
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        if inline:
            self.engine = build()
            return
        self._compute = compute or ComputeThread("herd-engine")
        try:
            self.engine = self._compute.call(build)
        except BaseException:
            if self._owns_compute:
                self._compute.close()
            raise
        self._looping = self._compute.submit(self._loop)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def models(self) -> list[ModelCard]:
        return [ModelCard(self.engine.model_name, self.created, self.engine.max_model_len)]

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yields delta outputs until the request finishes; leaving early aborts it."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        if request_id in self._streams:
            raise ParamError("request_id", f"{request_id!r} is already running")
        ids, text = self.engine.tokenize(prompt)
        self.engine.check_prompt(ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, {"prompt_token_ids": ids, "prompt": text}, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.get_stats()

    def replica_states(self) -> list[ReplicaState]:
        return [ReplicaState(0, self.error is None, 0, self.stats())]

    def num_in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._looping is not None:
            try:
                self._looping.exception(timeout=30)
            except TimeoutError:
                pass
            if self._owns_compute:
                self._compute.close()

    # -- engine thread --------------------------------------------------------------------

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)
        self._wake.set()
        if self._inline and (self._pump_task is None or self._pump_task.done()):
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply_commands(self) -> None:
        while not self._commands.empty():
            cmd = self._commands.get()
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as e:
                    self._deliver(rid, e)
            else:
                self.engine.abort(cmd[1])

    def _fail(self, e: BaseException) -> None:
        self.error = e
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError(f"the engine stopped: {e!r}"))

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:
            self._fail(e)
            raise

    async def _pump(self) -> None:
        """The inline step loop: steps while there is work, yielding to the event loop between
        steps so that outputs are consumed and new requests come in."""
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    return
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                await asyncio.sleep(0)
        except Exception as e:  # noqa: BLE001 - every stream gets EngineDeadError
            self._fail(e)
