"""What a run leaves behind as it goes: a tqdm bar (loss, tokens/s, MFU), one JSON line per logged
step in DIR/metrics.jsonl, TensorBoard scalars when the tensorboard package is installed, and the
loss curve as DIR/loss.png at the end (matplotlib, the `train` extra). Rank 0 only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Records:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, *, progress: bool,
                 tensorboard: bool) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / METRICS_FILE
        # A resumed run drops what the previous one logged after its checkpoint: those steps rerun.
        kept = [r for r in read_metrics(out_dir) if r.get("step", 0) <= start_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.metrics_path.open("a")
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             file=sys.stderr, dynamic_ncols=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])

    def progress(self, step: int, loss: float, tokens_per_s: float, mfu: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={loss:.4f} tok/s={tokens_per_s:,.0f} MFU={100 * mfu:.1f}%",
                                      refresh=False)
            self._bar.update(step - self._bar.n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def plot_loss(out_dir: Path) -> Path | None:
    """DIR/loss.png from DIR/metrics.jsonl; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'herd[train]'), so no loss plot", file=sys.stderr)
        return None
    rows = read_metrics(out_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"{out_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
