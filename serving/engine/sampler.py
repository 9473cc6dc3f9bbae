"""Turns one logits row per sampling sequence into a token, each row with its own parameters.

Order (vLLM's): logit_bias, min_tokens (stop ids banned), repetition / frequency / presence
penalties; then greedy argmax, or temperature, min_p, top_k, top_p and a draw. Logprobs are
those of the model's raw distribution. A seeded row draws from its own generator, so its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from serving.engine.outputs import Logprob, PositionLogprobs
from serving.engine.sampling_params import SamplingParams
from serving.engine.structured import allowed_tokens


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    banned_ids: list[int]  # stop ids while fewer than min_tokens are out
    generator: torch.Generator | None
    matcher: object | None = None  # structured output: only the tokens it allows may be drawn
    next_mask: Callable[[], torch.Tensor] | None = None  # the matcher's mask, if computed ahead


@dataclass
class Sample:
    token_id: int
    logprob: float
    top: PositionLogprobs | None  # the chosen token + top-N, when logprobs were asked for


def _apply_penalties(logits_BV: torch.Tensor, rows: list[SampleRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            if len(seen):
                vals = logits_BV[i, seen]
                logits_BV[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                                 vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            ids, counts = torch.tensor(r.output_ids, dtype=torch.long).unique(return_counts=True)
            logits_BV[i, ids] -= p.frequency_penalty * counts.float() + p.presence_penalty


def _filter(logits_BV: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Temperature, min_p, top_k and top_p, batched; returns probabilities."""
    dev = logits_BV.device
    temp = torch.tensor([r.params.temperature for r in rows], device=dev)
    logits_BV = logits_BV / temp[:, None]
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)
    if bool((min_p > 0).any()):
        probs = logits_BV.softmax(-1)
        logits_BV = logits_BV.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values,
                                          float("-inf"))
    V = logits_BV.shape[-1]
    top_k = torch.tensor([r.params.top_k or V for r in rows], device=dev).clamp(max=V)
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)
    if bool((top_k < V).any()) or bool((top_p < 1).any()):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=dev)[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_BV.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        # (Only rows that asked: a float32 cumsum reaches 1.0 before the tail, which would
        # otherwise cut a top_p=1 row's rare tokens whenever a batch mate filters.)
        drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
        sorted_BV = sorted_BV.masked_fill(drop, float("-inf"))
        logits_BV = torch.empty_like(logits_BV).scatter_(-1, order_BV, sorted_BV)
    return logits_BV.softmax(-1)


def _logprobs(raw_BV, tokens_B, rows, decode):
    logprobs_BV = raw_BV.log_softmax(-1)
    chosen = logprobs_BV.gather(1, tokens_B[:, None])[:, 0]
    out: list[PositionLogprobs | None] = []
    for i, r in enumerate(rows):
        n = r.params.logprobs
        if n is None:
            out.append(None)
            continue
        tok = int(tokens_B[i])
        rank = int((logprobs_BV[i] > chosen[i]).sum()) + 1
        top = {tok: Logprob(float(chosen[i]), rank, decode(tok))}
        if n > 0:
            vals, ids = logprobs_BV[i].topk(n)
            for j, (v, t) in enumerate(zip(vals.tolist(), ids.tolist())):
                top.setdefault(t, Logprob(v, j + 1, decode(t)))
        out.append(top)
    return chosen.tolist(), out


def sample(logits_BV: torch.Tensor, rows: list[SampleRow], decode=lambda t: None) -> list[Sample]:
    """logits (B, V) in any dtype, one row per SampleRow; `decode` names tokens for logprobs."""
    raw = logits_BV.float()
    logits = raw.clone()
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long)
            logits[i, ids] += torch.tensor(list(r.params.logit_bias.values()), dtype=logits.dtype)
        if r.banned_ids:
            logits[i, r.banned_ids] = float("-inf")
        if r.matcher is not None:
            allowed = r.next_mask() if r.next_mask is not None else allowed_tokens(r.matcher, logits.shape[-1])
            logits[i].masked_fill_(~allowed, float("-inf"))
    _apply_penalties(logits, rows)
    tokens = logits.argmax(-1)
    random = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random:
        probs = _filter(logits[random], [rows[i] for i in random])
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; one draw per row.
        noise = torch.empty_like(probs)
        for j, i in enumerate(random):
            noise[j].exponential_(generator=rows[i].generator)
        tokens[random] = (probs / noise).argmax(-1)
    if not any(r.params.logprobs is not None or r.params.best_of > r.params.n for r in rows):
        # Nobody reads a logprob (best_of ranks by them): skip the (B, V) log_softmax.
        return [Sample(t, 0.0, None) for t in tokens.tolist()]
    chosen, tops = _logprobs(raw, tokens, rows, decode)
    return [Sample(int(t), lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops)]


def prompt_logprobs(logits_NV: torch.Tensor, targets: list[int], n: int, decode) -> list[PositionLogprobs]:
    """For each row, the logprob of the next prompt token and the top-n alternatives."""
    logprobs_NV = logits_NV.float().log_softmax(-1)
    tgt = torch.tensor(targets, dtype=torch.long, device=logprobs_NV.device)
    chosen = logprobs_NV.gather(1, tgt[:, None])[:, 0]
    ranks = (logprobs_NV > chosen[:, None]).sum(-1) + 1
    vals, ids = logprobs_NV.topk(n, dim=-1) if n > 0 else (None, None)
    out = []
    for i, t in enumerate(targets):
        entry = {t: Logprob(float(chosen[i]), int(ranks[i]), decode(t))}
        if n > 0:
            for j, (v, tok) in enumerate(zip(vals[i].tolist(), ids[i].tolist())):
                entry.setdefault(tok, Logprob(v, j + 1, decode(tok)))
        out.append(entry)
    return out
