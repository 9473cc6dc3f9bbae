"""Turn a model's generated text into OpenAI content + tool calls, one parser per format a chat
template teaches: a pythonic call list (Llama 4, Llama 3.2), JSON objects (Llama 3.x) and
<tool_call> tags (Hermes, Qwen, and herd's own fallback prompt).

parse() never raises: text that is not a well-formed call stays content, because a model that
half-followed the format still said something the client should see. Every place parse() accepts
a call is also a place call_start() flags, so a streaming server never sends as content text that
the final parse turns into a call."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it


@dataclass
class Parsed:
    content: str | None  # text outside the calls, stripped; None if empty
    tool_calls: list[ToolCall]


# What malformed model output can raise from ast, json and json.dumps; caught so parse() never raises.
_BAD = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)

Span = tuple[int, int, list[ToolCall]]  # start, end, the calls text[start:end] holds


def _partial_tail(text: str, marker: str) -> int | None:
    """Where text ends in a proper prefix of marker, i.e. the marker may still be being generated."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return None


def _earliest(*found: int | None) -> int | None:
    at = [i for i in found if i is not None and i >= 0]
    return min(at) if at else None


class ToolParser:
    name: str = ""
    _try: re.Pattern[str]  # where a call may begin; _span_at decides whether one does

    def parse(self, text: str) -> Parsed:
        calls: list[ToolCall] = []
        rest: list[str] = []
        pos = 0
        for start, end, found in self._spans(text):
            rest.append(text[pos:start])
            calls.extend(found)
            pos = end
        if not calls:
            return Parsed(text, [])  # untouched: nothing was taken out of it
        rest.append(text[pos:])
        return Parsed("".join(rest).strip() or None, calls)

    def call_start(self, text: str) -> int | None:
        """Index in `text` (the output so far, possibly incomplete) where a tool call starts or may be
        starting, so a streaming server holds text back from there; None when nothing in text could
        begin a call (then all of it can be streamed as content)."""
        raise NotImplementedError

    def _spans(self, text: str) -> Iterator[Span]:
        pos = 0
        while m := self._try.search(text, pos):
            span = self._span_at(text, m)
            if span:
                yield span
            pos = span[1] if span else m.start() + 1

    def _span_at(self, text: str, m: re.Match[str]) -> Span | None:
        """The call(s) beginning where _try matched, or None if none does."""
        raise NotImplementedError


# ---- pythonic: [get_weather(city="Paris"), get_time(tz="UTC")] ----

_PY_OPEN, _PY_CLOSE = "<|python_start|>", "<|python_end|>"
_IDENT = r"[A-Za-z_][\w.]*"
# Where parse() tries a call: the python tag anywhere, `[name(` at the start or after whitespace (not
# "see[1]" or "f([x(") or a bare `name(` opening the output.
_PY_TRY = re.compile(rf"<\|python_start\|>|(?:^|(?<=\s))\[(?=\s*{_IDENT}\s*\()|^\s*(?={_IDENT}\s*\()")
# What may still grow into a call while streaming: after `name(` must come `kw=`, `)` or the end
# so far, which lets prose like "[Paris (France)]" or "Sure (I'll check)" stream on.
_CALL_HEAD = rf"{_IDENT}\s*(?:\(\s*(?:[A-Za-z_]\w*\s*(?:=|\Z)|\)|\Z)|\Z)"
_PY_MAYBE = re.compile(rf"(?:^|(?<=\s))\[\s*(?:{_CALL_HEAD}|\Z)|^\s*{_CALL_HEAD}")
_JSONISH = {"true": True, "false": False, "null": None}  # models mix JSON literals into Python


