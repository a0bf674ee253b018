"""The sampler: one step's logits in, one next token per sequence out, all on the logits' device.

`Sampler(logits, seqs)` is what the engine step calls: logits `[B, V]` (the last position of each of the B
sequences that sample this step) and those sequences in; their next token ids (and, where a row asked,
log-probs, and for rows with a grammar whether it is complete) out, on the host. It owns the per-sequence
sampling state (the `PenaltyTable`, and the `GrammarTable` of `grammar.py`), turns the rows' `SamplingParams`
into a `SamplingBatch` of tensors, runs `sample`, and copies to the host once.

`sample` is a chain of small pure tensor functions over the whole batch (gpt-fast style), in this order:

    grammar bitmask → logit_bias → repetition penalty → frequency/presence penalties   `process_logits`
    → greedy rows take the argmax here
    → temperature → top-k → top-p → softmax → min-p                     `sampling_probs`
    → exponential race: argmax(p / q) with q ~ Exp(1)                   `sample_from_probs`

A row whose parameter is off passes through that stage bit for bit unchanged, and a stage that no row uses
is skipped entirely. Which stages run is decided in `SamplingBatch.build` from the Python params, so the step
never syncs with the device to find out. The grammar bitmask (structured outputs) sets every token the row's
grammar does not allow to -inf, so no later stage can bring one back; a batch without a grammar row fills no
mask and touches no matcher.

Log-probs are the model's own: `log_softmax` of the logits as they came from the model, before the
grammar, bias, penalties, temperature and truncation. That is vLLM's default
(`logprobs_mode="raw_logprobs"`); OpenAI does not document which distribution it reports. The model's
distribution means the same thing whatever a request's sampling settings, and stays informative for greedy
rows, whose processed distribution would be a single token.

Penalty statistics (which tokens a sequence has seen, how often it produced each) live on the device in the
`PenaltyTable`, one slot per running sequence that uses a penalty: filled once from its token ids when it
first samples (or resumes after preemption), then updated with each sampled token, so a step never ships
token histories to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine.grammar import GrammarTable
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, SampleLogprobs, Sequence
from serve_app.layers.transfer import upload


@dataclass(frozen=True)
class SampledTokens:
    """One step's sampling result on the host: a token id per row and, for rows that asked, its log-probs.

    `grammar_completed`: the rows whose grammar this token completed (only EOS could follow), which finish;
    `grammar_failed`: rows whose grammar could not take their token, which cannot go on.
    """

    token_ids: list[int]
    logprobs: list[SampleLogprobs | None]
    grammar_completed: frozenset[ChoiceId] = frozenset()
    grammar_failed: frozenset[ChoiceId] = frozenset()


class Sampler:
    """Samples each step's next tokens, and keeps what sampling needs across steps: penalty statistics, and
    the grammar matchers of the sequences whose output is constrained."""

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.penalties = PenaltyTable(max_num_seqs, vocab_size, device)
        self.grammars = GrammarTable(max_num_seqs, vocab_size, device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
        """The next token of each sequence; `logits[i]` is the last position of `seqs[i]`. Every sequence
        with a grammar has its matcher (`start_grammar`)."""
        params = [seq.params for seq in seqs]
        slots = self.penalties.slots(seqs) if any(uses_penalties(p) for p in params) else None
        bitmask = self.grammars.fill(seqs) if any(p.grammar is not None for p in params) else None
        batch = SamplingBatch.build(params, [seq.generator for seq in seqs], logits.shape[-1], logits.device,
                                    self.penalties.stats(slots) if slots is not None else None, bitmask)
        result = sample(logits, batch)
        if slots is not None:
            self.penalties.record(slots, result.token_ids)
        token_ids = result.token_ids.tolist()  # the step's one copy to the host, unless log-probs were asked
        logprobs = _host_logprobs(params, token_ids, result)
        if bitmask is None:
            return SampledTokens(token_ids, logprobs)
        completed, failed = self.grammars.accept(seqs, token_ids)
        return SampledTokens(token_ids, logprobs, completed, failed)

    def start_grammar(self, choice: ChoiceId, template) -> None:
        """Give a sequence its grammar matcher, a copy of the prepared `template` (`GrammarCompiler`)."""
        self.grammars.add(choice, template)

    def preempt(self, choice: ChoiceId) -> None:
        """A sequence was preempted: its penalty statistics go (refilled from its tokens when it resumes); its
        matcher stays, since it resumes with the output tokens that matcher has consumed."""
        self.penalties.release(choice)

    def release(self, choice: ChoiceId) -> None:
        """Forget a sequence's state: it finished or was aborted."""
        self.penalties.release(choice)
        self.grammars.release(choice)


