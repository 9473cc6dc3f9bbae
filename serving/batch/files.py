"""Files for /v1/files on disk: `<id>.data` holds the bytes, `<id>.json` the OpenAI File object.
A file exists once its object is written, so a file cut short by a crash is never listed."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any

PURPOSES = ("batch", "batch_output", "user_data")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Whole or not at all: a reader (or a restart after a crash) never sees half a record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class FileStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root) / "files"
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        return f"file-{uuid.uuid4().hex}"

    def data_path(self, file_id: str) -> Path:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise KeyError(file_id)
        return self.root / f"{file_id}.data"

    def create(self, src: IO[bytes], filename: str, purpose: str, max_bytes: int | None = None) -> dict[str, Any]:
        """Copies `src` in; ValueError (naming the limit) if it is larger than max_bytes."""
        file_id = self.new_id()
        path = self.data_path(file_id)
        with open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if max_bytes is not None and path.stat().st_size > max_bytes:
            path.unlink()
            raise ValueError(f"the file is larger than the limit of {max_bytes} bytes")
        return self.publish(file_id, filename, purpose)

    def publish(self, file_id: str, filename: str, purpose: str) -> dict[str, Any]:
        """Makes a data file written in place (e.g. a batch's output) a listed File."""
        path = self.data_path(file_id)
        obj = {"id": file_id, "object": "file", "bytes": path.stat().st_size, "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
               "expires_at": None}
        write_json(self.root / f"{file_id}.json", obj)
        return obj

    def get(self, file_id: str) -> dict[str, Any]:
        """The File object; KeyError if there is none."""
        try:
            meta = self.root / f"{file_id}.json"
            self.data_path(file_id)
            return json.loads(meta.read_text())
        except (FileNotFoundError, KeyError):
            raise KeyError(file_id) from None

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        objs = [json.loads(p.read_text()) for p in self.root.glob("file-*.json")]
        objs = [o for o in objs if purpose is None or o["purpose"] == purpose]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]), reverse=True)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / f"{file_id}.json").unlink()
        self.data_path(file_id).unlink(missing_ok=True)
