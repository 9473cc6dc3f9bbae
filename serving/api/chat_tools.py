"""Tool calling in chat completions: how tools reach the prompt, what constrains the output, and
how the generated text becomes `tool_calls` (whole, or as streamed deltas).

tool_choice "auto": the model writes calls in its own format and the model's parser reads them;
text that is not a valid call stays content; with parallel_tool_calls=false only the first call
is returned. "required" and a named function are enforced while
decoding (structured outputs): a JSON list of {name, arguments} alternatives, or the named
function's arguments object, so the call always parses and validates against its schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.api.tool_parsers import ToolParser, detect_parser, get_parser
from serving.engine.sampling_params import ParamError
from serving.engine.structured import StructuredOutput

# For chat templates that know nothing of tools: the tools go into the system message and the
# model is asked for <tool_call> blocks (the "hermes" parser reads them).
_FALLBACK = ("# Tools\n\nYou can call functions to help answer. Their signatures, one JSON object per line:\n"
             "<tools>\n{tools}\n</tools>\n\nTo call a function, reply with one block per call:\n"
             '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n'
             "</tool_call>")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass
class ChatTools:
    tools: list[dict[str, Any]]  # [{"type": "function", "function": {name, description?, parameters?}}]
    mode: str  # "none" | "auto" | "required" | "named"
    parser: ToolParser
    named: str | None = None
    parallel: bool = True
    native: bool = False  # the chat template renders tools itself

    @classmethod
    def from_request(cls, tools: list[dict] | None, tool_choice: Any, parallel: bool | None,
                     chat_template: str | None, parser_name: str | None = None) -> ChatTools | None:
        if not tools:
            if tool_choice not in (None, "none"):
                raise ParamError("tool_choice", "needs `tools`")
            return None
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ParamError("tools", "function names must be unique")
        named = None
        if isinstance(tool_choice, dict):
            named = tool_choice["function"]["name"]
            if named not in names:
                raise ParamError("tool_choice", f"names {named!r}, which is not among the tools")
            mode = "named"
        else:
            mode = tool_choice or "auto"
        template_has_tools = bool(chat_template) and "tools" in chat_template
        name = parser_name or (detect_parser(chat_template) if template_has_tools else "hermes")
        return cls(tools, mode, get_parser(name), named, parallel is not False, template_has_tools)

    def _schema(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object"}

    def structured(self) -> StructuredOutput | None:
        if self.mode == "named":
            return StructuredOutput.json_schema(self._schema(self.named), "tool_choice")
        if self.mode == "required":
            alternatives = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                              "arguments": self._schema(t["function"]["name"])},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput.json_schema(schema, "tool_choice")
        return None

    def render(self, messages: list[dict[str, Any]]) -> tuple[list[dict], list | None]:
        """(messages, tools) for the chat template."""
        if self.mode == "none":
            return messages, None
        if self.native:
            return messages, self.tools
        messages = [_plain_turn(m) for m in messages]
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.tools)
        prompt = _FALLBACK.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]], None
        return [{"role": "system", "content": prompt}, *messages], None

    def complete(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """(content, tool_calls, finish_reason) of a whole choice."""
        if self.mode == "none":
            return text, [], finish_reason
        if self.mode == "named":
            return None, [_call(self.named, text)], finish_reason  # OpenAI: a forced call finishes "stop"
        if self.mode == "required":
            calls = _required_calls(text)
            if calls is None:
                return text, [], finish_reason
            return None, [_call(n, a) for n, a in calls], "tool_calls" if finish_reason == "stop" else finish_reason
        parsed = self.parser.parse(text)
        if not parsed.tool_calls:
            return text, [], finish_reason
        # parallel_tool_calls=false asks for at most one call: the model's first one (as vLLM and
        # OpenAI reply); "required" already allows only one while decoding.
        found = parsed.tool_calls if self.parallel else parsed.tool_calls[:1]
        calls = [_call(c.name, c.arguments) for c in found]
        return parsed.content, calls, "tool_calls" if finish_reason == "stop" else finish_reason

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


def _plain_turn(m: dict[str, Any]) -> dict[str, Any]:
    """A tool turn as text, for templates without tool roles: calls as <tool_call> blocks, results
    as a user turn in <tool_response> tags."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    if m.get("tool_calls"):
        blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                             ensure_ascii=False) for c in m["tool_calls"]]
        text = "".join(f"\n<tool_call>\n{b}\n</tool_call>" for b in blocks)
        return {"role": m["role"], "content": (m["content"] + text).strip()}
    return m


def _required_calls(text: str) -> list[tuple[str, str]] | None:
    try:
        items = json.loads(text)
        return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
    except (json.JSONDecodeError, TypeError, KeyError):
        return None  # cut short by max_tokens: the text stays content


@dataclass
class ChoiceStream:
    """One choice's streamed deltas: content as it comes, except text that may be a tool call,
    which is held back until it is known to be one (then sent as tool_calls) or not."""

    tools: ChatTools | None
    text: str = ""  # the whole output so far
    sent: int = 0  # how much of it went out as content
    started: bool = False  # named mode: the call's header went out
    _id: str = field(default_factory=_call_id)

    def _header(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "id": self._id, "type": "function",
                                "function": {"name": self.tools.named, "arguments": ""}}]}

    def feed(self, text: str) -> list[dict[str, Any]]:
        mode = self.tools.mode if self.tools else "none"
        if not text:
            return []
        if mode == "none":
            return [{"content": text}]
        if mode == "named":
            out = [] if self.started else [self._header()]
            self.started = True
            return [*out, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        self.text += text
        if mode == "required":
            return []
        start = self.tools.parser.call_start(self.text)  # on the whole output: calls may need its start
        # trailing whitespace is held too (a call may follow it), so streamed content equals the
        # unstreamed reply's, which drops the whitespace around calls
        cut = max(self.sent, len(self.text[:start].rstrip()))
        piece, self.sent = self.text[self.sent:cut], max(self.sent, cut)
        return [{"content": piece}] if piece else []

    def end(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        mode = self.tools.mode if self.tools else "none"
        if mode == "named":
            return ([] if self.started else [self._header()]), finish_reason  # the call is named even if empty
        held = self.text[self.sent:]
        if mode == "none" or not held:
            return [], finish_reason
        content, calls, reason = self.tools.complete(self.text, finish_reason)
        if not calls:
            return [{"content": held}], finish_reason
        sent = self.text[:self.sent]
        rest = (content or "")[len(sent):].strip() if (content or "").startswith(sent) else ""
        out = [{"content": rest}] if rest else []
        return out + [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)], reason
