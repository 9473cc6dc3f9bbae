"""Rendering a checkpoint's Jinja chat template the way transformers does, in a sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import CheckpointError


class ChatTemplateError(ValueError):
    """The template refused these messages (its raise_exception, or it failed on their shape).

    A ValueError, not a CheckpointError: the request is at fault, so the server answers 400 and
    keeps serving.
    """


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation ("roles must alternate", ...).
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&', which would change the prompt text; templates
    # written for transformers expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # Same environment as transformers: templates are written against its whitespace rules
    # (trim_blocks, lstrip_blocks) and helpers, and come from the hub, so they are untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A copy made of JSON types only: the template can neither mutate the caller's messages nor
    call methods of rich objects the sandbox does not know to be dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"chat input holds a {type(value).__name__}; only JSON values are allowed")


def render_chat(source: str, messages: list[dict], *, add_generation_prompt: bool,
                tools: list[dict] | None, special_tokens: Mapping[str, str], name: str = "chat template",
                **extra: Any) -> str:
    """`source` rendered for `messages`; `special_tokens` (bos_token, ...) are visible to it and
    `extra` (e.g. enable_thinking) overrides them, as in transformers' apply_chat_template."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] is a {type(message).__name__}, not a dict")
        # OpenAI clients send content=None / tool_calls=None; templates handle a missing key
        # but would print "None". transformers drops them the same way.
        chat.append({k: _plain(v) for k, v in message.items() if v is not None})
    try:
        template = _compile(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{name}: Jinja syntax error at line {e.lineno}: {e.message}") from None
    variables = {"documents": None, **special_tokens, **{k: _plain(v) for k, v in extra.items()},
                 "messages": chat, "tools": _plain(tools), "add_generation_prompt": add_generation_prompt}
    try:
        return template.render(**variables)
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() and sandbox refusals land here with the template's own words.
        raise ChatTemplateError(f"{name} rejected the messages: {e.message or e}") from None
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        raise ChatTemplateError(f"{name} failed on these messages: {type(e).__name__}: {e}") from None
