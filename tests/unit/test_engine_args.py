"""`herd serve` / `herd batch` engine options: decode is compiled by default on CPU, as vLLM
compiles by default; --enforce-eager and --compile override it."""

from __future__ import annotations

import argparse

import pytest

from herd.engine_args import add_cluster_arguments, add_engine_arguments, engine_config


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    add_engine_arguments(p)
    add_cluster_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(("argv", "compiled"), [
    ((), True),
    (("--enforce-eager",), False),
    (("--device", "cuda"), False),
    (("--device", "cuda", "--compile"), True),
])
def test_compile_default(argv, compiled):
    assert engine_config(parse(*argv)).compile is compiled


def test_compile_and_enforce_eager_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse("--compile", "--enforce-eager")
    assert "not allowed with argument" in capsys.readouterr().err


def test_kv_cache_dtype_reaches_the_config_and_bad_ones_name_the_field():
    from serving.engine.config import EngineConfig

    assert engine_config(parse()).kv_cache_dtype == "auto"
    assert engine_config(parse("--kv-cache-dtype", "bfloat16")).kv_cache_dtype == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype: must be one of auto, bfloat16, float32, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
