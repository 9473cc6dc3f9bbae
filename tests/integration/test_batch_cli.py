"""`herd batch` and online batches as users run them: real processes, SIGKILL mid-run, a
restart that resumes, Ray replicas."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.integration.servers import free_port, wait_healthy

TINY = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]


def requests_file(path: Path, n: int, max_tokens: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": f"request {i}:", "max_tokens": max_tokens, "temperature": 0,
                                         "ignore_eos": True}}) + "\n")
    return path


def custom_ids(*paths: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for p in paths if p.exists() for line in p.read_text().splitlines()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def herd_batch(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "herd", "batch", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_rerun_answers_each_line_once(tmp_path, tiny_llama4_dir):
    src = requests_file(tmp_path / "in.jsonl", 60, max_tokens=24)
    out = tmp_path / "out.jsonl"
    args = ["-i", str(src), "-o", str(out), "--model", str(tiny_llama4_dir), *TINY, "--max-num-seqs", "2"]
    proc = herd_batch(*args)
    deadline = time.monotonic() + 180
    while count_lines(out) < 6:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = count_lines(out)
    assert killed_at < 60
    rerun = herd_batch(*args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "from an earlier run" in err and "60 completed, 0 failed of 60 requests" in err
    ids = custom_ids(out)
    assert sorted(ids) == sorted(f"r{i}" for i in range(60))  # none lost, none twice


def test_replicas_spread_the_file_and_keep_the_guarantees(tmp_path, tiny_llama4_dir):
    src = requests_file(tmp_path / "in.jsonl", 24)
    with open(src, "a") as f:
        f.write("not json\n")
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    proc = herd_batch("-i", str(src), "-o", str(out), "--errors", str(errors), "--model", str(tiny_llama4_dir),
                      *TINY, "--replicas", "2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(custom_ids(out)) == sorted(f"r{i}" for i in range(24))
    assert [json.loads(x)["error"]["line"] for x in errors.read_text().splitlines()] == [25]
    for line in out.read_text().splitlines():
        assert json.loads(line)["response"]["body"]["usage"]["completion_tokens"] == 16


class Server:
    def __init__(self, model: Path, files_dir: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--grpc-port", "-1", "--model", str(model), *TINY, "--max-num-seqs", "2",
             "--files-dir", str(files_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_healthy(self.proc, self.url, 180)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_for(client, batch_id: str, done, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not done(batch := client.batches.retrieve(batch_id)):
        assert batch.status not in ("failed", "expired"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


def test_online_batch_survives_a_killed_server_and_completes(tmp_path, tiny_llama4_dir, files_dir):
    src = requests_file(tmp_path / "in.jsonl", 40, max_tokens=24)
    server = Server(tiny_llama4_dir, files_dir)
    try:
        f = server.client.files.create(file=src.open("rb"), purpose="batch")
        assert f.purpose == "batch" and f.bytes == src.stat().st_size
        batch = server.client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                             completion_window="24h", metadata={"run": "restart"})
        assert batch.status == "validating" and batch.metadata == {"run": "restart"}
        wait_for(server.client, batch.id, lambda b: b.request_counts.completed >= 4)
    finally:
        server.kill()
    record = json.loads((files_dir / "batches" / f"{batch.id}.json").read_text())
    assert record["status"] == "in_progress" and record["request_counts"]["completed"] < 40  # killed mid-way
    server = Server(tiny_llama4_dir, files_dir)  # the batch resumes by itself
    try:
        client = server.client
        done = wait_for(client, batch.id, lambda b: b.status == "completed")
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (40, 40, 0)
        assert done.error_file_id is None and done.model
        assert done.usage.output_tokens == 40 * 24
        lines = client.files.content(done.output_file_id).text.splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(f"r{i}" for i in range(40))
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        assert batch.id in [b.id for b in client.batches.list().data]
        assert f.id in [x.id for x in client.files.list().data]
    finally:
        server.kill()


def test_online_batch_cancel_errors_and_bad_requests(tmp_path, tiny_llama4_dir, files_dir):
    src = requests_file(tmp_path / "in.jsonl", 30, max_tokens=32)
    with open(src, "a") as f:
        f.write(json.dumps({"custom_id": "chat", "url": "/v1/chat/completions", "body": {"messages": []}}) + "\n")
    server = Server(tiny_llama4_dir, files_dir)
    client = server.client
    try:
        f = client.files.create(file=src.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        done = wait_for(client, batch.id, lambda b: b.status == "cancelled")
        assert done.cancelled_at and 2 <= done.request_counts.completed < 30
        written = client.files.content(done.output_file_id).text.splitlines()
        assert len(written) == done.request_counts.completed

        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-0000", endpoint="/v1/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError) as info:
            client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        assert info.value.body["param"] == "endpoint"
        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=src.open("rb"), purpose="fine-tune")
        assert info.value.body["param"] == "purpose"
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-0000")

        whole = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
        done = wait_for(client, whole.id, lambda b: b.status == "completed")
        assert (done.request_counts.completed, done.request_counts.failed) == (30, 1)
        err = json.loads(client.files.content(done.error_file_id).text)
        assert err["custom_id"] == "chat" and err["error"]["param"] == "url" and err["error"]["line"] == 31
        assert client.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(f.id)
    finally:
        server.kill()
