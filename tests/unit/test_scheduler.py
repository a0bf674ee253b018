"""The scheduler without a model: what it records of the prefix cache when a sequence is admitted."""

from __future__ import annotations

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import Scheduler, SchedulerLimits
from serve_app.engine.sequence import ChoiceId, Sequence, SequenceStatus


def _step(scheduler: Scheduler) -> list[Sequence]:
    """One step with a stand-in for the model: every sampling sequence gets token 5; the preempted return."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, {chunk.seq.choice: 5 for chunk in out.chunks if chunk.samples})
    return out.preempted


def _seq(name: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(ChoiceId(name, 0), prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_a_preempted_sequence_keeps_the_cached_prompt_tokens_of_its_first_admission():
    # 6 blocks of 16 tokens: `short` and `resumed` fill them, and `short`'s growth preempts `resumed`.
    scheduler = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=96),
                          BlockManager(num_blocks=6, block_size=16), eos_token_ids=(2,))
    prompt = list(range(100, 140))  # 40 tokens: two full blocks
    first = _seq("first", prompt, max_tokens=1)
    scheduler.add(first)
    while scheduler.has_unfinished():
        _step(scheduler)
    assert first.num_cached_prompt_tokens == 0

    short = _seq("short", list(range(1000, 1020)), max_tokens=14)
    resumed = _seq("resumed", prompt + list(range(300, 310)), max_tokens=30)
    scheduler.add(short)
    scheduler.add(resumed)
    preempted, readmitted_hits = [], 0
    while scheduler.has_unfinished():
        waiting_before, hits_before = resumed.status is SequenceStatus.WAITING, scheduler.prefix_hit_tokens
        preempted += _step(scheduler)
        if preempted and waiting_before and resumed.status is SequenceStatus.RUNNING:
            readmitted_hits = scheduler.prefix_hit_tokens - hits_before
    assert preempted == [resumed] and len(resumed.output_token_ids) == 30
    # Back from preemption it found its own blocks, prompt and answer (48 tokens); the client's prompt got
    # the two blocks `first` left, and that stays what the sequence reports.
    assert readmitted_hits == 48
    assert resumed.num_cached_prompt_tokens == 32 and short.num_cached_prompt_tokens == 0
