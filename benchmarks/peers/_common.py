"""What the peer runners share: the workload file, the command line, peak memory, the result file.

Each runner lives in its own venv (vLLM, llama.cpp, herd's .venv for transformers), so this file
imports nothing beyond the standard library.

Workload JSON:
    {"name": str,
     "requests": [{"messages": [{"role": ..., "content": ...}, ...]} | {"prompt_token_ids": [int, ...]}],
     "max_tokens": int, "ignore_eos": bool, "temperature": 0.0, "dtype": "bfloat16"}

ignore_eos has vLLM's meaning in every runner (and herd's, serving/engine/output_processor.py):
generation does not stop at EOS, but EOS is not banned either, so it may be emitted and
generation goes on after it. Every request then yields exactly max_tokens tokens.

Result JSON (the fields every runner writes; runners add their own):
    engine, version, workload, n_requests, output_tokens, elapsed_s, tokens_per_s,
    ms_per_token (single-request workloads only: elapsed_s / output_tokens, prefill included,
    else null), repeats and elapsed_runs_s (elapsed_s is the median run; see Runs),
    other_cores_busy (worst run; see Timer), peak_rss_mb (see PeakMemory), prompt_ids_sha256 and
    prompt_lengths (see prompt_fields), outputs (generated token ids per request, in request order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any


def parse_args(engine: str, model_help: str, extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"Offline generation timing with {engine}.")
    ap.add_argument("--model", required=True, type=Path, help=model_help)
    ap.add_argument("--workload", required=True, type=Path, help="workload JSON (see _common.py)")
    ap.add_argument("--out", required=True, type=Path, help="result JSON to write")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of the whole workload; elapsed_s is their median")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before the timed region, wait up to SECONDS for the rest of the machine "
                         "to use under 0.1 core (this runner's own processes excluded)")
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def load_workload(path: Path) -> dict[str, Any]:
    w = json.loads(path.read_text())

    def bad(field: str, why: str):
        raise SystemExit(f"{path}: field '{field}': {why}")

    for field, typ in (("name", str), ("requests", list), ("max_tokens", int)):
        if not isinstance(w.get(field), typ):
            bad(field, f"required, of type {typ.__name__}")
    if not w["requests"]:
        bad("requests", "is empty")
    if w["max_tokens"] < 1:
        bad("max_tokens", f"must be >= 1, got {w['max_tokens']}")
    w.setdefault("ignore_eos", False)
    w.setdefault("temperature", 0.0)
    w.setdefault("dtype", "bfloat16")
    if w["temperature"] != 0.0:
        bad("temperature", f"only greedy (0.0) is supported, got {w['temperature']}")
    for i, r in enumerate(w["requests"]):
        if ("messages" in r) == ("prompt_token_ids" in r):
            bad(f"requests[{i}]", "needs exactly one of 'messages' or 'prompt_token_ids'")
        if "prompt_token_ids" in r and not (
            r["prompt_token_ids"] and all(isinstance(t, int) for t in r["prompt_token_ids"])
        ):
            bad(f"requests[{i}].prompt_token_ids", "must be a non-empty list of ints")
    return w


def hf_chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template of an HF tokenizer, rendered and tokenized as vLLM's llm.chat does it:
    the template writes its own special tokens, so none are added on top."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_fields(prompts: list[list[int]]) -> dict[str, Any]:
    """Prompt lengths and one digest of all prompt ids, so a driver can check that every engine
    was given the same tokens."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return {"prompt_ids_sha256": digest, "prompt_tokens": sum(map(len, prompts)),
            "prompt_lengths": [len(p) for p in prompts]}


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _proc_pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid, from /proc/*/stat (field 4 is the parent pid)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PeakMemory:
    """Peak memory of this process and its descendants, read from the kernel, not sampled.

    Call report() after the timed work and while child processes are still alive (vLLM's engine
    core and worker run as children until shutdown). peak_rss_mb is the sum over the live process
    tree of each process's own RSS high-water mark (VmHWM). Each term is exact; as the peaks of
    different processes need not coincide, the sum is an upper bound on the tree's simultaneous
    peak. For a single-process engine it is exactly that process's peak RSS.
    Children already reaped are reported apart (peak_rss_reaped_child_mb, getrusage
    RUSAGE_CHILDREN), not added: a fork+exec helper (git, a compiler probe) carries its parent's
    high-water mark at exec into that figure, which would count the parent twice.
    Also reported, as a snapshot at report() time: the RSS sum and the PSS sum (PSS splits pages
    shared between processes, e.g. shared-memory queues, so it counts them once).

    Not sampled from a thread: a Python thread waking every 50 ms in the timed process costs a
    few per cent on 2 cores (measured with llama.cpp), and would still miss short spikes.
    """

    @staticmethod
    def report() -> dict[str, Any]:
        me = os.getpid()
        tree = [me] + _descendants(me)
        hwm = rss = pss = 0
        alive = 0
        by_proc = {}
        for pid in tree:
            try:
                h = _proc_status_kib(pid, "VmHWM")
                rss += _proc_status_kib(pid, "VmRSS")
                pss += _proc_pss_kib(pid)
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            hwm += h
            alive += 1
            by_proc[f"{pid}:{name}"] = round(h / 1024, 1)
        reaped_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def mb(kib):
            return round(kib / 1024, 1)
        return {
            "peak_rss_mb": mb(max(hwm, self_kib)),
            "peak_rss_self_mb": mb(self_kib),
            "peak_rss_reaped_child_mb": mb(reaped_kib),
            "peak_rss_method": "sum of VmHWM over the live process tree",
            "processes": alive,
            "peak_rss_by_process_mb": by_proc,
            "end_rss_mb": mb(rss),
            "end_pss_mb": mb(pss),
        }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "platform": platform.platform()}


def result(engine: str, version: str, workload: dict, runs: Runs, **extra) -> dict[str, Any]:
    """The result record. Call it while the engine (and so its child processes) is still alive."""
    outputs = runs.outputs
    elapsed_s = runs.elapsed_s
    n_tokens = sum(len(o) for o in outputs)
    single = len(workload["requests"]) == 1
    res = {
        "engine": engine,
        "version": version,
        "workload": workload["name"],
        "n_requests": len(workload["requests"]),
        "max_tokens": workload["max_tokens"],
        "ignore_eos": workload["ignore_eos"],
        "dtype": workload["dtype"],
        "output_tokens": n_tokens,
        "elapsed_s": round(elapsed_s, 4),
        "tokens_per_s": round(n_tokens / elapsed_s, 2) if elapsed_s > 0 else None,
        "ms_per_token": round(elapsed_s / n_tokens * 1000, 3) if single and n_tokens else None,
        "repeats": len(runs.timers),
        "elapsed_runs_s": [round(t.s, 4) for t in runs.timers],
        "other_cores_busy": max(t.other_cores for t in runs.timers),
        "other_cores_before": runs.quiet,
        "outputs_same_every_run": runs.stable,
        **PeakMemory.report(),
        "machine": machine(),
        **extra,
        "outputs": outputs,
    }
    return res


def write_result(path: Path, res: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One line per field and one per request's output: readable, and diffable between engines.
    head = {k: v for k, v in res.items() if k != "outputs"}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    outs = ",\n".join(f"  {json.dumps(o)}" for o in res["outputs"])
    path.write_text("{\n" + "\n".join(lines) + f'\n "outputs": [\n{outs}\n ]\n}}\n')
    long_fields = ("outputs", "texts", "machine", "settings", "prompt_lengths", "finish_reasons",
                   "per_request_s", "peak_rss_method")
    print(json.dumps({k: v for k, v in res.items() if k not in long_fields}))


def _busy_ticks() -> int:
    """Non-idle CPU time of the whole machine, in clock ticks (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(f) - f[3] - f[4]  # minus idle, iowait


def _tree_ticks() -> int:
    """CPU time of this process, its live descendants and its reaped children, in clock ticks."""
    me = os.getpid()
    total = 0
    for pid in [me] + _descendants(me):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except OSError:
            pass
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + round((reaped.ru_utime + reaped.ru_stime) * os.sysconf("SC_CLK_TCK"))


def wait_quiet(max_s: float, threshold: float = 0.1, window: float = 2.0) -> float | None:
    """Wait until processes outside this tree use under `threshold` cores over `window` s.

    Returns the last measured load of the others (in cores), or None when not asked to wait.
    Gives up after max_s; Timer.other_cores then shows whether the run was disturbed."""
    if max_s <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + max_s
    while True:
        b0, m0 = _busy_ticks(), _tree_ticks()
        time.sleep(window)
        other = max((_busy_ticks() - b0) - (_tree_ticks() - m0), 0) / hz / window
        if other < threshold or time.monotonic() > deadline:
            return round(other, 2)


class Timer:
    """Wall time of a region, and how busy the rest of the machine was meanwhile.

    other_cores: CPU time used by processes outside this process tree during the region, in
    cores (1.0 = one core fully taken). On this 2-core machine anything above ~0.1 means the
    timing is disturbed by someone else's work; results() records it so such runs can be spotted.
    """

    def __enter__(self):
        self.b0, self.m0 = _busy_ticks(), _tree_ticks()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        hz = os.sysconf("SC_CLK_TCK")
        other = (_busy_ticks() - self.b0) - (_tree_ticks() - self.m0)
        self.other_cores = round(max(other, 0) / hz / self.s, 2) if self.s > 0 else None


class Runs:
    """Times `fn` (all requests, returns their outputs) `repeats` times.

    `before` runs ahead of each repeat, untimed (a runner resets its prefix cache there, so every
    repeat starts cold). elapsed_s is the median; outputs are the first run's, and `stable` says
    whether every run produced the same ids (greedy decoding should)."""

    def __init__(self, fn, repeats: int, wait_quiet_s: float = 0.0, before=None):
        if repeats < 1:
            raise SystemExit(f"--repeats: must be >= 1, got {repeats}")
        self.timers, outs, self.quiet = [], [], []
        for _ in range(repeats):
            if before is not None:
                before()
            self.quiet.append(wait_quiet(wait_quiet_s))
            with Timer() as t:
                outs.append(fn())
            self.timers.append(t)
        self.outputs = outs[0]
        self.stable = all(o == outs[0] for o in outs)
        if all(q is None for q in self.quiet):
            self.quiet = None
        self.elapsed_s = sorted(t.s for t in self.timers)[len(self.timers) // 2]