def _host_logprobs(params: list[SamplingParams], token_ids: list[int], result: SamplerOutput
                   ) -> list[SampleLogprobs | None]:
    if result.logprobs is None:
        return [None] * len(params)
    chosen = result.logprobs.tolist()
    top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
    top_values = result.top_logprob_values.tolist() if result.top_logprob_values is not None else None
    out: list[SampleLogprobs | None] = []
    for row, p in enumerate(params):
        if not p.logprobs:
            out.append(None)
            continue
        k = p.top_logprobs
        top = list(zip(top_ids[row][:k], top_values[row][:k])) if top_ids is not None and k else []
        out.append(SampleLogprobs(token_ids[row], chosen[row], top))
    return out


@dataclass(frozen=True, eq=False)  # eq on tensor fields would be elementwise, never a bool
class SamplingBatch:
    """Per-step sampling tensors for the B rows being sampled, all on the logits' device.

    A tensor field is None when no row in the batch uses that stage, and the stage is then skipped. Rows
    with the stage off carry its neutral value (temperature 1, top_k V, top_p 1, min_p 0, penalty 1 or 0).
    Greedy rows carry neutral sampling values: they take their argmax before temperature.
    """

    batch_size: int
    vocab_size: int
    all_greedy: bool
    token_bitmask: torch.Tensor | None  # int32 [G, ceil(V / 32)]: the grammar rows' allowed tokens
    token_bitmask_rows: torch.Tensor | None  # int64 [G]: which rows those are; None when G = B
    greedy: torch.Tensor | None  # bool [B]; set only when greedy and sampled rows are mixed
    logit_bias_index: torch.Tensor | None  # int64 [N]: row * V + token, one entry per (row, token) bias
    logit_bias_value: torch.Tensor | None  # float32 [N]
    repetition_penalty: torch.Tensor | None  # float32 [B]
    seen: torch.Tensor | None  # bool [B, V]: token occurs in the row's prompt or output
    frequency_penalty: torch.Tensor | None  # float32 [B]
    presence_penalty: torch.Tensor | None  # float32 [B]
    output_counts: torch.Tensor | None  # float32 [B, V]: occurrences of each token in the row's output
    temperature: torch.Tensor | None  # float32 [B]
    top_k: torch.Tensor | None  # int64 [B], in [1, V]
    max_top_k: int  # largest top_k among rows that use it
    top_p: torch.Tensor | None  # float32 [B]
    min_p: torch.Tensor | None  # float32 [B]
    seeded_rows: tuple[tuple[int, torch.Generator], ...]  # sampled rows that own a generator
    shared_noise: bool  # some sampled row has no generator and draws from the global one
    want_logprobs: bool
    num_top_logprobs: int  # K: the most top_logprobs any row asked for

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device, penalty_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
              token_bitmask: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> SamplingBatch:
        """Turn the rows' params into tensors on `device`.

        `generators[i]` is row i's own generator (on `device`) when its request has a seed, else None; the
        caller creates it once per request and keeps it across steps, so a seeded request draws the same
        tokens whatever else is in the batch. `penalty_stats` — `(seen [B, V] bool, output_counts [B, V]
        float32)`, from a `PenaltyTable` — is required when any row uses a penalty. `token_bitmask` —
        `(bitmask [G, ceil(V / 32)] int32, rows [G] int64 or None for all rows)`, from a `GrammarTable` — is
        required when any row has a grammar. Logit-bias token ids must lie inside the vocabulary (the engine
        refuses a request otherwise, before it reaches a step).
        """
        batch_size = len(params)
        assert len(generators) == batch_size

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return upload(values, dtype, device)

        sampled = [not p.greedy for p in params]
        # Sampling knobs only matter on sampled rows; greedy rows get the neutral value.
        temperatures = [p.temperature if s else 1.0 for p, s in zip(params, sampled, strict=True)]
        top_ks = [p.top_k if s and 0 < p.top_k < vocab_size else vocab_size
                  for p, s in zip(params, sampled, strict=True)]
        top_ps = [p.top_p if s else 1.0 for p, s in zip(params, sampled, strict=True)]
        min_ps = [p.min_p if s else 0.0 for p, s in zip(params, sampled, strict=True)]
        top_k_values = [k for k in top_ks if k < vocab_size]
        bias = [(row * vocab_size + token, value) for row, p in enumerate(params)
                for token, value in p.logit_bias.items()]
        repetition = any(p.repetition_penalty != 1.0 for p in params)
        counting = any(p.frequency_penalty or p.presence_penalty for p in params)
        assert penalty_stats is not None or not (repetition or counting), "penalties need a PenaltyTable"
        grammar = any(p.grammar is not None for p in params)
        assert (token_bitmask is not None) == grammar, "grammar rows need a token bitmask, and only they"

        all_greedy = not any(sampled)
        mixed = not all_greedy and not all(sampled)
        return cls(
            batch_size=batch_size,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            token_bitmask=token_bitmask[0] if token_bitmask is not None else None,
            token_bitmask_rows=token_bitmask[1] if token_bitmask is not None else None,
            greedy=per_row([not s for s in sampled], torch.bool) if mixed else None,
            logit_bias_index=per_row([index for index, _ in bias], torch.int64) if bias else None,
            logit_bias_value=per_row([value for _, value in bias], torch.float32) if bias else None,
            repetition_penalty=(per_row([p.repetition_penalty for p in params], torch.float32)
                                if repetition else None),
            seen=penalty_stats[0] if repetition else None,
            frequency_penalty=per_row([p.frequency_penalty for p in params], torch.float32) if counting else None,
            presence_penalty=per_row([p.presence_penalty for p in params], torch.float32) if counting else None,
            output_counts=penalty_stats[1] if counting else None,
            temperature=per_row(temperatures, torch.float32) if any(t != 1.0 for t in temperatures) else None,
            top_k=per_row(top_ks, torch.int64) if top_k_values else None,
            max_top_k=max(top_k_values, default=0),
            top_p=per_row(top_ps, torch.float32) if any(p < 1.0 for p in top_ps) else None,
            min_p=per_row(min_ps, torch.float32) if any(p > 0.0 for p in min_ps) else None,
            seeded_rows=tuple((i, g) for i, (g, s) in enumerate(zip(generators, sampled, strict=True))
                              if s and g is not None),
            shared_noise=any(s and g is None for g, s in zip(generators, sampled, strict=True)),
            want_logprobs=any(p.logprobs or p.top_logprobs > 0 for p in params),
            num_top_logprobs=min(max((p.top_logprobs for p in params), default=0), vocab_size),
        )


