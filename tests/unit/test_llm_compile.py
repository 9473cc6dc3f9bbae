"""`LLM(...)` compiles the decode step as vLLM's does unless told `enforce_eager=True`."""

from __future__ import annotations

import pytest

from serving.llm import compile_choice


@pytest.mark.parametrize(("device", "enforce_eager", "compile", "compiled"), [
    ("cpu", None, None, True),
    ("cpu", True, None, False),
    ("cpu", None, False, False),
    ("cpu", False, True, True),
    ("cuda", None, None, False),
    ("cuda", False, None, True),
    ("cuda", None, True, True),
])
def test_compile_choice(device, enforce_eager, compile, compiled):
    assert compile_choice(device, enforce_eager, compile) is compiled


def test_contradiction_names_both_fields():
    with pytest.raises(ValueError, match="enforce_eager=True contradicts compile=True"):
        compile_choice("cpu", True, True)
