"""After each sampled token: detokenize, check stop conditions, and cut what is safe to send.

Stop strings are searched across token boundaries in the detokenized text and never leak:
while a sequence runs, the tail of its text that could still be the start of a stop string
is held back from streaming.
"""

from __future__ import annotations

from models.llama4.detokenizer import IncrementalDetokenizer
from models.llama4.tokenizer import Tokenizer
from serving.engine.outputs import CompletionOutput
from serving.engine.sequence import Sequence


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def stop_ids(self, seq: Sequence) -> frozenset[int]:
        p = seq.request.params
        return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)

    def banned_ids(self, seq: Sequence) -> list[int]:
        """Stop ids may not be sampled before min_tokens are out."""
        if seq.num_output_tokens >= seq.request.params.min_tokens:
            return []
        return sorted(self.stop_ids(seq))

    def on_token(self, seq: Sequence, token: int) -> str | None:
        """Updates text for the token just appended; returns the finish reason, if any."""
        p = seq.request.params
        if p.detokenize:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, list(seq.request.prompt_token_ids),
                                                   skip_special_tokens=p.skip_special_tokens)
            before = len(seq.text)
            seq.text += seq.detok.push(token)
        if token in self.stop_ids(seq):
            seq.stop_reason = token if token in p.stop_token_ids else None
            return "stop"
        if p.stop_strings and p.detokenize and seq.num_output_tokens >= p.min_tokens:
            longest = max(len(s) for s in p.stop_strings)
            start = max(0, before - longest + 1)
            hits = [(seq.text.find(s, start), s) for s in p.stop_strings]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.text = seq.text[:i + (len(s) if p.include_stop_str_in_output else 0)]
                seq.stop_reason = s
                return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length"
        if len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.detok is not None and not isinstance(seq.stop_reason, str):  # a stop string cut it
            seq.text += seq.detok.flush()

    def delta(self, seq: Sequence) -> CompletionOutput | None:
        """What is new for this sequence since the last call (None if nothing)."""
        end = len(seq.text)
        if not seq.finish_reason:
            end -= _held_back(seq.text, seq.request.params.stop_strings)
        text = seq.text[seq.sent_text_len:end] if end > seq.sent_text_len else ""
        tokens = seq.output_ids[seq.sent_tokens:]
        if not text and not tokens and not seq.finish_reason:
            return None
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs[seq.sent_logprobs:]
            seq.sent_logprobs = len(seq.logprobs)
        seq.sent_text_len = max(seq.sent_text_len, end)
        seq.sent_tokens = seq.num_output_tokens
        cumulative = seq.cumulative_logprob if seq.logprobs is not None else None
        return CompletionOutput(index=seq.index, text=text, token_ids=tokens,
                                cumulative_logprob=cumulative, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
