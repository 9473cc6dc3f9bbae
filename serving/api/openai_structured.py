"""Request fields that constrain the output -> the engine's StructuredOutput: OpenAI's
`response_format` and vLLM's `structured_outputs` extra (json, regex, choice, grammar)."""

from __future__ import annotations

import json
from typing import Any

from serving.engine.sampling_params import ParamError
from serving.engine.structured import StructuredOutput


def from_response_format(rf: dict[str, Any] | None) -> StructuredOutput | None:
    if rf is None:
        return None
    kind = rf.get("type")
    extra = set(rf) - {"type", "json_schema"}
    if extra:
        raise ParamError(f"response_format.{min(extra)}", "unknown field")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", "")
    if kind != "json_schema":
        raise ParamError("response_format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ParamError("response_format.json_schema", "must be an object with a 'name' and a 'schema'")
    extra = set(spec) - {"name", "description", "schema", "strict"}
    if extra:
        raise ParamError(f"response_format.json_schema.{min(extra)}", "unknown field")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ParamError("response_format.json_schema.schema", "must be a JSON Schema object")
    return StructuredOutput.json_schema(schema, "response_format.json_schema.schema")


def from_structured_outputs(so: dict[str, Any] | None) -> StructuredOutput | None:
    """vLLM's extra field: exactly one of json (schema object or its JSON text), regex, choice,
    grammar (Lark or GBNF)."""
    if not so:
        return None
    given = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None]
    extra = set(so) - {"json", "regex", "choice", "grammar"}
    if extra:
        raise ParamError(f"structured_outputs.{min(extra)}", "unknown field")
    if len(given) != 1:
        raise ParamError("structured_outputs", "give exactly one of json, regex, choice, grammar")
    key = given[0]
    value, param = so[key], f"structured_outputs.{key}"
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ParamError(param, f"not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ParamError(param, "must be a JSON Schema object")
        return StructuredOutput.json_schema(value, param)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ParamError(param, "must be a non-empty list of non-empty strings")
        return StructuredOutput("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise ParamError(param, "must be a non-empty string")
    return StructuredOutput(key, value, param)


def pick(*candidates: StructuredOutput | None) -> StructuredOutput | None:
    found = [c for c in candidates if c is not None]
    if len(found) > 1:
        raise ParamError(found[1].param.split(".")[0], f"conflicts with {found[0].param.split('.')[0]}: "
                                                          "give one output constraint")
    return found[0] if found else None