class PenaltyTable:
    """Per-sequence penalty statistics kept on the device and updated with each sampled token.

    Slot 0 is all zeros and stands for every row that uses no penalty (any statistics are neutral for such a
    row). Other slots belong to running sequences that use a penalty; `release` frees one when its sequence
    finishes, is aborted or is preempted (a resumed sequence is filled again from its token ids).
    """

    def __init__(self, capacity: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.seen = torch.zeros((capacity + 1, vocab_size), dtype=torch.bool, device=device)
        self.output_counts = torch.zeros((capacity + 1, vocab_size), dtype=torch.float32, device=device)
        self._free = list(range(capacity, 0, -1))
        self._slots: dict[ChoiceId, int] = {}

    @property
    def num_held(self) -> int:
        return len(self._slots)

    def slots(self, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's slot (0 for rows without penalties), filling new slots from their token ids."""
        slots = []
        for seq in seqs:
            if not uses_penalties(seq.params):
                slots.append(0)
                continue
            slot = self._slots.get(seq.choice)
            if slot is None:
                slot = self._slots[seq.choice] = self._free.pop()
                device = self.seen.device
                seen = upload(seq.prompt_token_ids + seq.output_token_ids, torch.int64, device)
                self.seen[slot, seen] = True
                if seq.output_token_ids:
                    output = upload(seq.output_token_ids, torch.int64, device)
                    self.output_counts[slot] = torch.bincount(output, minlength=self.vocab_size).float()
            slots.append(slot)
        return upload(slots, torch.int64, self.seen.device)

    def stats(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seen[slots], self.output_counts[slots]

    def record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add this step's sampled tokens; rows in slot 0 are left out so it stays all zeros."""
        # Every row writes, slot 0's rows included, and slot 0 is cleared after: selecting the rows that use
        # a penalty with a mask would need their count on the host, a device sync.
        self.seen[slots, token_ids] = True
        self.seen[0] = False
        self.output_counts.index_put_((slots, token_ids), (slots > 0).float(), accumulate=True)

    def release(self, choice: ChoiceId) -> None:
        slot = self._slots.pop(choice, None)
        if slot is not None:
            self.seen[slot] = False
            self.output_counts[slot] = 0.0
            self._free.append(slot)


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


@dataclass(frozen=True, eq=False)
class SamplerOutput:
    """What one step's sampling hands back, still on the device.

    Log-probs are of the model's raw distribution (see the module docstring). `logprobs` is None when no
    row asked for log-probs; the top-logprob pair is None when no row asked for any top_logprobs, and
    otherwise `[B, K]` with K the largest top_logprobs in the batch, best first: a row that asked for fewer
    reads its first top_logprobs columns.
    """

    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: log-prob of the chosen token
    top_logprob_ids: torch.Tensor | None  # int64 [B, K]
    top_logprob_values: torch.Tensor | None  # float32 [B, K]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None
                        ) -> torch.Tensor:
    """Set to -inf every logit of row `rows[g]` (every row, when `rows` is None) whose bit in `bitmask[g]` is
    0: bit j of word k stands for token 32k + j, as llguidance and xgrammar write it. Other logits are
    unchanged.

    The words are split into bytes with shifts (whatever the machine's byte order), and each byte looks up its
    eight 0 / -inf addends in a 256-row table: one gather and one add, cheaper on the CPU than testing every
    bit of the vocabulary.
    """
    device = logits.device
    bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    addends = torch.zeros(bits.shape, device=device).masked_fill_(bits == 0, float("-inf"))  # [256, 8]
    byte_shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=device)
    byte_values = (bitmask.unsqueeze(-1) >> byte_shifts) & 255
    penalty = addends.index_select(0, byte_values.flatten().long()).view(bitmask.shape[0], -1)
    penalty = penalty[:, :logits.shape[-1]]
    return logits + penalty if rows is None else logits.index_add(0, rows, penalty)


def apply_logit_bias(logits: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Add `value[n]` to the logit at flat position `index[n]` (row * V + token); nothing else changes."""
    return logits.reshape(-1).index_add(0, index, value).view_as(logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty on seen tokens: divide positive logits by the penalty, multiply negative.

    Scaling toward zero from both sides is what makes a penalty > 1 always make a token less likely.
    """
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                                       presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's additive penalties on generated tokens.

    `logit -= count * frequency + (count > 0) * presence`, with count the token's occurrences in the output.
    """
    # clamp(max=1) is (count > 0) for counts, without a bool tensor to convert.
    return logits - (counts * frequency[:, None] + counts.clamp(max=1) * presence[:, None])


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature[:, None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit below the row's cutoff: the k-th best logit, then the nucleus edge.

    top-k keeps the tokens at least as large as the k-th largest logit (ties at the edge all stay). top-p then
    keeps, of what top-k left, the smallest best-first set whose probability reaches top_p, which always
    includes the best token; its cutoff is the logit of the last token of that set, so ties stay there too.
    Off rows (top_k = V, top_p = 1) get a cutoff no logit is below.
    """
    vocab_size = logits.shape[-1]
    if top_p is None:
        assert top_k is not None
        # Without top-p, the best max_top_k logits are all that is needed: cheaper than a full sort.
        best = logits.topk(max_top_k, dim=-1).values
        kth = best.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])
        cutoff = torch.where((top_k < vocab_size)[:, None], kth, float("-inf"))
        return logits.masked_fill(logits < cutoff, float("-inf"))

    ordered = logits.sort(dim=-1, descending=True).values
    cutoff = torch.full_like(ordered[:, :1], float("-inf"))
    if top_k is not None:
        cutoff = ordered.gather(1, (top_k - 1)[:, None])
        ordered = ordered.masked_fill(ordered < cutoff, float("-inf"))
    mass = ordered.softmax(dim=-1).cumsum(dim=-1)
    # The nucleus is every token before the running mass reaches top_p, plus the one that reaches it. The
    # running mass never decreases, so a binary search counts the first part.
    size = (torch.searchsorted(mass, top_p[:, None]) + 1).clamp(max=vocab_size)
    # A row with top_p = 1 must keep everything even where the float32 sum reaches 1 before the tail.
    nucleus_cutoff = torch.where(top_p[:, None] < 1.0, ordered.gather(1, size - 1), float("-inf"))
    cutoff = torch.maximum(cutoff, nucleus_cutoff)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens less likely than min_p times the row's most likely token (left unnormalised)."""
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Grammar, bias and penalties: the logits greedy rows take their argmax of, and sampled rows start
    from."""
    if batch.token_bitmask is not None:
        logits = apply_token_bitmask(logits, batch.token_bitmask, batch.token_bitmask_rows)
    if batch.logit_bias_index is not None:
        logits = apply_logit_bias(logits, batch.logit_bias_index, batch.logit_bias_value)
    if batch.seen is not None:
        logits = apply_repetition_penalty(logits, batch.seen, batch.repetition_penalty)
    if batch.output_counts is not None:
        logits = apply_frequency_presence_penalties(logits, batch.output_counts, batch.frequency_penalty,
                                                    batch.presence_penalty)
    return logits


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution sampled rows draw from, up to a factor per row (min-p leaves it unnormalised)."""
    if batch.temperature is not None:
        logits = apply_temperature(logits, batch.temperature)
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        probs = apply_min_p(probs, batch.min_p)
    return probs


