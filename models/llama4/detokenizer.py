"""Streaming detokenization: token ids in one at a time, newly completed text out."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.llama4.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Streaming-safe decoding: push token ids one at a time, get back only newly completed text.

    Never emits half a UTF-8 character (no U+FFFD mid-stream), and the deltas (+ flush) add up to
    tokenizer.decode(pushed ids). Each push decodes only the window since the last emitted
    boundary (the prefix/read offset technique), so the cost per token does not grow with length.
    With prompt_ids, the prompt's last tokens are decoded as left context, so the text is what
    follows the prompt (e.g. a sentencepiece word keeps its leading space).
    """

    _CONTEXT = 5  # prompt tokens kept as left context
    # A valid character spans at most 4 byte tokens; past this many pending tokens the model is
    # emitting invalid UTF-8, and holding on would only make every push slower.
    _MAX_PENDING = 16

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = [i for i in (prompt_ids or []) if not self._skipped(i)][-self._CONTEXT:]
        self._ids: list[int] = context
        self._prefix = 0  # start of the window decoded as context
        self._read = len(context)  # end of the text already returned
        self._prefix_text = self._decode(0, self._read)

    def push(self, token_id: int) -> str:
        if self._skipped(token_id):
            return ""  # decode(skip_special_tokens=True) drops it, so it changes nothing
        if not 0 <= token_id < self._tokenizer.vocab_size:
            return ""  # a padding id past the tokenizer's vocabulary has no text
        self._ids.append(token_id)
        text = self._decode(self._prefix, len(self._ids))
        if text.endswith("\ufffd") and len(self._ids) - self._read < self._MAX_PENDING:
            return ""  # the last character is still incomplete
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD, as in decode())."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._prefix, len(self._ids)))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 1024:  # drop what no window will look at again; amortised O(1)
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._prefix_text = self._decode(self._prefix, self._read)
        return delta

    def _skipped(self, token_id: int) -> bool:
        return self._skip and token_id in self._tokenizer.special_token_ids

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer._backend.decode(self._ids[start:end], skip_special_tokens=self._skip)
