"""OpenAI's error shape, and the ASGI guard that applies the body limit and the API key."""

from __future__ import annotations

import json
from typing import Any


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def invalid_body(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's validation errors as a 400 naming the field (dotted path)."""
    err = errors[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return ApiError(400, f"{loc or 'body'}: {err.get('msg')}", "invalid_request_error", loc or None)


class _TooLarge(Exception):
    pass


class BodyLimitAndAuth:
    """Refuses bodies over max_body_bytes (413) and /v1 calls without the key (401) before any
    route runs; counts responses by route and status for /metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, counters,
                 max_upload_bytes: int | None = None) -> None:
        self.app, self.api_key, self.max_body_bytes, self.counters = app, api_key, max_body_bytes, counters
        # /v1/files takes uploads up to this (plus the multipart framing)
        self.max_upload_bytes = max_upload_bytes or max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = _route(path)
        status_seen = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
                self.counters.observe(route, message["status"])
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        authorized = headers.get("authorization", "") == f"Bearer {self.api_key}"
        if self.api_key and path.startswith("/v1") and not authorized:
            return await _reply(counting_send, 401, error_body(
                "Incorrect API key provided; pass it as 'Authorization: Bearer KEY'",
                "invalid_request_error", None, "invalid_api_key"))
        limit = self.max_upload_bytes + 2**16 if path == "/v1/files" else self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reply(counting_send, 413, self._too_large(limit))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        except _TooLarge:
            if "status" not in status_seen:
                await _reply(counting_send, 413, self._too_large(limit))

    @staticmethod
    def _too_large(limit: int) -> dict[str, Any]:
        return error_body(f"request body is larger than the limit of {limit} bytes",
                          "invalid_request_error", None, "request_too_large")


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/files",
           "/v1/batches")


def _route(path: str) -> str:
    """The metrics label of a path: the route, with ids folded away."""
    if path in _ROUTES:
        return path
    for prefix in ("/v1/models", "/v1/files", "/v1/batches"):
        if path.startswith(prefix + "/"):
            return prefix + "/{id}"
    return "other"


async def _reply(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
