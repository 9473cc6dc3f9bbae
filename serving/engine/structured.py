"""Structured outputs: a request's JSON schema, JSON object, regex, choice list or Lark grammar is
enforced token by token with llguidance, so the output always parses.

Why llguidance: it has no dependencies (xgrammar pulls transformers and triton), the widest JSON
Schema coverage of the three candidates (JSONSchemaBench), and computes a token mask in tens of
microseconds without precompiling per-schema tables, so a new schema per request costs little.
Only rows that carry a grammar pay for a mask; the rest of the batch is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

from serving.engine.sampling_params import ParamError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    kind: Kind
    spec: str  # the schema as JSON text, the regex, the choices as a JSON list, or the Lark grammar
    param: str = "response_format"  # the request field it came from, for errors

    @classmethod
    def json_schema(cls, schema: dict[str, Any], param: str = "response_format") -> StructuredOutput:
        return cls("json", json.dumps(schema), param)  # property order is output order: keep it


# No free whitespace between JSON tokens: a small model cannot pad its output with blank lines
# until max_tokens cuts it off; a schema's own "x-guidance" options still override this.
_COMPACT = {"whitespace_flexible": False}


@lru_cache(maxsize=256)
def _grammar(so: StructuredOutput) -> str:
    import llguidance

    if so.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(so.spec, defaults=_COMPACT)
    if so.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT)
    if so.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        return llguidance.grammar_from("lark", "start: " + " | ".join(json.dumps(c) for c in json.loads(so.spec)))
    return llguidance.LLMatcher.grammar_from_lark(so.spec)


class Grammars:
    """Compiles requests' constraints against one tokenizer and hands out per-sequence matchers."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok = None
        self._executor = self._pool = None  # made on first use

    def _ll_tokenizer(self):
        if self._lltok is None:
            import llguidance

            self._lltok = llguidance.LLTokenizer(self.tokenizer.backend_json(), n_vocab=self.vocab_size,
                                                 eos_token=sorted(self.tokenizer.stop_token_ids))
        return self._lltok

    def check(self, so: StructuredOutput) -> str:
        """The grammar, or ParamError naming the field when it is invalid or unsupported."""
        import llguidance

        try:
            grammar = _grammar(so)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ParamError(so.param, f"cannot be enforced: {e}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll_tokenizer())
        if is_error:
            raise ParamError(so.param, f"cannot be enforced: {messages[0]}")
        return grammar

    def matcher(self, so: StructuredOutput):
        import llguidance

        m = llguidance.LLMatcher(self._ll_tokenizer(), self.check(so))
        if m.is_error():
            raise ParamError(so.param, f"cannot be enforced: {m.get_error()}")
        return m


    def prefetch(self, matchers: list) -> Callable[[int], torch.Tensor]:
        """Starts computing the next-token masks of these matchers in the background (llguidance's
        thread pool, with the GIL released), so that they are ready by the time the next step's
        logits are: mask cost hides behind the forward pass. Returns mask(k) -> (V,) bool, which
        waits for the k-th. A matcher must not advance until its mask has been read."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="herd-masks")
        words = -(-self.vocab_size // 32)
        buf = torch.zeros(len(matchers), words, dtype=torch.int32)
        job = self._pool.submit(self._executor.unsafe_compute_mask_ptr, [(m, k) for k, m in enumerate(matchers)],
                                buf.data_ptr(), words * 4, len(matchers))

        def mask(k: int) -> torch.Tensor:
            job.result()
            return _unpack(buf[k], self.vocab_size)
        return mask


_BITS = torch.arange(32, dtype=torch.int32)


def _unpack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return ((words[:, None] >> _BITS) & 1).flatten()[:vocab_size].bool()


def allowed_tokens(matcher, vocab_size: int) -> torch.Tensor:
    """(V,) bool: the tokens the matcher accepts next."""
    return _unpack(torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32), vocab_size)
