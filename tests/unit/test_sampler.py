"""Sampler: greedy, bias/bans, penalties, top-k/top-p/min-p, seeded draws, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.sampler import SampleRow, _apply_penalties, _filter, prompt_logprobs, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Request


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only add wake-up latency (badly so on a
    # busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def row(prompt=(), output=(), banned=(), seed=None, **params) -> SampleRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRow(SamplingParams(**params), list(prompt), list(output), list(banned), gen)


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


def greedy_tokens(logits, rows):
    return [s.token_id for s in sample(logits, rows)]


# -- greedy, bias and bans --------------------------------------------------------------------

def test_greedy_is_argmax_per_row():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [row(temperature=0.0) for _ in range(6)]
    assert greedy_tokens(logits, rows) == logits.argmax(-1).tolist()
    assert greedy_tokens(logits.to(torch.bfloat16), rows) == logits.to(torch.bfloat16).float().argmax(-1).tolist()


def test_greedy_ignores_filters_and_does_not_touch_the_input():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    copy = logits.clone()
    out = sample(logits, [row(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9, seed=1)])
    assert out[0].token_id == 1
    assert torch.equal(logits, copy)


def test_logit_bias_changes_the_choice():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    rows = [row(temperature=0.0, logit_bias={0: 5.0}), row(temperature=0.0, logit_bias={1: -100, 3: -1.5})]
    assert greedy_tokens(logits, rows) == [0, 2]


def test_banned_ids_are_never_chosen():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert greedy_tokens(logits, [row(temperature=0.0, banned=[1, 3])]) == [2]
    # Sampled rows too, even when the banned token dominates.
    logits = torch.tensor([[10.0, 0.0, 0.0]]).repeat(400, 1)
    rows = [row(banned=[0], seed=i) for i in range(400)]
    assert 0 not in greedy_tokens(logits, rows)


# -- penalties --------------------------------------------------------------------------------

def _penalised(values, **kw) -> list[float]:
    logits = torch.tensor([values])
    _apply_penalties(logits, [row(**kw)])
    return logits[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    vals = [2.0, -1.0, 4.0, -3.0, 1.0]
    got = _penalised(vals, repetition_penalty=2.0, prompt=[0, 1], output=[2, 2, 3])
    # Prompt and output tokens alike, each once however often it appears.
    assert got == pytest.approx([1.0, -2.0, 2.0, -6.0, 1.0])
    assert _penalised(vals, repetition_penalty=1.0, prompt=[0, 1]) == vals


def test_repetition_penalty_flips_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    assert greedy_tokens(logits, [row(temperature=0.0, repetition_penalty=1.5, prompt=[0])]) == [1]
    assert greedy_tokens(logits, [row(temperature=0.0, repetition_penalty=1.5, output=[0])]) == [1]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    vals = [1.0, 1.0, 1.0, 1.0]
    got = _penalised(vals, frequency_penalty=0.5, presence_penalty=0.25,
                     prompt=[0, 0, 0], output=[1, 1, 1, 2])
    assert got == pytest.approx([1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0])
    # Negative penalties encourage repetition.
    got = _penalised(vals, frequency_penalty=-1.0, output=[3, 3])
    assert got == pytest.approx([1.0, 1.0, 1.0, 3.0])
    assert _penalised(vals, presence_penalty=2.0, prompt=[1]) == vals


def test_penalties_apply_per_row():
    logits = torch.zeros(2, 3) + 1.0
    rows = [row(frequency_penalty=1.0, output=[0]), row(output=[0])]
    _apply_penalties(logits, rows)
    assert logits.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


# -- filters -----------------------------------------------------------------------------------

def _support(logits, **kw) -> torch.Tensor:
    return _filter(logits.clone(), [row(**kw)])[0]


def test_temperature_scales_before_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    for t in (0.5, 1.0, 2.0):
        assert torch.allclose(_support(logits, temperature=t), (logits[0] / t).softmax(-1))


@pytest.mark.parametrize("top_p, keep", [(0.4, [0]), (0.5, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]),
                                         (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, keep):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # Shuffled vocabulary order, so the sort/scatter back is exercised.
    perm = torch.tensor([2, 0, 3, 1])
    logits = p[perm].log()[None]
    got = _support(logits, top_p=top_p)
    kept = {int(perm[i]) for i in torch.nonzero(got > 0).flatten()}
    assert kept == set(keep)
    expected = torch.zeros(4)
    expected[keep] = p[keep] / p[keep].sum()
    assert torch.allclose(got, expected[perm], atol=1e-6)


@pytest.mark.parametrize("k, keep", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (0, [0, 1, 2, 3]), (-1, [0, 1, 2, 3]),
                                     (10, [0, 1, 2, 3])])
def test_top_k(k, keep):
    logits = probs_logits(0.4, 0.3, 0.2, 0.1)
    got = _support(logits, top_k=k)
    assert torch.nonzero(got > 0).flatten().tolist() == keep


def test_top_k_and_top_p_combine():
    # top_k=3 leaves [0.5, 0.3, 0.15] -> renormalised [.526, .316, .158]; top_p=0.8 then keeps 2.
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)
    got = _support(logits, top_k=3, top_p=0.8)
    assert torch.nonzero(got > 0).flatten().tolist() == [0, 1]


@pytest.mark.parametrize("min_p, keep", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (1.0, [0])])
def test_min_p_is_relative_to_the_top_probability(min_p, keep):
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)
    got = _support(logits, min_p=min_p)
    assert torch.nonzero(got > 0).flatten().tolist() == keep


def test_filters_are_per_row_in_a_batch():
    logits = probs_logits(0.5, 0.3, 0.15, 0.05).repeat(3, 1)
    rows = [row(top_k=1), row(), row(top_p=0.7)]
    got = _filter(logits.clone(), rows)
    assert (got > 0).sum(-1).tolist() == [1, 4, 2]


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    rows = [row(top_k=1, temperature=1.3, seed=i) for i in range(64)]
    assert greedy_tokens(logits, rows) == logits.argmax(-1).tolist()


def test_sampled_tokens_stay_in_the_filtered_support():
    logits = probs_logits(0.5, 0.3, 0.15, 0.05).repeat(300, 1)
    rows = [row(top_p=0.7, seed=i) for i in range(300)]
    assert set(greedy_tokens(logits, rows)) == {0, 1}


# -- seeded draws and the distribution ---------------------------------------------------------

def _draws(logits_row: torch.Tensor, rows_fn, target: int, steps: int) -> list[int]:
    """Draws `steps` tokens for rows_fn()'s rows (generators kept across steps); returns
    the tokens of row `target`."""
    rows = rows_fn()
    out = []
    for step in range(steps):
        logits = logits_row.repeat(len(rows), 1) + 0.01 * step
        out.append(sample(logits, rows)[target].token_id)
    return out


def test_seeded_row_is_reproducible_and_independent_of_batch_mates():
    torch.manual_seed(2)
    logits = torch.randn(1, 32)
    params = dict(temperature=0.9, top_p=0.95, seed=1234)
    alone = _draws(logits, lambda: [row(**params)], 0, 60)
    again = _draws(logits, lambda: [row(**params)], 0, 60)
    assert alone == again
    assert len(set(alone)) > 5  # it really samples

    def mates():
        return [row(), row(top_k=3, seed=7), row(**params), row(temperature=0.0), row(min_p=0.3),
                row(temperature=2.0, top_p=0.5)]

    torch.manual_seed(99)  # unseeded mates draw from the global RNG
    assert _draws(logits, mates, 2, 60) == alone
    torch.manual_seed(100)
    assert _draws(logits, mates, 2, 60) == alone
    other_seed = _draws(logits, lambda: [row(temperature=0.9, top_p=0.95, seed=4321)], 0, 60)
    assert other_seed != alone


def test_sequence_generators_depend_on_seed_and_index_only():
    params = SamplingParams(n=3, seed=5, temperature=1.0)
    a = Request("a", [1, 2], params, None, first_seq_id=0)
    b = Request("b", [3, 4, 5], SamplingParams(n=3, seed=5, temperature=1.0), None, first_seq_id=100)
    draws = [[torch.rand(4, generator=s.generator).tolist() for s in r.seqs] for r in (a, b)]
    assert draws[0] == draws[1]
    assert draws[0][0] != draws[0][1]
    assert Request("g", [1], SamplingParams(seed=5, temperature=0.0), None, 0).seqs[0].generator is None
    assert Request("u", [1], SamplingParams(), None, 0).seqs[0].generator is None


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    mask = expected > 0
    assert counts[~mask].sum() == 0
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("kw, probs", [
    (dict(), [0.4, 0.3, 0.15, 0.1, 0.05]),
    (dict(temperature=0.5), None),
    (dict(top_k=3), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]),
    (dict(top_p=0.8), [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0.0, 0.0]),
])
def test_empirical_distribution(kw, probs):
    base = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    if probs is None:
        probs = base ** 2 / (base ** 2).sum()  # temperature 0.5 squares the probabilities
    probs = torch.as_tensor(probs)
    n = 20000
    gen = torch.Generator().manual_seed(0)
    rows = [SampleRow(SamplingParams(**kw), [], [], [], gen) for _ in range(n)]
    tokens = torch.tensor(greedy_tokens(base.log()[None].repeat(n, 1), rows))
    counts = torch.bincount(tokens, minlength=5).float()
    # df <= 4: the 99.99th percentile of chi-square(4) is about 23.5.
    assert _chi2(counts, probs) < 23.5, (counts / n).tolist()


# -- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_distribution():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    rows = [row(temperature=0.7, top_k=5, seed=1, logprobs=3, logit_bias={0: 4.0}, repetition_penalty=1.3,
                prompt=[1, 2]),
            row(temperature=0.0, logprobs=0),
            row(seed=2)]
    out = sample(logits, rows, decode=lambda t: f"<{t}>")
    raw = logits.log_softmax(-1)
    for i, s in enumerate(out):
        assert s.logprob == pytest.approx(float(raw[i, s.token_id]), abs=1e-5)
    assert out[2].top is None
    assert out[1].top == {out[1].token_id: out[1].top[out[1].token_id]}
    lp = out[1].top[out[1].token_id]
    assert lp.rank == 1 and lp.decoded_token == f"<{out[1].token_id}>"


@pytest.mark.parametrize("chosen", [0, 2, 7])
def test_logprob_rank_and_top_n_sorted(chosen):
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0]])
    r = row(temperature=0.0, logprobs=3, logit_bias={chosen: 100.0})
    [s] = sample(logits, [r], decode=str)
    assert s.token_id == chosen
    raw = logits[0].log_softmax(-1)
    top = s.top
    assert list(top)[0] == chosen  # the chosen token comes first
    assert top[chosen].rank == chosen + 1
    assert top[chosen].logprob == pytest.approx(float(raw[chosen]))
    assert len(top) == (3 if chosen < 3 else 4)
    rest = [(t, lp) for t, lp in top.items() if t != chosen or chosen < 3]
    ranked = sorted(rest, key=lambda x: x[1].rank)
    assert [t for t, _ in ranked] == [0, 1, 2]
    assert [lp.rank for _, lp in ranked] == [1, 2, 3]
    vals = [lp.logprob for _, lp in ranked]
    assert vals == sorted(vals, reverse=True)
    assert vals == pytest.approx(raw[:3].tolist())
    assert all(lp.decoded_token == str(t) for t, lp in top.items())


def test_logprob_rank_counts_ties_as_better():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    [s] = sample(logits, [row(temperature=0.0, logprobs=0)])
    assert s.top[s.token_id].rank == 1


def test_prompt_logprobs_helper():
    torch.manual_seed(4)
    logits = torch.randn(5, 12)
    targets = [3, 0, 11, 7, 7]
    out = prompt_logprobs(logits.to(torch.bfloat16).float(), targets, 2, decode=lambda t: t)
    raw = logits.to(torch.bfloat16).float().log_softmax(-1)
    assert len(out) == 5
    for i, (entry, t) in enumerate(zip(out, targets)):
        assert list(entry)[0] == t
        assert entry[t].logprob == pytest.approx(float(raw[i, t]), abs=1e-6)
        assert entry[t].rank == int((raw[i] > raw[i, t]).sum()) + 1
        best = raw[i].topk(2).indices.tolist()
        for j, tok in enumerate(best):
            assert entry[tok].rank == j + 1
        assert set(entry) == {t, *best}
    only = prompt_logprobs(logits, targets, 0, decode=lambda t: None)
    assert [list(e) for e in only] == [[t] for t in targets]
    assert all(math.isfinite(e[t].logprob) for e, t in zip(only, targets))


def _only_row(**kw):
    return SampleRow(SamplingParams(**kw), [], [], [], None)


def test_top_p_one_row_is_not_truncated_by_batch_mates():
    logits = torch.tensor([[0.0, -20.0, -20.0]])
    alone = _filter(logits.clone(), [_only_row()])[0]
    batched = _filter(logits.repeat(2, 1), [_only_row(), _only_row(top_k=1)])[0]
    assert alone[1] > 0                       # token 1 has probability ~2e-9
    assert torch.equal(alone, batched), (alone.tolist(), batched.tolist())  # got [1.0, 0.0, 0.0]
