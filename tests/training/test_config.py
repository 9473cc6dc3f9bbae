"""Training configs: the shipped ones validate (Scout and Maverick at their real sizes), YAML and
Python files load, and every bad field is an error that names it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.training.conftest import run_config
from training.config import ConfigError, TrainConfig, load_train_config
from training.model_setup import complete_hf_config, model_config_from_fields, new_model_on_meta


@pytest.fixture(scope="module")
def byte_tok(byte_tokenizer_dir):
    from models.llama4.loader import load_tokenizer

    return load_tokenizer(byte_tokenizer_dir)


@pytest.mark.parametrize("name", ["tiny", "finetune-default", "scout", "maverick"])
def test_shipped_configs_validate(name):
    cfg = load_train_config(name)
    assert cfg.train.steps > 0 and cfg.data.paths


@pytest.mark.parametrize("name,billions,moe_layers", [("scout", 107.8, 48), ("maverick", 400.7, 24)])
def test_scout_and_maverick_configs_are_the_real_models(name, billions, moe_layers, byte_tok):
    mc = model_config_from_fields(load_train_config(name).model.config, byte_tok)
    model = new_model_on_meta(mc)  # no memory: parameters on the meta device
    assert model.num_parameters() / 1e9 == pytest.approx(billions, abs=0.1)
    assert len(mc.moe_layers) == moe_layers and mc.num_experts_per_tok == 1
    assert [i for i in range(48) if not mc.use_rope[i]] == list(range(3, 48, 4))  # NoPE every 4th layer
    assert mc.attention_chunk_size == 8192 and mc.chunked[0] and not mc.chunked[3]


def test_new_model_config_json_spells_out_every_layer_fact(byte_tok):
    from tests.training.conftest import TINY_LLAMA4

    raw = complete_hf_config(TINY_LLAMA4, byte_tok)
    assert raw["moe_layers"] == [1, 3] and raw["no_rope_layers"] == [1, 1, 1, 0]
    assert raw["layer_types"] == ["chunked_attention"] * 3 + ["full_attention"]
    assert raw["vocab_size"] == byte_tok.vocab_size and raw["eos_token_id"] == byte_tok.eos_token_id
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_yaml_and_python_configs(tmp_path, byte_tokenizer_dir, small_corpus):
    raw = run_config(tmp_path / "run", byte_tokenizer_dir, small_corpus)
    raw["optim"]["lr"] = "3e-4"  # YAML 1.1 reads this as a string
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    from_yaml = load_train_config(tmp_path / "c.yaml", ["train.steps=5", "parallel.dp=1"])
    assert from_yaml.optim.lr == 3e-4 and from_yaml.train.steps == 5
    (tmp_path / "c.py").write_text(f"config = {raw!r}\n")
    assert load_train_config(tmp_path / "c.py").data == from_yaml.data
    # A config object round-trips through its dict.
    assert TrainConfig.from_dict(from_yaml.to_dict()) == from_yaml


@pytest.mark.parametrize("section,change,needle", [
    ("optim", {"lr": -1}, "optim.lr"),
    ("optim", {"betas": [0.9]}, "optim.betas"),
    ("data", {"sqe_len": 64}, "data.sqe_len"),
    ("data", {"seq_len": "long"}, "data.seq_len"),
    ("data", {"kind": "audio"}, "data.kind"),
    ("data", {"paths": []}, "data.paths"),
    ("train", {"steps": 0}, "train.steps"),
    ("train", {"dtype": "fp8"}, "train.dtype"),
    ("train", {"activation_checkpointing": "yes"}, "train.activation_checkpointing"),
    ("schedule", {"warmup_steps": 100}, "schedule.warmup_steps"),
    ("parallel", {"tp": 0}, "parallel.tp"),
    ("output", {"log_every": 0}, "output.log_every"),
    ("model", {"checkpoint": "default"}, "model"),
    ("bogus", {"x": 1}, "bogus"),
])
def test_bad_fields_name_themselves(tmp_path, byte_tokenizer_dir, small_corpus, section, change, needle):
    raw = run_config(tmp_path, byte_tokenizer_dir, small_corpus, **{section: change})
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(raw)
    assert str(e.value).startswith(needle)


@pytest.mark.parametrize("model_change,needle", [
    ({"vocab_size": 100}, "model.config.vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"architectures": ["GPT2LMHeadModel"]}, "model.config.architectures"),
    ({"hidden_size": None}, "model.config.hidden_size"),
])
def test_bad_model_fields_name_themselves(byte_tok, model_change, needle):
    from tests.training.conftest import TINY_LLAMA4

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        model_config_from_fields({**TINY_LLAMA4, **model_change}, byte_tok)


def test_runtime_checks_name_the_field(tmp_path, byte_tokenizer_dir, small_corpus):
    from training.trainer import Trainer

    too_long = run_config(tmp_path, byte_tokenizer_dir, small_corpus, data={"seq_len": 1024})
    with pytest.raises(ConfigError, match=r"^data\.seq_len"):
        Trainer(TrainConfig.from_dict(too_long))
    two_ranks = run_config(tmp_path, byte_tokenizer_dir, small_corpus, parallel={"dp": 2})
    with pytest.raises(ConfigError, match=r"^parallel: .*torchrun"):
        Trainer(TrainConfig.from_dict(two_ranks))
    missing = run_config(tmp_path, byte_tokenizer_dir, tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="nope.jsonl"):
        Trainer(TrainConfig.from_dict(missing))


def test_cli_bad_field_is_one_line(tmp_path, byte_tokenizer_dir, small_corpus):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path, byte_tokenizer_dir, small_corpus)))
    out = subprocess.run([sys.executable, "-m", "herd", "train", str(path), "--set", "optim.lr=-1"],
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "herd train: error: optim.lr: must be > 0, got -1.0"
