"""Documents packed into fixed-length windows, and windows gathered into the model's flat batch.

Documents (in a seeded order) are laid end to end in one stream and cut every `seq_len` tokens;
the tail is padded with a pad document whose labels are ignored. Labels come from the stream:
token t's label is token t+1 when both are in one document and t+1 is a target, else ignored, so
no token learns across a document boundary and a document cut by a window edge keeps every label.
Inside a window each document piece is its own sequence for attention (positions restart at 0),
which is how DenseAttention keeps documents apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.documents import Document

IGNORE = -100


@dataclass
class Batch:
    """A flat batch of T tokens: windows laid end to end, each split into its document pieces."""

    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    labels_T: torch.Tensor  # IGNORE where no loss
    valid_T: torch.Tensor  # bool: not padding (what the MoE balance loss averages over)
    seq_lens: list[int]  # document pieces, in order; sum == T

    @property
    def num_tokens(self) -> int:
        return self.input_ids_T.shape[0]

    @property
    def num_labels(self) -> int:
        return int((self.labels_T != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids_T.to(device), self.positions_T.to(device), self.labels_T.to(device),
                     self.valid_T.to(device), self.seq_lens)


class PackedWindows:
    """N windows of seq_len tokens over one stream of documents."""

    def __init__(self, documents: list[Document], seq_len: int, pad_id: int, seed: int) -> None:
        if not documents:
            raise ValueError("PackedWindows: no documents")
        order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
        ids: list[int] = []
        labels: list[int] = []
        starts: list[bool] = []
        for i in order:
            doc = documents[i]
            n = len(doc.ids)
            if n == 0:
                continue
            ids += doc.ids
            labels += [doc.ids[t + 1] if doc.targets[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
            starts += [True] + [False] * (n - 1)
        n_real = len(ids)
        pad = -n_real % seq_len
        ids += [pad_id] * pad
        labels += [IGNORE] * pad
        starts += [True] + [False] * (pad - 1) if pad else []
        self.seq_len = seq_len
        self.num_windows = len(ids) // seq_len
        self.num_real_tokens = n_real
        self.num_documents = len(documents)
        self.ids_NS = torch.tensor(ids, dtype=torch.long).view(-1, seq_len)
        self.labels_NS = torch.tensor(labels, dtype=torch.long).view(-1, seq_len)
        starts_NS = torch.tensor(starts, dtype=torch.bool).view(-1, seq_len)
        starts_NS[:, 0] = True  # every window opens a new attention sequence
        self.starts_NS = starts_NS
        self.valid_NS = (torch.arange(len(ids)) < n_real).view(-1, seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def num_labels(self) -> int:
        return int((self.labels_NS != IGNORE).sum())

    def piece_lengths(self, window: int) -> list[int]:
        starts = self.starts_NS[window].nonzero().flatten().tolist()
        return [b - a for a, b in zip(starts, [*starts[1:], self.seq_len])]

    def batch(self, windows: list[int]) -> Batch:
        seq_lens = [n for w in windows for n in self.piece_lengths(w)]
        index = torch.tensor(windows, dtype=torch.long)
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        return Batch(self.ids_NS[index].flatten(), positions, self.labels_NS[index].flatten(),
                     self.valid_NS[index].flatten(), seq_lens)
