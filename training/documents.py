"""Documents as token ids with a training-target mask: plain text, and chat conversations whose
loss falls on the assistant's tokens only.

A chat's assistant spans come from the model's own chat template: the conversation up to an
assistant turn rendered with the generation prompt ends where that turn's text begins, and the
conversation including the turn ends where it stops (its end-of-turn token included, so that the
model learns to stop). The text is then tokenised span by span, so every token belongs to exactly
one side of a boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from models.llama4.tokenizer import Tokenizer


class DataError(ValueError):
    """A data file or record is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    ids: list[int]
    targets: list[bool]  # targets[i]: ids[i] is trained on (predicted from ids[:i])

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.targets):
            raise ValueError(f"Document: {len(self.ids)} ids but {len(self.targets)} target flags")


def text_document(tokenizer: Tokenizer, text: str) -> Document:
    """BOS + text + EOS (where the tokenizer has them); every token but the first is a target."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return Document(ids, [False] + [True] * (len(ids) - 1))


def assistant_spans(tokenizer: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("an assistant message cannot open the conversation")
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)) or len(upto) == len(before):
            raise DataError(f"the chat template does not render messages[{i}] as an extension of the "
                            "conversation before it, so its tokens cannot be told apart")
        if spans and len(before) < spans[-1][1]:
            raise DataError(f"messages[{i}]: the template's generation prompt overlaps the previous turn")
        spans.append((len(before), len(upto)))
    return full, spans


def chat_document(tokenizer: Tokenizer, messages: list[dict]) -> Document:
    text, spans = assistant_spans(tokenizer, messages)
    ids: list[int] = []
    targets: list[bool] = []
    cursor = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, is_target in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                # The template writes BOS itself: no special tokens added here.
                part = tokenizer.encode(piece, add_special_tokens=False)
                ids += part
                targets += [is_target] * len(part)
        cursor = end
    return Document(ids, targets)


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, record


def read_documents(path: Path, kind: str, tokenizer: Tokenizer, text_field: str = "text") -> list[Document]:
    """kind "text": a .jsonl file (one document per line, in `text_field`) or any other file (one
    document); kind "chat": a .jsonl file of {"messages": [{"role", "content"}, ...]} lines."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if kind == "text" and path.suffix != ".jsonl":
        return [text_document(tokenizer, path.read_text(encoding="utf-8"))]
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: chat data must be a .jsonl file of {{'messages': [...]}} lines")
    docs = []
    for lineno, record in _jsonl(path):
        if kind == "text":
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string")
            docs.append(text_document(tokenizer, text))
            continue
        messages = record.get("messages")
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
            raise DataError(f"{path}:{lineno}: field 'messages' must be a non-empty list of "
                            "{'role', 'content'} objects")
        try:
            docs.append(chat_document(tokenizer, messages))
        except ValueError as e:  # DataError, ChatTemplateError
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not docs:
        raise DataError(f"{path}: no records")
    return docs
