"""Per-request sampling parameters as the engine sees them.

The stage translates an OpenAI request into one `SamplingParams`; the engine turns a batch of them into
tensors inside each step (see `sampler.py`). Plain data, no torch, so it pickles cheaply across processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop, for one sequence.

    Token-level stop conditions (EOS, stop tokens, max_tokens, a complete grammar) are the engine's. Stop
    *strings* are matched on text: by the replica, which ends the choice in the engine at the token that
    completes one, and by the stage, which cuts the text there.
    """

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 means off
    min_p: float = 0.0  # [0, 1]; 0 means off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 means off
    seed: int | None = None  # a seeded request gets its own torch.Generator
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings
    ignore_eos: bool = False
    # What the output must match (structured outputs): a grammar in llguidance's Lark dialect, whose
    # `%json {...}` embeds a JSON Schema. Text, so it pickles as it is; the engine prepares a matcher from it.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