def _py_value(node: ast.expr) -> object:
    if isinstance(node, ast.Name) and node.id in _JSONISH:
        return _JSONISH[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_py_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("**mapping inside a dict literal")
        return {_py_value(k): _py_value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)  # never eval: anything but a literal raises ValueError


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError("a call's function must be a (dotted) name")


def _py_call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a keyword-only call")
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs in a call")
        args[kw.arg] = _py_value(kw.value)
    return ToolCall(_dotted(node.func), json.dumps(args, ensure_ascii=False))


def _py_calls(src: str) -> list[ToolCall] | None:
    """The calls in src if it is exactly a list of calls or one call, else None."""
    try:
        body = ast.parse(src.strip(), mode="eval").body
        nodes = body.elts if isinstance(body, ast.List) else [body]
        return [_py_call(n) for n in nodes] or None
    except _BAD:
        return None


def _closing(text: str, start: int) -> int | None:
    """Just past the bracket that closes the one at start. One pass that skips string literals, so a
    "]" inside an argument neither ends the list nor costs a parse attempt per "]"."""
    depth, quote, i = 0, "", start
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


class PythonicParser(ToolParser):
    name = "pythonic"
    _try = _PY_TRY

    def call_start(self, text: str) -> int | None:
        m = _PY_MAYBE.search(text)
        return _earliest(m.start() if m else None, text.find(_PY_OPEN), _partial_tail(text, _PY_OPEN))

    def _span_at(self, text: str, m: re.Match[str]) -> Span | None:
        start, after = m.span()
        if text.startswith(_PY_OPEN, start):
            close = text.find(_PY_CLOSE, after)
            inner_end = close if close >= 0 else len(text)
            calls = _py_calls(text[after:inner_end])
            return calls and (start, inner_end + (len(_PY_CLOSE) if close >= 0 else 0), calls)
        if text[start] != "[":  # a bare call counts only as the whole output
            calls = _py_calls(text)
            return calls and (0, len(text), calls)
        end = _closing(text, start)
        calls = _py_calls(text[start:end]) if end else None
        return calls and (start, end, calls)


# ---- json: {"name": "f", "parameters": {...}}; {...}  or  [{...}, {...}] ----

_PY_TAG = "<|python_tag|>"
# A JSON call opens the output or a line (a brace mid-sentence is prose) or follows the tag anywhere.
_JSON_TRY = re.compile(r"<\|python_tag\|>|(?:^|(?<=\n))[ \t]*(?=[\[{])")
_JSON_MAYBE = re.compile(r"<\|python_tag\|>|(?:^|(?<=\n))[ \t]*(?:\{|\[\s*(?:\{|\Z))")
_JSON_SEP = re.compile(r"(?:\s|;|<\|python_tag\|>)*")
_DECODER = json.JSONDecoder()


def _json_call(obj: object, args_required: bool) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("parameters", obj.get("arguments"))
    if args is None and not args_required:
        args = {}
    if isinstance(args, str):  # some models send the arguments JSON-encoded, as OpenAI does
        try:
            args = json.loads(args)
        except _BAD:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(obj: object, args_required: bool) -> list[ToolCall] | None:
    """One call object or a non-empty list of them, else None."""
    calls = [_json_call(o, args_required) for o in (obj if isinstance(obj, list) else [obj])]
    return calls if calls and None not in calls else None


class JsonParser(ToolParser):
    name = "json"
    _try = _JSON_TRY

    def call_start(self, text: str) -> int | None:
        m = _JSON_MAYBE.search(text)
        return _earliest(m.start() if m else None, _partial_tail(text, _PY_TAG))

    def _span_at(self, text: str, m: re.Match[str]) -> Span | None:
        """Consecutive call objects, separated by whitespace, ";" or the tag."""
        calls: list[ToolCall] = []
        end = m.end()
        while True:
            try:
                obj, after = _DECODER.raw_decode(text, _JSON_SEP.match(text, end).end())
            except _BAD:
                break
            found = _json_calls(obj, args_required=True)
            if not found:
                break
            calls += found
            end = after
        return (m.start(), end, calls) if calls else None


# ---- hermes: <tool_call>{"name": "f", "arguments": {...}}</tool_call> ----

_TC_OPEN = "<tool_call>"
# An unclosed block ends at the next opening tag or the end of the output.
_TC_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    _try = _TC_BLOCK

    def call_start(self, text: str) -> int | None:
        return _earliest(text.find(_TC_OPEN), _partial_tail(text, _TC_OPEN))

    def _span_at(self, text: str, m: re.Match[str]) -> Span | None:
        if not m.group(2) and m.end() < len(text):
            return None  # only the final block may lack its closing tag
        try:
            calls = _json_calls(json.loads(m.group(1)), args_required=False)  # tags: args optional
        except _BAD:
            return None
        return calls and (m.start(), m.end(), calls)


class Llama4Parser(ToolParser):
    """Llama 4 writes calls in either of its two documented forms, pythonic or JSON."""

    name = "llama4"

    def __init__(self) -> None:
        self.forms = (PythonicParser(), JsonParser())

    def parse(self, text: str) -> Parsed:
        for form in self.forms:
            parsed = form.parse(text)
            if parsed.tool_calls:
                return parsed
        return Parsed(text, [])

    def call_start(self, text: str) -> int | None:
        return _earliest(*(form.call_start(text) for form in self.forms))


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (PythonicParser, JsonParser, HermesParser, Llama4Parser)}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; choose one of: {', '.join(PARSERS)}")
    return PARSERS[name]()


def detect_parser(chat_template: str | None) -> str:
    """The parser for the call format a chat template teaches. Strong markers go first: Llama 4's
    template also names Llama 3's ipython role, and a Hermes template may well quote "parameters"."""
    t = chat_template or ""
    if "python_start" in t:
        return "llama4"
    if "[func_name1(" in t:
        return "pythonic"
    if "<|python_tag|>" in t or "ipython" in t:
        return "json"
    if "<tool_call>" in t:
        return "hermes"
    if '"parameters"' in t and "function call" in t:
        return "json"
    return "hermes"  # herd's fallback prompt asks for <tool_call> tags
