"""Start and stop the OpenAI-compatible servers the serving benchmarks compare (herd, vLLM).

Each server runs in its own process group, started by this process; stop() sends SIGTERM to the
server, then SIGKILL to its group if it has not exited within the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
import _common

HF_EXPORT = HERE / "work/smollm2-135m-instruct-hf"


# herd: as started by default (decode compiled on CPU, as vLLM compiles by default); herd-eager:
# --enforce-eager; herd-2r: two Ray replicas behind the gateway
HERD_SERVERS = {"herd": [], "herd-eager": ["--enforce-eager"], "herd-2r": ["--replicas", "2"]}


def server_command(name: str, port: int, max_model_len: int) -> tuple[list[str], dict[str, str]]:
    """(argv, extra env) for a server on 127.0.0.1:port serving herd's default model."""
    if name in HERD_SERVERS:
        return ([str(ROOT / ".venv/bin/herd"), "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--grpc-port", "-1", "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
                 "--memory-utilization", "0.3", *HERD_SERVERS[name]], {})
    if name == "vllm":
        # As in peers/vllm_offline.py: 1 GiB KV cache, and no AOT compile (it fails to reload).
        return ([str(HERE / ".venv-vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(HF_EXPORT), "--dtype", "bfloat16", "--host", "127.0.0.1",
                 "--port", str(port), "--max-model-len", str(max_model_len), "--seed", "0",
                 "--uvicorn-log-level", "warning"],
                {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"})
    raise ValueError(f"unknown server {name!r} ({', '.join(HERD_SERVERS)}, vllm)")


def available(name: str) -> bool:
    if name == "vllm":
        return (HERE / ".venv-vllm/bin/python").exists() and (HF_EXPORT / "model.safetensors").exists()
    return name in HERD_SERVERS and (ROOT / ".venv/bin/herd").exists()


class Server:
    def __init__(self, name: str, port: int, max_model_len: int, log: Path) -> None:
        self.name, self.port = name, port
        self.argv, env = server_command(name, port, max_model_len)
        self.env_extra = env
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def start(self, timeout: float = 900.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        f = self.log.open("w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=os.environ | self.env_extra, start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    self.start_s = round(time.perf_counter() - t0, 1)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout} s; see {self.log}")

    def peak_rss_mb(self) -> float:
        """Sum of VmHWM over the server's process tree (see _common.PeakMemory)."""
        total = 0
        for pid in [self.proc.pid] + _common._descendants(self.proc.pid):
            try:
                total += _common._proc_status_kib(pid, "VmHWM")
            except OSError:
                pass
        return round(total / 1024, 1)

    def stop(self, grace: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def command_line(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env_extra.items())
        rel = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in self.argv]
        return (env + " " if env else "") + " ".join(rel)
