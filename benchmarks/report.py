"""What the benchmark drivers share for their results files: machine facts, a markdown table, a chart.

The chart needs matplotlib, which herd's .venv does not carry: `.venv/bin/python -m pip install
matplotlib`. Without it bar_chart prints a note and returns None.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks/peers"))
import _common


def machine_info() -> dict:
    info = _common.machine()
    info["python"] = platform.python_version()
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    git = ["git", "-C", str(ROOT)]
    sha = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "models", "serving",
                                  "kernels", "herd"], check=False, capture_output=True, text=True).stdout.strip()
    info["herd_commit"] = sha + (" + uncommitted changes in models/serving/kernels/herd" if dirty else "")
    info["load_average_at_start"] = os.getloadavg()
    return info


def write_results(stem: str, script: str, rows: list[dict], ratios: dict) -> tuple[Path, str, dict]:
    """results/<date>-<stem>.json with the command and machine; returns (path without suffix,
    the command line, the machine facts) for the markdown beside it."""
    date = datetime.date.today().isoformat()
    out = ROOT / "benchmarks/results" / f"{date}-{stem}"
    info = machine_info()
    command = f"python benchmarks/{script} " + shlex.join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": info, "results": rows,
                                                    "ratios": ratios}, indent=2))
    return out, command, info


def reused_rows(path: Path | None, key: str, skip: set[str]) -> list[dict]:
    """Rows of an earlier results JSON (its other runs, same machine) for a report that re-runs
    only some; each is marked with where it came from."""
    if path is None:
        return []
    rows = json.loads(path.read_text())["results"]
    return [{**r, "command": f"(reused from {path.name}) {r['command']}"} for r in rows if r[key] not in skip]


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def md_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def bar_chart(path: Path, title: str, rows: list[dict], metrics: list[tuple[str, str]],
              label: str = "engine") -> Path | None:
    """One bar panel per metric, one bar per row; None (and a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no chart was drawn "
              "(.venv/bin/python -m pip install matplotlib)")
        return None
    metrics = [(k, t) for k, t in metrics if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    names = [str(r[label]) for r in rows]
    for ax, (key, heading) in zip(axes[0], metrics):
        vals = [r.get(key) or 0 for r in rows]
        bars = ax.bar(names, vals, color=["#d95f02" if n.startswith("herd") else "#7570b3" for n in names])
        ax.bar_label(bars, labels=[fmt(v) for v in vals], fontsize=8)
        ax.set_title(heading, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
