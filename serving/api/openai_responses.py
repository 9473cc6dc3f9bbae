"""Engine outputs -> OpenAI response, chunk and logprobs objects (plain dicts, exact shapes)."""

from __future__ import annotations

from typing import Any

from serving.engine.outputs import PositionLogprobs


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class TokenNames:
    """How a token is shown in logprobs: its text, or "token_id:N" when asked."""

    def __init__(self, tokenizer, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def __call__(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(token_ids: list[int], logprobs: list[PositionLogprobs], name: TokenNames,
                  top_n: int) -> dict[str, Any]:
    content = []
    for tok, entry in zip(token_ids, logprobs):
        text = name(tok)
        alternatives = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top_n]
        content.append({
            "token": text, "logprob": max(entry[tok].logprob, -9999.0),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": (t := name(alt)), "logprob": max(lp.logprob, -9999.0),
                              "bytes": list(t.encode("utf-8"))} for alt, lp in alternatives],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], logprobs: list[PositionLogprobs | None], name: TokenNames,
                        top_n: int, text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape; a None entry (the first prompt token) has no logprob."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tok, entry in zip(token_ids, logprobs):
        text = name(tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry[tok].logprob)
        best = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top_n]
        tops.append({name(t): lp.logprob for t, lp in best} if top_n else None)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
