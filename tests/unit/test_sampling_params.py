"""SamplingParams validation (every bad field names itself) and the stop-string hold-back."""

from __future__ import annotations

import math
import random

import pytest

from serving.engine.output_processor import _held_back
from serving.engine.sampling_params import ParamError, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.n == 1 and p.best_of == 1
    assert p.temperature == 1.0 and not p.greedy
    assert p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop_strings == () and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(n=2, best_of=5).best_of == 5


@pytest.mark.parametrize("kw, param", [
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(n=3, best_of=2), "best_of"),
    (dict(best_of=0), "best_of"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=-100), "top_k"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(logit_bias={5: 100.5}), "logit_bias"),
    (dict(logit_bias={5: -101}), "logit_bias"),
    (dict(logit_bias={5: math.nan}), "logit_bias"),
])
def test_invalid_field_raises_param_error_naming_it(kw, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{param}: ")


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=1), dict(min_p=0.0), dict(min_p=1.0),
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(repetition_penalty=0.5), dict(max_tokens=1), dict(max_tokens=None),
    dict(max_tokens=None, min_tokens=10_000), dict(min_tokens=16), dict(logprobs=0), dict(prompt_logprobs=0),
    dict(stop=[]), dict(stop_token_ids=[0]), dict(logit_bias={0: -100, 7: 100}), dict(logit_bias={}),
])
def test_boundary_values_are_accepted(kw):
    SamplingParams(**kw)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


def test_stop_as_string_or_list():
    assert SamplingParams(stop="###").stop_strings == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ("a", "bc")
    assert SamplingParams(stop=None).stop_strings == ()
    p = SamplingParams(stop_token_ids=None)
    assert p.stop_token_ids == []
    ids = [3, 4]
    p = SamplingParams(stop_token_ids=ids)
    assert p.stop_token_ids == [3, 4] and p.stop_token_ids is not ids


def test_validate_for_vocabulary():
    SamplingParams(stop_token_ids=[0, 99], logit_bias={99: 1.0}).validate_for(100)
    with pytest.raises(ParamError) as e:
        SamplingParams(stop_token_ids=[5, 100]).validate_for(100)
    assert e.value.param == "stop_token_ids" and "100" in str(e.value)
    with pytest.raises(ParamError) as e:
        SamplingParams(logit_bias={3: 1.0, 250: -1.0}).validate_for(100)
    assert e.value.param == "logit_bias" and "250" in str(e.value)
    SamplingParams().validate_for(1)


# -- the stop-string hold-back ------------------------------------------------------------------

@pytest.mark.parametrize("text, stops, held", [
    ("", ("END",), 0),
    ("hello", (), 0),
    ("hello", ("END",), 0),
    ("hello E", ("END",), 1),
    ("hello EN", ("END",), 2),
    ("hello END", ("END",), 0),  # a whole stop string was already cut by on_token
    ("EN", ("END",), 2),
    ("E", ("END",), 1),
    ("x", ("x",), 0),  # a one-character stop has no proper prefix
    ("hello wor", ("world", "or"), 3),  # the longest candidate wins
    ("hello wo", ("world", "wox"), 2),
    ("abab", ("abac",), 2),
    ("aaa", ("aaaa",), 3),
    ("aaab", ("aab!", "b"), 3),
    ("tail\n", ("\n\n",), 1),
    ("zy", ("xyz", "yz"), 1),
])
def test_held_back(text, stops, held):
    assert _held_back(text, stops) == held


def test_held_back_matches_brute_force():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        expected = max([n for s in stops for n in range(1, len(s)) if n <= len(text) and text.endswith(s[:n])],
                       default=0)
        assert _held_back(text, stops) == expected
