"""Non-streamed generation calls without FastAPI's request pipeline.

A POST to /v1/completions or /v1/chat/completions whose JSON body validates and does not ask to
stream runs its route's handler straight from this ASGI middleware, skipping FastAPI's routing,
dependency solving and exception layers (benchmarks/gateway_overhead.py, bare-client paired p50
of a 1-token request: 1.75 ms before, results/2026-11-29-gateway-overhead.md; 1.23 ms after,
results/2026-11-30-gateway-overhead.md). Everything else - streaming, a body that does not parse
or validate, every other route - goes on to FastAPI unchanged, so errors keep one shape and the
routes still document the API.
The body is validated as FastAPI does it (json.loads, then the model in Python mode).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Any, Request], Awaitable[Response]]


class FastPath:
    def __init__(self, app, routes: dict[str, tuple[type[BaseModel], Handler]],
                 on_error: Callable[[Exception], Response | None]) -> None:
        """`routes`: path -> (body model, handler(body, request)); `on_error` turns an exception
        the handler raises into a response, or None to let it propagate."""
        self.app, self.routes, self.on_error = app, routes, on_error

    async def __call__(self, scope, receive, send):
        post = scope["type"] == "http" and scope["method"] == "POST"
        route = self.routes.get(scope["path"]) if post else None
        if route is None or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        model, handler = route
        try:
            parsed = model.model_validate(json.loads(body))
        except (ValueError, ValidationError):  # FastAPI answers these, in the API's error shape
            parsed = None
        if parsed is None or getattr(parsed, "stream", False):
            return await self.app(scope, _replay(body, receive), send)
        request = Request(scope, receive)
        try:
            response = await handler(parsed, request)
        except Exception as e:
            response = self.on_error(e)
            if response is None:
                raise
        await response(scope, receive, send)


def _is_json(scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _replay(body: bytes, receive):
    """A receive that yields the body already read, then the connection's own messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
