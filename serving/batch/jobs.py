"""Online batches (/v1/batches): each batch is a record on disk and a task that runs its input
file through the batch runner. The runner appends to the batch's output files as it goes, so a
batch interrupted by a restart carries on where it stopped when the server comes back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.api.engine_client import EngineClient
from serving.batch.files import FileStore, write_json
from serving.batch.runner import BatchCounts, run_batch

log = logging.getLogger("herd.batch")

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW_SECONDS = {"24h": 24 * 3600}


class BatchJobs:
    def __init__(self, root: Path | str, files: FileStore, client: Callable[[], EngineClient | None],
                 max_in_flight: int = 256) -> None:
        self.root = Path(root) / "batches"
        self.root.mkdir(parents=True, exist_ok=True)
        self.files, self.client, self.max_in_flight = files, client, max_in_flight
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancels: dict[str, asyncio.Event] = {}
        self.live: dict[str, dict[str, Any]] = {}  # records of running batches: one copy, shared

    # records ---------------------------------------------------------------------------
    def _path(self, batch_id: str) -> Path:
        if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
            raise KeyError(batch_id)
        return self.root / f"{batch_id}.json"

    def _save(self, rec: dict[str, Any]) -> None:
        write_json(self._path(rec["id"]), rec)

    def _load(self, batch_id: str) -> dict[str, Any]:
        if batch_id in self.live:
            return self.live[batch_id]
        try:
            return json.loads(self._path(batch_id).read_text())
        except (FileNotFoundError, KeyError):
            raise KeyError(batch_id) from None

    @staticmethod
    def public(rec: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in rec.items() if not k.startswith("_")}

    def get(self, batch_id: str) -> dict[str, Any]:
        return self.public(self._load(batch_id))

    def list(self) -> list[dict[str, Any]]:
        recs = [json.loads(p.read_text()) for p in self.root.glob("batch_*.json")]
        return [self.public(r) for r in sorted(recs, key=lambda r: (r["created_at"], r["id"]), reverse=True)]

    # lifecycle -------------------------------------------------------------------------
    def create(self, input_file_id: str, endpoint: str, completion_window: str,
               metadata: dict[str, str] | None) -> dict[str, Any]:
        now = int(time.time())
        rec = {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
               "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
               "expires_at": now + WINDOW_SECONDS[completion_window], "finalizing_at": None,
               "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
               "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
               "metadata": metadata, "model": None, "usage": None,
               # where the runner writes; published as files when the batch finishes
               "_output_id": FileStore.new_id(), "_error_id": FileStore.new_id()}
        self._save(rec)
        self._start(rec)
        return self.public(rec)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        rec = self._load(batch_id)
        if rec["status"] in ("validating", "in_progress"):
            rec["status"], rec["cancelling_at"] = "cancelling", int(time.time())
            self._save(rec)
            if batch_id in self.cancels:
                self.cancels[batch_id].set()
        return self.public(rec)

    def resume_all(self) -> None:
        """Restarts every batch a previous server left unfinished."""
        for p in sorted(self.root.glob("batch_*.json")):
            rec = json.loads(p.read_text())
            if rec["status"] in ACTIVE and rec["id"] not in self.tasks:
                log.info("resuming batch %s (%s)", rec["id"], rec["status"])
                self._start(rec)

    async def stop(self) -> None:
        """Stops the tasks (a shutdown); their records stay as they are, to resume later."""
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _start(self, rec: dict[str, Any]) -> None:
        batch_id = rec["id"]
        self.live[batch_id], self.cancels[batch_id] = rec, asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(rec))
        self.tasks[batch_id] = task

        def done(_) -> None:
            for d in (self.tasks, self.live, self.cancels):
                d.pop(batch_id, None)
        task.add_done_callback(done)

    async def _run(self, rec: dict[str, Any]) -> None:
        batch_id = rec["id"]
        cancel = self.cancels[batch_id]
        if rec["status"] == "cancelling":
            cancel.set()
        try:
            if rec["status"] in ("validating", "in_progress", "cancelling") and not cancel.is_set():
                client = await self._wait_for_client()
                rec["model"] = client.models()[0].id
                if rec["status"] == "validating":
                    rec.update(status="in_progress", in_progress_at=int(time.time()))
                    self._save(rec)
                await self._process(rec, client, cancel)
            await asyncio.to_thread(self._finalize, rec, cancel.is_set())
        except Exception as e:  # recorded on the batch; the server keeps serving
            log.exception("batch %s failed", batch_id)
            rec.update(status="failed", failed_at=int(time.time()),
                       errors={"object": "list", "data": [{"code": "batch_failed", "message": str(e),
                                                           "param": None, "line": None}]})
            self._save(rec)

    async def _wait_for_client(self) -> EngineClient:
        while (client := self.client()) is None:
            await asyncio.sleep(0.2)
        return client

    async def _process(self, rec: dict[str, Any], client: EngineClient, cancel: asyncio.Event) -> None:
        try:
            src = self.files.data_path(rec["input_file_id"])
            self.files.get(rec["input_file_id"])
        except KeyError:
            raise ValueError(f"input_file_id: file {rec['input_file_id']} no longer exists") from None
        last = [0.0]

        def update(counts: BatchCounts, force: bool = False) -> None:
            rec["request_counts"] = {"total": counts.total, "completed": counts.completed,
                                     "failed": counts.failed}
            rec["usage"] = {"input_tokens": counts.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": counts.completion_tokens,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": counts.prompt_tokens + counts.completion_tokens}
            if force or time.monotonic() - last[0] > 0.5:  # persisted twice a second at most
                last[0] = time.monotonic()
                self._save(rec)

        counts = await run_batch(client, src, self.files.data_path(rec["_output_id"]),
                                 self.files.data_path(rec["_error_id"]), max_in_flight=self.max_in_flight,
                                 progress=False, on_update=update, cancel=cancel, endpoints={rec["endpoint"]})
        update(counts, force=True)

    def _finalize(self, rec: dict[str, Any], cancelled: bool) -> None:
        if not cancelled:
            rec.update(status="finalizing", finalizing_at=rec["finalizing_at"] or int(time.time()))
            self._save(rec)
        for key, out_key, name in (("_output_id", "output_file_id", "output"),
                                   ("_error_id", "error_file_id", "errors")):
            path = self.files.data_path(rec[key])
            if path.exists() and path.stat().st_size > 0:
                self.files.publish(rec[key], f"{rec['id']}_{name}.jsonl", "batch_output")
                rec[out_key] = rec[key]
            else:
                path.unlink(missing_ok=True)
        now = int(time.time())
        if cancelled:
            rec.update(status="cancelled", cancelled_at=now)
        else:
            rec.update(status="completed", completed_at=now)
        self._save(rec)
