"""Paged attention on random caches: cascade (shared prefix read once) equals plain decode."""

from __future__ import annotations

import pytest
import torch

import serving.engine.decode_attention as pa
from serving.engine.paged_attention import PagedAttention, SeqSlice

BS, K, H, D = 16, 2, 6, 8


def _setup(shared_blocks: int, tails: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    kc = [torch.randn(num_blocks + 1, BS, K, D, generator=g)]
    vc = [torch.randn(num_blocks + 1, BS, K, D, generator=g)]
    kc[0][-1] = vc[0][-1] = 0  # the pad block
    free = iter(range(shared_blocks, num_blocks))
    seqs, positions = [], []
    for i, tail in enumerate(tails):
        ctx = shared_blocks * BS + tail
        own = [next(free) for _ in range(-(-tail // BS))]
        seqs.append(SeqSlice(i, 1, ctx, list(range(shared_blocks)) + own))
        positions.append(ctx - 1)
    q = torch.randn(len(tails), H, D, generator=g)
    k = torch.randn(len(tails), K, D, generator=g)
    v = torch.randn(len(tails), K, D, generator=g)
    return kc, vc, seqs, torch.tensor(positions), q, k, v, num_blocks


def _attend(monkeypatch, min_tokens, *setup_args, chunk=None):
    kc, vc, seqs, pos, q, k, v, nb = _setup(*setup_args)
    monkeypatch.setattr(pa, "CASCADE_MIN_TOKENS", min_tokens)
    attn = PagedAttention(kc, vc, BS, seqs, pos, nb)
    return attn, attn.attend(0, q, k, v, chunk, 0.3)


@pytest.mark.parametrize("shared, tails", [(8, [1, 5, 16, 17, 40]), (9, [3, 3]), (10, [16, 1, 33])])
def test_cascade_equals_plain_decode(monkeypatch, shared, tails):
    attn, got = _attend(monkeypatch, 128, shared, tails)
    assert [g.shared for g in attn.decode_groups] == [shared]  # the cascade path ran
    plain, want = _attend(monkeypatch, 10**9, shared, tails)
    assert [g.shared for g in plain.decode_groups] == [0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_cascade_when_prefixes_differ_or_for_chunked_layers(monkeypatch):
    kc, vc, seqs, pos, *_, nb = _setup(8, [4, 4])
    seqs[1].block_table[3] = 60  # diverges at block 3
    monkeypatch.setattr(pa, "CASCADE_MIN_TOKENS", 16)
    assert [g.shared for g in PagedAttention(kc, vc, BS, seqs, pos, nb).decode_groups] == [3]
    _, got = _attend(monkeypatch, 128, 8, [4, 20])
    _, chunked = _attend(monkeypatch, 128, 8, [4, 20], chunk=64)
    _, plain_chunked = _attend(monkeypatch, 10**9, 8, [4, 20], chunk=64)
    torch.testing.assert_close(chunked, plain_chunked)  # chunked layers take the plain path
    assert not torch.allclose(got, chunked)  # and chunking does change the answer here


def test_groups_by_prefix_and_a_plain_rest(monkeypatch):
    """Two system prompts and a loner in one batch: two cascade groups and a plain group."""
    kc, vc, *_, nb = _setup(0, [1])
    seqs, pos = [], []
    layout = [(0, 10, 1), (0, 10, 7), (20, 9, 3), (20, 9, 30), (40, 2, 5)]  # (first block, shared, tail)
    q = torch.randn(len(layout), H, D)
    k, v = torch.randn(len(layout), K, D), torch.randn(len(layout), K, D)
    spare = iter(range(50, 64))
    for i, (first, shared, tail) in enumerate(layout):
        table = list(range(first, first + shared)) + [next(spare) for _ in range(-(-tail // BS))]
        seqs.append(SeqSlice(i, 1, shared * BS + tail, table))
        pos.append(shared * BS + tail - 1)
    monkeypatch.setattr(pa, "CASCADE_MIN_TOKENS", 128)
    attn = PagedAttention(kc, vc, BS, seqs, torch.tensor(pos), nb)
    assert sorted(g.shared for g in attn.decode_groups) == [0, 9, 10]
    got = attn.attend(0, q, k, v, None, 0.3)
    monkeypatch.setattr(pa, "CASCADE_MIN_TOKENS", 10**9)
    want = PagedAttention(kc, vc, BS, seqs, torch.tensor(pos), nb).attend(0, q, k, v, None, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_newest_block_is_never_shared(monkeypatch):
    # Both sequences' newest tokens sit in shared-looking blocks: the last one stays private.
    kc, vc, *_, nb = _setup(9, [0, 0])
    seqs = [SeqSlice(i, 1, 9 * BS, list(range(9))) for i in range(2)]
    monkeypatch.setattr(pa, "CASCADE_MIN_TOKENS", 16)
    groups = PagedAttention(kc, vc, BS, seqs, torch.tensor([9 * BS - 1] * 2), nb).decode_groups
    assert [g.shared for g in groups] == [8]