def sample_from_probs(probs: torch.Tensor, seeded_rows: tuple[tuple[int, torch.Generator], ...],
                      shared_noise: bool) -> torch.Tensor:
    """One token per row, drawn with probability proportional to `probs`, by the exponential race.

    argmax(p / q) with q ~ Exp(1) i.i.d. picks token i with probability p_i / sum(p) (Gumbel-max in another
    form): no normalising, no cumsum, and each row's draw uses only its own row of noise. A seeded row's
    noise comes from its own generator alone, so its tokens do not depend on the rest of the batch; the
    other rows share one draw from the global generator. Rows with neither (greedy rows in a batch whose
    sampled rows are all seeded) race against uninitialised noise, and the caller discards their result.
    """
    noise = torch.empty_like(probs)
    if shared_noise:
        noise.uniform_()
    for row, generator in seeded_rows:
        noise[row].uniform_(generator=generator)
    # -log(U) is Exp(1), and on the CPU uniform_ + log is about five times faster than exponential_. U lies
    # in [0, 1), so q is never 0 (no 0/0, and a zero-probability token never wins); U = 0 makes q infinite,
    # which only takes one token out of one draw, a 2^-24 event.
    noise.log_().neg_()
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one next token per row of `logits` `[B, V]` (any float dtype; worked on in float32).

    Greedy rows get exactly `argmax` of their biased and penalised logits (ties to the lowest id). The
    caller's logits are not modified.
    """
    assert logits.shape == (batch.batch_size, batch.vocab_size), (logits.shape, batch.batch_size,
                                                                   batch.vocab_size)
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if batch.want_logprobs else None
    logits = process_logits(logits, batch)
    if batch.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = sample_from_probs(sampling_probs(logits, batch), batch.seeded_rows, batch.shared_noise)
        if batch.greedy is not None:
            token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), token_ids)

    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if batch.num_top_logprobs == 0:
        return SamplerOutput(token_ids, chosen, None, None)
    top = raw_logprobs.topk(batch.num_top_logprobs, dim=-1)
    return SamplerOutput(token_ids, chosen, top.indices, top.values)
