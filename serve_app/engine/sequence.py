"""One choice's life inside the engine, and the typed messages in and out of it.

`EngineRequest` is what enters the engine: one choice of one client request (`ChoiceId`), its prompt token
ids and its `SamplingParams`. The scheduler moves the `Sequence` it becomes between the waiting and running
queues; the engine appends sampled tokens and decides when they stop. `RequestOutput` is what leaves the
engine after each step: only the new tokens, so a stream costs O(1) per token to forward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from serve_app.engine.sampling_params import SamplingParams


class ChoiceId(NamedTuple):
    """Choice `index` of client request `request_id`: one engine sequence, end to end (stage, replica,
    engine, and back). A named tuple: it is hashed and pickled for every token, and a tuple's hash and
    pickling run in C."""

    request_id: str
    index: int

    def __str__(self) -> str:
        return f"{self.request_id}#{self.index}"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token, or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the caller (client gone)


@dataclass(frozen=True)
class EngineRequest:
    """What the stage sends the replica group: one choice's already-tokenized prompt and its parameters."""

    choice: ChoiceId
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Sequence:
    choice: ChoiceId
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose keys/values are already in the cache. Reset to 0 on preemption: the sequence is then
    # recomputed from its prompt and the tokens it had already produced.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix caching: the chain hashes of this sequence's full blocks of tokens (a memo; tokens only grow),
    # and how many leading entries of `block_table` are registered in the cache or were taken from it.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    finish_reason: FinishReason | None = None
    # Prompt tokens the prefix cache held at the sequence's first admission (None until then). A resumed
    # sequence finds more cached (its own blocks), but that is the engine's saving, not the client's.
    num_cached_prompt_tokens: int | None = None
    # Only seeded requests own a generator, so their draws never depend on what else is in the batch.
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:  # decode steps: no copy of the whole history
            return self.output_token_ids[start - prompt_len:stop - prompt_len]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]


@dataclass(frozen=True)
class SampleLogprobs:
    """The log-probability of one sampled token and, when asked for, the best alternatives, by token id."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step (or several, coalesced by the replica) produced for one choice: new tokens only.

    `finish_reason` is set on the choice's last output, and only there; `num_cached_tokens` on its first,
    and only there: how many of its prompt tokens were not computed because the prefix cache held them when
    the choice was first admitted.
    """

    choice: ChoiceId
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[SampleLogprobs] | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
