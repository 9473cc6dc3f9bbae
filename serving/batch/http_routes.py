"""/v1/files and /v1/batches in OpenAI's shapes (the official client's files.* and batches.*)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.api.http_errors import ApiError
from serving.batch.files import PURPOSES, FileStore
from serving.batch.jobs import BatchJobs
from serving.batch.lines import BODIES


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: Literal["24h"] = "24h"  # serving.batch.jobs.WINDOW_SECONDS
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None


def _missing(kind: str, id_: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {kind}: '{id_}'", "invalid_request_error", param, "not_found")


def batch_router(files: FileStore, jobs: BatchJobs, max_file_bytes: int) -> APIRouter:
    router = APIRouter()

    def file_or_404(file_id: str, param: str | None = None) -> dict:
        try:
            return files.get(file_id)
        except KeyError:
            raise _missing("file", file_id, param) from None

    @router.post("/v1/files")
    async def create_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose not in PURPOSES or purpose == "batch_output":
            raise ApiError(400, f"purpose: must be 'batch' or 'user_data', got {purpose!r}",
                           "invalid_request_error", "purpose")
        try:
            return await asyncio.to_thread(files.create, file.file, file.filename or "upload", purpose,
                                           max_file_bytes)
        except ValueError as e:
            raise ApiError(413, str(e), "invalid_request_error", "file", "file_too_large") from None

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None):
        data = files.list(purpose)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_or_404(file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        obj = file_or_404(file_id)
        return FileResponse(files.data_path(file_id), media_type="application/octet-stream",
                            filename=obj["filename"])

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/batches")
    async def create_batch(body: CreateBatch):
        if body.endpoint not in BODIES:
            raise ApiError(400, f"endpoint: must be one of {sorted(BODIES)}, got {body.endpoint!r}",
                           "invalid_request_error", "endpoint")
        obj = file_or_404(body.input_file_id, "input_file_id")
        if obj["purpose"] != "batch":
            raise ApiError(400, f"input_file_id: file {body.input_file_id} has purpose {obj['purpose']!r}, "
                           "not 'batch'", "invalid_request_error", "input_file_id")
        return jobs.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata)

    @router.get("/v1/batches")
    async def list_batches(limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None):
        data = jobs.list()
        if after is not None:
            ids = [b["id"] for b in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        page = data[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        try:
            return jobs.get(batch_id)
        except KeyError:
            raise _missing("batch", batch_id) from None

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        try:
            return jobs.cancel(batch_id)
        except KeyError:
            raise _missing("batch", batch_id) from None

    return router
