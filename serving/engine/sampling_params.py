"""Per-request sampling parameters with vLLM's names, defaults and meaning; validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.engine.structured import StructuredOutput


class ParamError(ValueError):
    """An invalid request field; `param` names it (the OpenAI error's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message

    def __reduce__(self):  # crosses process boundaries (Ray replicas) intact
        return ParamError, (self.param, self.message)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N alternatives per sampled token (0: the token's own only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    structured: StructuredOutput | None = None  # output constrained to a schema / regex / grammar
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == -1:
            self.top_k = 0
        self.stop_strings = tuple([self.stop] if isinstance(self.stop, str) else self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        _check(self.best_of >= self.n, "best_of", f"must be >= n ({self.n}), got {self.best_of}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be -1, 0 (off) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", f"must be >= 0, got {self.logprobs}")
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
               f"must be >= 0, got {self.prompt_logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
               "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative token ids")
        for token, bias in (self.logit_bias or {}).items():
            _check(isinstance(token, int) and token >= 0, "logit_bias", f"bad token id {token!r}")
            _check(-100 <= bias <= 100, "logit_bias", f"bias for {token} must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate_for(self, vocab_size: int) -> None:
        """Checks the token ids the request names against the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or {})):
            bad = [t for t in ids if t >= vocab_size]
            _check(not bad, name, f"token id {bad[0] if bad else 0} is outside the vocabulary "
                                  f"of {vocab_size}")


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)
