"""Scheduler policy, driven by a simulated engine loop (no model): schedule -> computed ->
append a token where the chunk samples -> finish at max_tokens."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from serving.engine.block_manager import BlockManager, block_hashes
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerOutput
from serving.engine.sequence import Request, Sequence, Status


def token_at(seq: Sequence, pos: int) -> int:
    """The token the fake model samples at `pos`: a function of (seq, pos) only, so a
    recomputed sequence must end up with exactly the same tokens."""
    return 1000 + (seq.seq_id * 31 + pos * 7) % 97


class Sim:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 64, prefix_caching: bool = True,
                 chunked_prefill: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, chunked_prefill)
        self.ids = itertools.count()
        self.requests: list[Request] = []
        self.steps = 0
        self.preempted_total = 0
        self.aborted: set[int] = set()
        self.last_samples: list[bool] = []

    def add(self, prompt: list[int], max_tokens: int, **kw) -> Request:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)
        first = next(self.ids)
        for _ in range(params.best_of - 1):
            next(self.ids)
        req = Request(f"r{first}", list(prompt), params, None, first)
        for seq in req.seqs:
            self.sched.add(seq)
        self.requests.append(req)
        return req

    def abort(self, seq: Sequence) -> None:
        self.aborted.add(seq.seq_id)
        self.sched.finish(seq)

    @property
    def seqs(self) -> list[Sequence]:
        return [s for r in self.requests for s in r.seqs]

    def step(self) -> SchedulerOutput:
        sched, bm = self.sched, self.bm
        before_running = list(sched.running)
        out = sched.schedule()
        self.steps += 1
        self.preempted_total += len(out.preempted)

        # Budget and batch limits.
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        ids = [it.seq.seq_id for it in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        for it in out.scheduled:
            seq = it.seq
            assert seq.status is Status.RUNNING and seq in sched.running
            assert it.num_tokens >= 1
            assert it.start == seq.num_computed
            assert it.start + it.num_tokens <= len(seq.token_ids)
            assert len(seq.blocks) * bm.block_size >= it.start + it.num_tokens
            assert it.samples == (it.start + it.num_tokens == len(seq.token_ids))

        # Running sequences go before newly admitted ones, and none is skipped for them.
        was_running = {s.seq_id for s in before_running}
        kinds = [it.seq.seq_id in was_running for it in out.scheduled]
        assert kinds == sorted(kinds, reverse=True)
        if not all(kinds):
            still = {s.seq_id for s in before_running if s.status is Status.RUNNING}
            assert still <= set(ids), "a running sequence was skipped for a new prefill"

        # Preempted sequences: blocks freed, back at the front of the queue, recomputed later.
        for seq in out.preempted:
            assert seq.status is Status.WAITING and seq.blocks == [] and seq.num_computed == 0
            assert seq not in sched.running
        if out.preempted:
            assert list(sched.waiting)[:len(out.preempted)] == out.preempted[::-1]
            assert not [it for it in out.scheduled if it.seq.seq_id not in was_running], \
                "admitted a new sequence in a step that preempted"

        self.last_samples = [it.samples for it in out.scheduled]  # before tokens are appended
        for it in out.scheduled:
            seq = it.seq
            n_out = seq.num_output_tokens
            sched.computed(it)
            if it.samples:
                seq.append(token_at(seq, len(seq.token_ids)), 0.0, None)
                if seq.num_output_tokens >= seq.request.params.max_tokens:
                    sched.finish(seq)
            else:
                assert seq.num_output_tokens == n_out
        self.check_blocks()
        return out

    def check_blocks(self) -> None:
        bm = self.bm
        holders = [s for s in self.seqs if not s.finished]
        counts = Counter(b for s in holders for b in s.blocks)
        assert bm.ref_count == [counts[b] for b in range(bm.num_blocks)]
        assert set(bm.free) == {b for b in range(bm.num_blocks) if counts[b] == 0}
        for s in self.seqs:
            if s.finished:
                assert s.blocks == []
                continue
            assert len(set(s.blocks)) == len(s.blocks)
            assert len(s.blocks) * bm.block_size >= s.num_computed
            if bm.enable_prefix_caching:
                assert s.block_hashes == block_hashes(s.token_ids, bm.block_size, len(s.block_hashes))
                for b, h in zip(s.blocks, s.block_hashes):
                    assert bm.block_hash[b] == h

    def run(self, max_steps: int = 5000) -> None:
        idle = 0
        while self.sched.has_work():
            out = self.step()
            idle = idle + 1 if not out.scheduled and not out.preempted else 0
            assert idle < 2, (f"no progress: waiting={[s.seq_id for s in self.sched.waiting]}, "
                              f"free={self.bm.num_free_blocks}")
            assert self.steps < max_steps

    def check_done(self) -> None:
        for req in self.requests:
            for seq in req.seqs:
                assert seq.finished
                assert seq.blocks == []
                n = len(req.prompt_token_ids)
                assert seq.token_ids[:n] == req.prompt_token_ids
                if seq.seq_id in self.aborted:
                    continue
                assert seq.output_ids == [token_at(seq, p) for p in range(n, n + req.params.max_tokens)]
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.ref_count == [0] * self.bm.num_blocks
        assert not self.sched.running and not self.sched.waiting


def items(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(it.seq.request.request_id, it.start, it.num_tokens) for it in out.scheduled]


# -- basic flow, budget and chunking ------------------------------------------------------------

def test_single_request_prefill_then_decodes():
    sim = Sim(num_blocks=16, block_size=4)
    req = sim.add(list(range(10)), max_tokens=4)
    out = sim.step()
    assert items(out) == [("r0", 0, 10)] and sim.last_samples == [True]
    for pos in range(10, 13):
        assert items(sim.step()) == [("r0", pos, 1)]
    assert req.finished
    sim.check_done()


def test_chunked_prefill_splits_long_prompt_and_only_last_chunk_samples():
    sim = Sim(num_blocks=32, block_size=4, max_num_batched_tokens=8)
    sim.add(list(range(25)), max_tokens=3)
    chunks = []
    for _ in range(4):
        out = sim.step()
        [it] = out.scheduled
        chunks.append((it.start, it.num_tokens, sim.last_samples[0]))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 1, True)]
    seq = sim.requests[0].seqs[0]
    assert seq.num_output_tokens == 1
    sim.run()
    sim.check_done()


def test_without_chunked_prefill_a_prompt_waits_for_room():
    sim = Sim(num_blocks=32, block_size=4, max_num_batched_tokens=10, chunked_prefill=False)
    sim.add([1, 2, 3], max_tokens=3)
    sim.step()
    sim.add(list(range(10, 20)), max_tokens=1)  # needs the whole budget at once
    while not sim.requests[0].finished:
        out = sim.step()
        assert items(out)[0][0] == "r0" and len(out.scheduled) == 1
    out = sim.step()
    assert items(out) == [("r1", 0, 10)]
    sim.run()
    sim.check_done()


def test_decodes_are_scheduled_before_new_prefills():
    sim = Sim(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    sim.add(list(range(5)), max_tokens=10)
    sim.add(list(range(5, 10)), max_tokens=10)
    sim.step()
    sim.add(list(range(100, 140)), max_tokens=2)  # a long prompt arrives
    out = sim.step()
    assert items(out) == [("r0", 5, 1), ("r1", 5, 1), ("r2", 0, 14)]
    out = sim.step()
    assert items(out) == [("r0", 6, 1), ("r1", 6, 1), ("r2", 14, 14)]
    sim.run()
    sim.check_done()


def test_budget_full_of_decodes_admits_nothing():
    sim = Sim(num_blocks=64, block_size=4, max_num_batched_tokens=2)
    sim.add([1], max_tokens=5)
    sim.add([2], max_tokens=5)
    sim.step()
    sim.add([3, 4, 5], max_tokens=1)
    for _ in range(4):
        out = sim.step()
        assert {it.seq.request.request_id for it in out.scheduled} == {"r0", "r1"}
    sim.run()
    sim.check_done()


def test_max_num_seqs_limits_running():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2)
    for i in range(5):
        sim.add([i, i + 1, i + 2], max_tokens=3 + i)
    out = sim.step()
    assert [r for r, _, _ in items(out)] == ["r0", "r1"]
    assert len(sim.sched.running) == 2 and len(sim.sched.waiting) == 3
    sim.run()  # Sim.step asserts the limit every step
    sim.check_done()


def test_best_of_sequences_all_finish():
    sim = Sim(num_blocks=64, block_size=4)
    req = sim.add(list(range(9)), max_tokens=5, n=2, best_of=3)
    assert len(req.seqs) == 3
    sim.run()
    sim.check_done()


# -- preemption -----------------------------------------------------------------------------

def test_preempts_newest_and_recomputes_it_from_all_its_tokens():
    # 6 blocks of 2: each request needs 5 blocks for 10 tokens, so both cannot finish together.
    sim = Sim(num_blocks=6, block_size=2, prefix_caching=False)
    a = sim.add([1, 2, 3, 4], max_tokens=6).seqs[0]
    b = sim.add([5, 6, 7, 8], max_tokens=6).seqs[0]
    first = None
    while first is None:
        out = sim.step()
        if out.preempted:
            first = out
    assert first.preempted == [b]
    assert b.num_preemptions == 1 and sim.sched.num_preemptions == 1
    assert sim.sched.waiting[0] is b
    assert a.status is Status.RUNNING
    kept = list(b.token_ids)
    assert b.num_output_tokens >= 1  # it had generated tokens: they are kept, not redone
    # When b comes back, its first chunk covers everything it had, and only the end samples.
    while True:
        out = sim.step()
        mine = [(it, smp) for it, smp in zip(out.scheduled, sim.last_samples) if it.seq is b]
        if mine:
            break
    [(it, samples)] = mine
    assert it.start == 0
    assert b.token_ids[:len(kept)] == kept
    assert it.num_tokens == len(kept) and samples
    sim.run()
    sim.check_done()


def test_sequence_that_cannot_grow_preempts_itself():
    # a (older) is mid-block and needs nothing; b needs a new block and none is free.
    sim = Sim(num_blocks=4, block_size=4, prefix_caching=False)
    sim.add([1, 2, 3, 4, 5], max_tokens=3)  # a: 2 blocks, room for 3 more tokens
    b = sim.add([6, 7, 8, 9, 10, 11, 12, 13], max_tokens=3).seqs[0]  # 2 blocks, full
    out = sim.step()
    assert sim.bm.num_free_blocks == 0
    out = sim.step()
    assert out.preempted == [b]
    assert items(out) == [("r0", 5, 1)]
    assert b.status is Status.WAITING and b.blocks == [] and sim.sched.waiting[0] is b
    sim.run()
    sim.check_done()


def test_preemption_keeps_fcfs_order_and_loses_no_request():
    sim = Sim(num_blocks=8, block_size=2, max_num_batched_tokens=16, prefix_caching=False)
    for i in range(6):
        sim.add([10 * i + k for k in range(3)], max_tokens=8)
    sim.run()
    assert sim.preempted_total > 0
    sim.check_done()


# -- prefix cache ---------------------------------------------------------------------------

def test_prefix_hit_sets_num_computed_on_admission():
    sim = Sim(num_blocks=32, block_size=4)
    prompt = list(range(10))
    first = sim.add(prompt, max_tokens=2)
    sim.run()
    assert first.num_cached_tokens == 0
    second = sim.add(prompt + [77, 78], max_tokens=2)
    out = sim.step()
    assert items(out) == [("r1", 8, 4)]
    assert second.num_cached_tokens == 8
    assert sim.bm.stats.hit_tokens == 8
    # The whole prompt of a cached one: the last token is still computed.
    third = sim.add(prompt[:8], max_tokens=1)
    sim.run()
    assert third.num_cached_tokens == 4
    sim.check_done()


def test_concurrent_requests_share_prefix_blocks():
    sim = Sim(num_blocks=32, block_size=4)
    prompt = list(range(12))
    a = sim.add(prompt + [1], max_tokens=6).seqs[0]
    sim.step()
    b = sim.add(prompt + [2], max_tokens=6).seqs[0]
    sim.step()
    assert b.blocks[:3] == a.blocks[:3]
    assert all(sim.bm.ref_count[x] == 2 for x in a.blocks[:3])
    sim.run()
    sim.check_done()


def test_prompt_logprobs_request_skips_the_prefix_cache():
    sim = Sim(num_blocks=32, block_size=4)
    prompt = list(range(10))
    sim.add(prompt, max_tokens=1)
    sim.run()
    req = sim.add(prompt, max_tokens=1, prompt_logprobs=1)
    out = sim.step()
    assert items(out)[0][1] == 0 and req.num_cached_tokens == 0
    sim.check_done()


def test_finishing_a_waiting_sequence_frees_its_blocks():
    sim = Sim(num_blocks=4, block_size=4)
    sim.add(list(range(9)), max_tokens=1)
    sim.run()
    blocker = sim.add([50] * 8, max_tokens=2)  # with its growth, fills the pool
    sim.step()
    waiter = sim.add(list(range(9)) + [1], max_tokens=1).seqs[0]
    sim.step()  # it matches the cached prefix block but cannot get the rest: it gives it back
    assert waiter.status is Status.WAITING and not waiter.blocks
    sim.abort(waiter)
    assert waiter.blocks == []
    sim.check_blocks()
    sim.run()
    assert blocker.finished
    sim.check_done()


# -- random workloads -------------------------------------------------------------------------

def _random_sim(seed: int, prefix_caching: bool, tight: bool) -> Sim:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    prompts = [[rng.randrange(3) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 8))]
    max_tokens = [rng.randint(1, 8) for _ in prompts]
    biggest = max(-(-(len(p) + m) // bs) for p, m in zip(prompts, max_tokens))
    num_blocks = biggest + (rng.randint(0, 4) if tight else 200)
    sim = Sim(num_blocks, bs, max_num_seqs=rng.randint(1, 6),
              max_num_batched_tokens=rng.randint(1, 20), prefix_caching=prefix_caching)
    arrivals = sorted(rng.randrange(6) for _ in prompts)
    for step in range(max(arrivals) + 1):
        for p, m, t in zip(prompts, max_tokens, arrivals):
            if t == step:
                sim.add(p, m, n=1, best_of=rng.choice([1, 1, 2]))
        if sim.sched.has_work():
            sim.step()
    return sim


@pytest.mark.parametrize("seed", range(60))
def test_random_workload_under_block_pressure(seed):
    sim = _random_sim(seed, prefix_caching=False, tight=True)
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("seed", range(60))
def test_random_workload_under_block_pressure_with_prefix_caching(seed):
    sim = _random_sim(seed, prefix_caching=True, tight=True)
    sim.run()
    sim.check_done()


@pytest.mark.parametrize("seed", range(40))
def test_random_workload_with_shared_prefixes(seed):
    sim = _random_sim(seed, prefix_caching=True, tight=False)
    sim.run()
    sim.check_done()
    assert sim.preempted_total == 0


def test_waiting_sequences_never_hold_prefix_blocks_hostage():
    # Regression: a waiting head that matched cached blocks and could not allocate the rest kept
    # them, and with nothing running nobody could ever start.
    bm = BlockManager(5, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    ids = iter(range(100))

    def add(prompt, max_tokens):
        seq = Request(str(len(prompt)), prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                      None, next(ids)).seqs[0]
        sched.add(seq)
        return seq

    def step():
        out = sched.schedule()
        for it in out.scheduled:
            sched.computed(it)
            if it.samples:
                it.seq.append(0, 0.0, None)
                if it.seq.num_output_tokens == it.seq.request.params.max_tokens:
                    sched.finish(it.seq)
        return out

    add([1, 2, 3, 4, 5], 1); step()        # caches blocks [1,2] and [3,4]
    a = add([7, 7, 7, 7], 4); step()       # a: 2 blocks, later 4 (8 tokens); fits alone
    b = add([1, 2, 3, 4, 9], 1)            # b: 3 blocks; fits alone
    for _ in range(20):
        if not sched.has_work():
            break
        step()
    assert not sched.has_work(), (a.blocks, b.blocks, bm.num_free_blocks)
