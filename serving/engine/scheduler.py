"""Which sequences run this step and how many tokens of each (policy; blocks are the manager's).

One step mixes decodes and prefill chunks under a token budget. Running sequences go first
(in arrival order), so a decode is never starved by new prompts; then waiting ones are
admitted FCFS, their prompts chunked to fit the budget. When blocks run out, the most
recently arrived running sequence is preempted: its blocks are freed and it is recomputed
from its tokens later (nothing is lost: its tokens so far are kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.block_manager import BlockManager, block_hashes
from serving.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n, scheduled, out):
                if seq.status is not Status.RUNNING:  # it preempted itself
                    continue
                i += 1
                continue
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.prefix_checked:
                self._attach_prefix(seq)
            n = seq.num_uncomputed
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            need = self.blocks.blocks_needed(seq.num_computed + n) - len(seq.blocks)
            if not self.blocks.can_allocate(need):
                # Give back the cached blocks it matched: held by a waiting sequence they could
                # starve everyone (nothing running to free blocks, nothing able to start).
                self._detach_prefix(seq)
                break
            seq.blocks += self.blocks.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
        return out

    def _grow(self, seq: Sequence, n: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Makes room for n more tokens of a running seq, preempting the newest others."""
        need = self.blocks.blocks_needed(seq.num_computed + n) - len(seq.blocks)
        while not self.blocks.can_allocate(need):
            victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
            if victim is None:
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def _attach_prefix(self, seq: Sequence) -> None:
        seq.prefix_checked = True
        if seq.request.wants_prompt_logprobs:  # cached tokens would have no logprobs
            return
        blocks, hashes = self.blocks.match_prefix(seq.token_ids)
        seq.blocks, seq.block_hashes = blocks, hashes
        seq.num_computed = len(blocks) * self.blocks.block_size
        if seq.index == 0 and seq.num_preemptions == 0:
            seq.request.num_cached_tokens = seq.num_computed

    def _detach_prefix(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_hashes = [], []
        seq.num_computed = 0
        seq.prefix_checked = False

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._detach_prefix(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def computed(self, item: ScheduledSeq) -> None:
        """Records that the step computed this chunk; registers blocks it filled."""
        seq = item.seq
        seq.num_computed = item.start + item.num_tokens
        full = seq.num_computed // self.blocks.block_size
        if full > len(seq.block_hashes):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            new = block_hashes(seq.token_ids, self.blocks.block_size, full, len(seq.block_hashes), parent)
            for b, h in enumerate(new, start=len(seq.block_hashes)):
                self.blocks.register(seq.blocks[b], h)
            seq.block_hashes += new

    def finish(self, seq: Sequence) -> None:
        """Frees a finished or aborted sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.block_hashes = [], []
        seq.status = Status.FINISHED
