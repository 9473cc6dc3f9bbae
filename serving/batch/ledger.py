"""What a previous run of the same batch already wrote, so that a restarted run skips it.

Results are keyed by custom_id (only a custom_id's first line can have one), errors by input
line. A run killed mid-write can leave a partial last line: it is cut off here and redone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Ledger:
    result_ids: set[str] = field(default_factory=set)
    error_lines: set[int] = field(default_factory=set)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def num_done(self) -> int:
        return len(self.result_ids) + len(self.error_lines)

    def is_done(self, line: int, custom_id: str | None, first_of_id: bool) -> bool:
        return line in self.error_lines or (first_of_id and custom_id in self.result_ids)

    def record(self, out: dict) -> None:
        if out.get("error") is None:
            self.result_ids.add(out["custom_id"])
            used = out["response"]["body"].get("usage") or {}
            self.prompt_tokens += used.get("prompt_tokens", 0)
            self.completion_tokens += used.get("completion_tokens", 0)
        else:
            self.error_lines.add(int(out["error"]["line"]))

    @classmethod
    def load(cls, *paths: Path | None) -> Ledger:
        ledger = cls()
        for path in {Path(p) for p in paths if p is not None}:
            if not path.exists():
                continue
            _cut_partial_tail(path)
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    try:
                        ledger.record(json.loads(raw))
                    except (ValueError, KeyError, TypeError, AttributeError) as e:
                        raise ValueError(f"{path}:{n}: not a line this batch writer wrote ({e}); "
                                         "use a new output file") from None
        return ledger


def _cut_partial_tail(path: Path) -> None:
    """Drops bytes after the last newline (a line cut short by a kill)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        else:
            end = 0
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
