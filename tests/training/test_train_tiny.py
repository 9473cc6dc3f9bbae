"""A tiny Llama 4 (MoE top-2, a NoPE layer, chunks of 8 inside 64-token windows, so documents run
past the chunk) trained for a few hundred steps: the loss falls well below its start, the run
leaves its records, and the export is the same model in transformers and is served by herd serve."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.integration.servers import free_port, wait_healthy
from tests.training.conftest import run_config
from training.config import TrainConfig
from training.records import read_metrics
from training.trainer import Trainer

STEPS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory, byte_tokenizer_dir, small_corpus):
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig.from_dict(run_config(
        out, byte_tokenizer_dir, small_corpus, train={"steps": STEPS}, schedule={"warmup_steps": 10},
        output={"export": True, "plot": True, "log_every": 1, "checkpoint_every": 0}))
    torch.set_num_threads(1)  # see conftest.one_thread (module fixtures run outside it)
    trainer = Trainer(cfg)
    result = trainer.train()
    trainer.close()
    return trainer, result


def test_loss_falls_well_below_its_start(trained):
    _, result = trained
    losses = result.losses
    assert len(losses) == STEPS
    start, end = losses[0], sum(losses[-10:]) / 10
    assert start == pytest.approx(torch.log(torch.tensor(262.0)).item(), abs=0.3)  # uniform over the bytes
    assert end < 0.6 * start, (start, end)


def test_run_leaves_metrics_plot_checkpoint_and_export(trained):
    trainer, result = trained
    out = trainer.out_dir
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["tokens"] == 128 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert all(0.9 < r["aux_loss"] < 4.0 for r in rows)  # 1 = balanced, 4 = one expert of four
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / f"step_{STEPS:06d}" / "COMPLETE").is_file()
    assert result.export_dir == out / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in result.export_dir.iterdir()}


def test_export_loads_in_transformers_with_our_logits(trained):
    from transformers import Llama4ForCausalLM

    from models.llama4 import DenseAttention, load_model

    trainer, result = trained
    hf = Llama4ForCausalLM.from_pretrained(result.export_dir, dtype=torch.float32).eval()
    ours = load_model(result.export_dir, dtype="float32").model
    ids = torch.tensor(trainer.tokenizer.encode("def parse(text):\n    return json.loads(text)  # 40+ bytes"))
    pos = torch.arange(len(ids))
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0]
        exported = ours.compute_logits(ours(ids, pos, DenseAttention([len(ids)], pos)))
        trained_model = trainer.model.compute_logits(trainer.model(ids, pos, DenseAttention([len(ids)], pos)))
    assert len(ids) > 2 * 8  # past two attention chunks
    torch.testing.assert_close(exported, trained_model, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, exported, atol=1e-4, rtol=0)


def serve_and_chat(model_dir, message: str, timeout: float = 180) -> str:
    """Starts `herd serve --model model_dir`, sends one chat request with the openai client, stops it."""
    import openai

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--grpc-port", "-1", "--max-model-len", "512",
                             "--max-num-batched-tokens", "256", "--enforce-eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, timeout)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        model_id = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": message}],
                                               max_tokens=16, temperature=0)
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        return reply.choices[0].message.content
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_export_is_served_by_herd_serve(trained):
    _, result = trained
    answer = serve_and_chat(result.export_dir, "What does json.dumps do?")
    assert isinstance(answer, str)
