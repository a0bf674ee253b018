"""One request's life inside the engine: its tokens, its KV blocks, and why it finished.

The scheduler moves `Sequence`s between the waiting and running queues; the engine appends sampled tokens
and decides when they stop. `RequestOutput` is what leaves the engine after each step: only the new tokens,
so a stream costs O(1) per token to forward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from serve_app.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the caller (client gone, stop string matched)


@dataclass
class Sequence:
    request_id: str
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
    # Only seeded requests own a generator, so their draws never depend on what else is in the batch.
    generator: torch.Generator | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:  # decode steps: no copy of the whole history
            return self.output_token_ids[start - prompt_len:stop - prompt_len]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class EngineRequest:
    """What the stage sends the replica group: an already-tokenized prompt and its sampling parameters."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and, when asked for, the best alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens only."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
