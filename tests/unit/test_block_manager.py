"""BlockManager: allocation, reference counts, chained prefix hashes, LRU eviction, stats."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict

import pytest

from serving.engine.block_manager import BlockManager, block_hashes

BS = 4


def _fill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocates blocks for `tokens` and registers every full block, as the scheduler does
    once they are computed; returns the blocks (referenced once)."""
    blocks = bm.allocate(bm.blocks_needed(len(tokens)))
    full = len(tokens) // bm.block_size
    for b, h in zip(blocks, block_hashes(tokens, bm.block_size, full)):
        bm.register(b, h)
    return blocks


def _check_invariants(bm: BlockManager) -> None:
    assert set(bm.free) == {b for b in range(bm.num_blocks) if bm.ref_count[b] == 0}
    assert all(r >= 0 for r in bm.ref_count)
    for h, b in bm.cached.items():
        assert bm.block_hash[b] == h


# -- construction and plain allocation ------------------------------------------------------

@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 1)])
def test_rejects_empty_pool(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_blocks_needed_rounds_up():
    bm = BlockManager(8, BS)
    assert [bm.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_release_ref_counts():
    bm = BlockManager(6, BS)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    a = bm.allocate(2)
    b = bm.allocate(3)
    assert len(set(a + b)) == 5
    assert all(bm.ref_count[x] == 1 for x in a + b)
    assert bm.num_free_blocks == 1
    assert bm.usage == pytest.approx(5 / 6)
    bm.release(a)
    assert all(bm.ref_count[x] == 0 for x in a)
    assert bm.num_free_blocks == 3
    bm.release(b)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    _check_invariants(bm)


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, BS)
    held = bm.allocate(3)
    assert bm.can_allocate(1) and not bm.can_allocate(2)
    before = (list(bm.ref_count), list(bm.free))
    with pytest.raises(RuntimeError):
        bm.allocate(2)
    assert (list(bm.ref_count), list(bm.free)) == before  # nothing was taken
    assert bm.allocate(1)
    bm.release(held)
    assert bm.can_allocate(3)
    assert bm.allocate(0) == []


def test_release_twice_raises():
    bm = BlockManager(4, BS)
    blocks = bm.allocate(2)
    bm.release(blocks)
    with pytest.raises(RuntimeError):
        bm.release(blocks)
    with pytest.raises(RuntimeError):
        BlockManager(2, BS).release([0])


def test_shared_block_freed_only_by_last_holder():
    bm = BlockManager(4, BS)
    tokens = list(range(9))
    first = _fill(bm, tokens)
    blocks, _ = bm.match_prefix(tokens)  # a second holder of the two full blocks
    assert blocks == first[:2]
    assert [bm.ref_count[b] for b in first] == [2, 2, 1]
    bm.release(first)
    assert [bm.ref_count[b] for b in first] == [1, 1, 0]
    assert bm.num_free_blocks == 2
    bm.release(blocks)
    assert bm.num_free_blocks == 4
    _check_invariants(bm)


# -- prefix matching ------------------------------------------------------------------------

def test_block_hashes_chain_and_resume():
    tokens = list(range(20))
    full = block_hashes(tokens, BS, 5)
    assert len(full) == 5 and len(set(full)) == 5
    assert block_hashes(tokens, BS, 5, start=2, parent=full[1]) == full[2:]
    # Same content in block 1 under a different block 0 hashes differently.
    other = [99] + tokens[1:]
    assert block_hashes(other, BS, 5)[1] != full[1]
    assert block_hashes(tokens, BS, 0) == []


def test_match_returns_registered_prefix_and_takes_refs():
    bm = BlockManager(8, BS)
    prompt = list(range(10))  # two full blocks + 2 tokens
    blocks = _fill(bm, prompt)
    bm.release(blocks)
    free_before = bm.num_free_blocks
    got, hashes = bm.match_prefix(prompt + [50, 51, 52])
    assert got == blocks[:2]
    assert hashes == block_hashes(prompt, BS, 2)
    assert all(bm.ref_count[b] == 1 for b in got)
    assert bm.num_free_blocks == free_before - 2  # taken out of the free list
    assert not set(got) & set(bm.free)
    _check_invariants(bm)


@pytest.mark.parametrize("length, expected_blocks", [(4, 0), (5, 1), (8, 1), (9, 2), (12, 2), (13, 3)])
def test_last_token_is_never_served_from_cache(length, expected_blocks):
    bm = BlockManager(8, BS)
    cached = list(range(100, 116))  # four full blocks registered
    bm.release(_fill(bm, cached))
    got, _ = bm.match_prefix(cached[:length])
    assert len(got) == expected_blocks
    assert len(got) * BS < length  # at least one token left to compute


def test_block_matches_only_if_all_before_it_match():
    bm = BlockManager(8, BS)
    a = list(range(12))
    bm.release(_fill(bm, a))
    # Block 0 differs, blocks 1-2 identical: nothing matches (hashes are chained).
    b = [77] + a[1:] + [1]
    assert bm.match_prefix(b) == ([], [])
    # Block 0 identical, block 1 differs, block 2 identical: only block 0.
    c = a[:4] + [77] + a[5:] + [1]
    got, _ = bm.match_prefix(c)
    assert len(got) == 1
    bm.release(got)
    _check_invariants(bm)


def test_match_stops_at_the_first_missing_block():
    # Two sequences computed the same prefix at once: the cache keeps d's copies of blocks 0-1
    # and e's block 2. Evicting d's block 1 leaves a gap that the match must not jump over.
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    hs = block_hashes(tokens, 2, 3)
    d = bm.allocate(2)
    e = bm.allocate(3)
    for block, h in [*zip(d, hs), *zip(e, hs)]:
        bm.register(block, h)
    assert bm.cached == {hs[0]: d[0], hs[1]: d[1], hs[2]: e[2]}
    bm.release(d)
    taken = bm.allocate(4)  # the 3 never-used blocks, then d's tail
    assert taken[-1] == d[1] and hs[1] not in bm.cached
    got, hashes = bm.match_prefix(tokens)
    assert got == [d[0]] and hashes == hs[:1]
    bm.release(got)
    bm.release(taken)
    bm.release(e)
    assert bm.num_free_blocks == 8


def test_match_on_a_block_in_use_shares_it():
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    held = _fill(bm, prompt)  # still referenced by its owner
    free = bm.num_free_blocks
    got, _ = bm.match_prefix(prompt)
    assert got == held[:2]
    assert bm.num_free_blocks == free
    assert [bm.ref_count[b] for b in got] == [2, 2]
    bm.release(got)
    bm.release(held)
    assert bm.num_free_blocks == 8


def test_prefix_stats():
    bm = BlockManager(8, BS)
    assert bm.stats.hit_rate == 0.0
    prompt = list(range(9))
    bm.release(_fill(bm, prompt))
    got, _ = bm.match_prefix(prompt)  # 2 blocks hit out of 9 tokens
    bm.release(got)
    got2, _ = bm.match_prefix([500] * 7)  # miss
    assert got2 == []
    assert bm.stats.queried_tokens == 16
    assert bm.stats.hit_tokens == 8
    assert bm.stats.hit_rate == pytest.approx(0.5)


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = list(range(9))
    blocks = _fill(bm, prompt)
    assert all(h is None for h in bm.block_hash) and not bm.cached
    bm.release(blocks)
    assert bm.match_prefix(prompt) == ([], [])
    assert bm.stats.queried_tokens == 0 and bm.stats.hit_tokens == 0
    assert bm.num_free_blocks == 8


def test_register_is_idempotent_and_first_block_keeps_the_hash():
    bm = BlockManager(4, BS)
    prompt = list(range(5))
    h = block_hashes(prompt, BS, 1)[0]
    first = bm.allocate(1)[0]
    bm.register(first, h)
    bm.register(first, h + 1)  # already hashed: ignored
    assert bm.block_hash[first] == h and bm.cached == {h: first}
    dup = bm.allocate(1)[0]  # the same content computed again elsewhere
    bm.register(dup, h)
    assert bm.cached[h] == first
    # Evicting the duplicate must not drop the first block's entry.
    bm.release([dup])
    others = bm.allocate(bm.num_free_blocks)
    assert dup in others
    assert bm.cached == {h: first}
    assert bm.match_prefix(prompt)[0] == [first]


# -- eviction order -------------------------------------------------------------------------

def test_eviction_takes_tail_of_sequence_first():
    bm = BlockManager(3, BS)
    prompt = list(range(13))  # its first 12 tokens fill the whole pool
    blocks = _fill(bm, prompt[:12])
    bm.release(blocks)
    assert list(bm.free) == blocks[::-1]
    evicted = bm.allocate(1)
    assert evicted == [blocks[-1]]
    got, _ = bm.match_prefix(prompt)
    assert got == blocks[:2]  # head still cached; the tail's content is gone
    assert bm.block_hash[blocks[-1]] is None


def test_eviction_is_least_recently_freed_first():
    bm = BlockManager(3, BS)
    a, b, c = list(range(5)), list(range(10, 15)), list(range(20, 25))
    ba, bb, bc = (_fill(bm, x[:4])[0] for x in (a, b, c))  # one full block each
    for block in (bb, ba, bc):  # freed in this order
        bm.release([block])
    assert bm.allocate(1) == [bb]
    assert bm.match_prefix(b)[0] == []
    # Matching `a` re-references it, so it leaves the LRU list; freeing it again makes it newest.
    got, _ = bm.match_prefix(a)
    assert got == [ba]
    bm.release(got)
    assert bm.allocate(1) == [bc]
    assert bm.match_prefix(a)[0] == [ba]


def test_reset_prefix_cache_keeps_referenced_blocks():
    bm = BlockManager(6, BS)
    kept_prompt, dropped_prompt = list(range(5)), list(range(50, 55))
    kept = _fill(bm, kept_prompt)
    bm.release(_fill(bm, dropped_prompt))
    bm.reset_prefix_cache()
    assert bm.match_prefix(dropped_prompt)[0] == []
    got, _ = bm.match_prefix(kept_prompt)
    assert got == kept[:1]
    bm.release(got)
    bm.release(kept)
    assert bm.num_free_blocks == 6
    _check_invariants(bm)


# -- random operations against a model of the expected state ----------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_random_operations_keep_counts_and_lru(seed):
    rng = random.Random(seed)
    num_blocks, bs = rng.randint(1, 12), rng.randint(1, 4)
    bm = BlockManager(num_blocks, bs, enable_prefix_caching=rng.random() < 0.85)
    vocab = rng.randint(1, 3)  # tiny vocabulary: many shared prefixes
    holders: list[tuple[list[int], list[int]]] = []  # (tokens, blocks held)
    lru: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
    content: dict[int, int] = {}  # block -> hash it was registered under

    def release(i: int) -> None:
        _, blocks = holders.pop(i)
        bm.release(blocks)
        for b in reversed(blocks):
            if bm.ref_count[b] == 0:
                lru[b] = None

    for _ in range(60):
        op = rng.random()
        if op < 0.45:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 4 * bs + 2))]
            blocks, hashes = bm.match_prefix(tokens)
            assert hashes == block_hashes(tokens, bs, len(blocks))
            assert len(blocks) * bs < len(tokens)
            for b, h in zip(blocks, hashes):
                assert content[b] == h  # a hit serves the right content
                lru.pop(b, None)
            need = bm.blocks_needed(len(tokens)) - len(blocks)
            if bm.can_allocate(need):
                expected = list(lru)[:need]
                new = bm.allocate(need)
                assert new == expected  # least recently freed first
                for b in new:
                    del lru[b]
                    content.pop(b, None)
                blocks += new
                full = len(tokens) // bs
                for k, h in enumerate(block_hashes(tokens, bs, full)):
                    if k >= len(hashes):
                        bm.register(blocks[k], h)
                        if bm.enable_prefix_caching:
                            content.setdefault(blocks[k], h)
                holders.append((tokens, blocks))
            else:
                with pytest.raises(RuntimeError):
                    bm.allocate(need)
                bm.release(blocks)
                for b in reversed(blocks):
                    if bm.ref_count[b] == 0:
                        lru[b] = None
        elif holders:
            release(rng.randrange(len(holders)))
        counts = Counter(b for _, blocks in holders for b in blocks)
        assert bm.ref_count == [counts[b] for b in range(num_blocks)]
        assert list(bm.free) == list(lru)
        _check_invariants(bm)
    while holders:
        release(0)
    assert bm.num_free_blocks == num_blocks
    assert bm.ref_count == [0] * num_blocks
    assert bm.stats.hit_tokens <= bm.stats.queried_tokens
