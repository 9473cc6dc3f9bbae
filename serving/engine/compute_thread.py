"""One thread for every torch call of an engine: loading, warm-up and the step loop.

Why one: torch's CPU ops run on OpenMP (libgomp). Each thread that starts a parallel region gets a
team of its own, and once libgomp manages more threads than there are cores it stops spinning
its idle workers and puts them to sleep after every region (its throttled spin count). Every op
of a step then pays a futex wake-up: loading on one thread and stepping on another made a
compiled decode step of the default model ~51 ms instead of ~28 ms on the 2-core Xeon
(benchmarks/engine_thread.py, results/2026-11-29-engine-thread.md). Loading and stepping on the
same thread, with no other thread running big torch ops, keeps one team and the fast path.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread that runs the calls submitted to it, one after another, in order."""

    def __init__(self, name: str = "herd-compute") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the thread and returns its result (or raises its exception)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        return self.submit(fn, *args).result()

    def close(self, timeout: float | None = None) -> None:
        """Lets the calls already submitted finish, then ends the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)
