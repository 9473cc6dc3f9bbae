"""The OpenAI Batch file format: one input line -> a request or a per-line error; the output
and error lines written back."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from serving.api.http_errors import ApiError, error_body, invalid_body
from serving.api.openai_schema import ChatCompletionRequest, CompletionRequest

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


@dataclass
class BatchRequest:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: CompletionRequest | ChatCompletionRequest


class LineError(Exception):
    """A line that yields no response; `api` is set when the HTTP API would have answered it
    with that error (the output line then carries the same status and body)."""

    def __init__(self, line: int, custom_id: str | None, message: str, param: str | None = None,
                 code: str = "invalid_request", api: ApiError | None = None) -> None:
        super().__init__(f"line {line}: {message}")
        self.line, self.custom_id, self.param, self.code, self.api = line, custom_id, param, code, api

    @classmethod
    def from_api(cls, line: int, custom_id: str | None, e: ApiError, prefix: str = "") -> LineError:
        """`prefix` places the API's field name inside the line (e.g. "body.")."""
        param = f"{prefix}{e.param}" if e.param else None
        message = e.message
        if e.param and message.startswith(e.param):
            message = prefix + message
        elif param:
            message = f"{param}: {message}"
        return cls(line, custom_id, message, param, e.code or e.type, api=e)


def custom_id_of(line: int, raw: bytes) -> tuple[dict[str, Any], str]:
    """The line's JSON object and custom_id; LineError if either is missing."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LineError(line, None, f"not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise LineError(line, None, "must be a JSON object", code="invalid_json")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineError(line, None, "custom_id: must be a non-empty string", "custom_id")
    return obj, cid


def parse_request(line: int, obj: dict[str, Any], cid: str, served_model: str,
                  endpoints: set[str] | None = None) -> BatchRequest:
    """Validates the line as the HTTP API validates a request body; a body without `model`
    gets the served model."""
    unknown = set(obj) - {"custom_id", "method", "url", "body"}
    if unknown:
        field = min(unknown)
        raise LineError(line, cid, f"{field}: unknown field", field)
    if obj.get("method", "POST") != "POST":
        raise LineError(line, cid, f"method: must be POST, got {obj.get('method')!r}", "method")
    url, allowed = obj.get("url"), sorted(endpoints or BODIES)
    if url not in allowed:
        raise LineError(line, cid, f"url: must be {' or '.join(allowed)}, got {url!r}", "url", code="invalid_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError(line, cid, "body: must be a JSON object", "body")
    body = {"model": served_model, **body}
    try:
        request = BODIES[url].model_validate(body)
    except ValidationError as e:
        raise LineError.from_api(line, cid, invalid_body(e.errors()), "body.") from None
    if request.stream:
        raise LineError(line, cid, "body.stream: a batch request cannot be streamed", "body.stream")
    return BatchRequest(line, cid, url, request)


def result_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


def error_line(e: LineError) -> dict[str, Any]:
    """`error` names the input line (and the field): resuming a run keys errors by line."""
    response = None
    if e.api is not None:
        response = {"status_code": e.api.status, "request_id": f"req_{uuid.uuid4().hex}",
                    "body": error_body(e.api.message, e.api.type, e.api.param, e.api.code)}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": e.custom_id, "response": response,
            "error": {"code": e.code, "message": str(e), "param": e.param, "line": e.line}}
