"""HF safetensors checkpoints on disk: read lazily (mmap, one tensor at a time) and write."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsSource:
    """The tensors of a checkpoint directory, single file or sharded by an index."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._where: dict[str, Path] = {}  # tensor name -> shard
        self._handles: dict[Path, object] = {}
        index = self.directory / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                names = self._open(self.directory / shard).keys()
                listed = {n for n, s in weight_map.items() if s == shard}
                if set(names) != listed:
                    diff = sorted(set(names) ^ listed)[0]
                    raise CheckpointError(f"{index}: shard {shard} and the index disagree about "
                                          f"tensor {diff}")
            self._where = {n: self.directory / s for n, s in weight_map.items()}
        elif (self.directory / SINGLE).exists():
            file = self.directory / SINGLE
            self._where = {n: file for n in self._open(file).keys()}
        else:
            found = sorted(p.name for p in self.directory.glob("*.safetensors"))
            hint = f" (found {', '.join(found)} but no {INDEX})" if found else ""
            if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
                hint += "; pickled .bin/.pt weights are never loaded, convert them to safetensors"
            raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX}{hint}")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.exists():
                raise CheckpointError(f"{file}: shard named in {INDEX} does not exist")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                                      "is it truncated?") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._where[name]).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name} ({e})") from None

    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Reads only rows [start, stop) of dimension `dim` from the file."""
        index = (slice(None),) * dim + (slice(start, stop),)
        try:
            return self._open(self._where[name]).get_slice(name)[index]
        except SafetensorError as e:
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name} ({e})") from None

    def origin(self, name: str) -> str:
        return str(self._where[name])


def write_safetensors(tensors: dict[str, torch.Tensor], directory: str | Path,
                      max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Writes model.safetensors, or shards plus an index when over max_shard_bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata=meta)
        return [directory / SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(file), metadata=meta)
        files.append(file)
        weight_map.update({n: file.name for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files
