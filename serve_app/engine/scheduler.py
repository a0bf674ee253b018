"""The scheduler: which sequences run in the next step, and how many tokens of each.

Iteration-level (continuous) batching: every step, running sequences continue first (one decode token each,
or the next chunk of a prompt still being prefilled), then waiting sequences are admitted while the step's
token budget, `max_num_seqs` and the free KV blocks allow. Long prompts are prefilled in chunks so running
streams keep flowing. When blocks run out, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later. Requests are never failed for lack
of memory.

Interface (vLLM's shape): `schedule()` → `SchedulerOutput`; the engine runs it; `update_from_output()`
appends the sampled tokens and returns what finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.sequence import ChoiceId, FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int  # sequences in the running batch
    max_num_batched_tokens: int  # tokens (prefill + decode) per step
    max_model_len: int  # prompt + output, per sequence


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at its position `start`, run in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the sequence's last token, so its logits give the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager, eos_token_ids: tuple[int, ...]):
        self.limits = limits
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last one is preempted first
        # Prefix caching at admission, since start: tokens of admitted sequences, and those found cached.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- queue management --------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, choice: ChoiceId) -> Sequence | None:
        """Drop a sequence wherever it is; its blocks are free when this returns."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.choice == choice:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORT)
                    return seq
        return None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens

        still_running: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_tokens <= 0:
                still_running.append(seq)  # budget spent: it waits for the next step, keeping its blocks
                continue
            target = seq.num_computed_tokens + num_tokens
            while not self.block_manager.can_grow(seq, target):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.grow(seq, target)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            still_running.append(seq)
            budget -= num_tokens
        self.running = still_running

        # Admitting new work in a step that had to preempt would only thrash the cache.
        while (not out.preempted and self.waiting and budget > 0
               and len(self.running) < self.limits.max_num_seqs):
            seq = self.waiting[0]
            cached = self.block_manager.reuse_cached_prefix(seq)  # its cached prefix is not computed again
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_tokens
            if not self.block_manager.can_grow(seq, target):
                # Admission is by free blocks, in arrival order: no overtaking. A waiting sequence holds no
                # blocks, so the cached ones it took go back (still cached) until it can be admitted.
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = cached
            self.block_manager.grow(seq, target)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: dict[ChoiceId, int],
                           grammar_completed: frozenset[ChoiceId] = frozenset()) -> list[Sequence]:
        """Record the step's progress and sampled tokens; return the sequences that finished.
        `grammar_completed`: sequences whose grammar the sampled token completed, which stop there."""
        finished: list[Sequence] = []
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_full_blocks(seq)
            if not chunk.samples:
                continue
            token = sampled[seq.choice]
            seq.output_token_ids.append(token)
            reason = FinishReason.STOP if seq.choice in grammar_completed else self._finish_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    # -- helpers -------------------------------------------------------------------------------------------

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.limits.max_model_len:
            return FinishReason.LENGTH
        return None

    def _preempt(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
