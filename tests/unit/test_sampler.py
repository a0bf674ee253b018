"""Unit tests for the sampler (`serve_app/engine/sampler.py`), on the CPU and without Ray.

Each stage is checked against a plain float64 reference written here, on logits that hypothesis draws; the
sampled frequencies against the intended distribution with a chi-square test (fixed seeds, so the verdict
never changes from run to run); and the promises the engine relies on: greedy is argmax, a seeded request
draws the same tokens whatever its batch, rows with a stage off are untouched bit for bit, log-probs are the
raw model's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from serve_app.engine.sampler import (
    PenaltyTable,
    SamplingBatch,
    apply_token_bitmask,
    apply_top_k_top_p,
    process_logits,
    sample,
    sampling_probs,
    uses_penalties,
)
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, Sequence

CPU = torch.device("cpu")
# Derandomized so CI sees the same examples every run; few examples because each is a whole batch.
EXAMPLES = settings(derandomize=True, max_examples=60, deadline=None)
# float32 and float64 can disagree on which side of a top-p / min-p edge a token falls when it sits this
# close to it; such examples say nothing about the sampler, so they are skipped.
EDGE = 1e-4


# -- float64 reference ---------------------------------------------------------------------------------------


def ref_process(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """Bias, then repetition penalty over prompt + output, then OpenAI penalties over output."""
    out = logits.astype(np.float64)
    for token, bias in p.logit_bias.items():
        out[token] += bias
    if p.repetition_penalty != 1.0:
        for token in set(prompt) | set(output):
            r = p.repetition_penalty
            out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token, count in Counter(output).items():
        out[token] -= count * p.frequency_penalty + p.presence_penalty
    return out


def ref_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def ref_top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    if k == 0 or k >= logits.size:
        return np.ones(logits.size, dtype=bool)
    return logits >= np.sort(logits)[::-1][k - 1]


def ref_top_p_mask(logits: np.ndarray, top_p: float) -> tuple[np.ndarray, float]:
    """Keep mask, and how far the running mass came to top_p (the distance float error could cross)."""
    if top_p >= 1.0:
        return np.ones(logits.size, dtype=bool), np.inf
    order = np.argsort(-logits, kind="stable")
    mass = np.cumsum(ref_softmax(logits)[order])
    size = min(1 + int((mass < top_p).sum()), logits.size)
    return logits >= logits[order][size - 1], float(np.abs(mass - top_p).min())


def ref_distribution(logits: np.ndarray, p: SamplingParams, prompt: list[int],
                     output: list[int]) -> tuple[np.ndarray, float]:
    """The distribution a row should draw from, and its distance to the nearest top-p / min-p edge."""
    processed = ref_process(logits, p, prompt, output)
    if p.greedy:
        return np.eye(logits.size)[int(np.argmax(processed))], np.inf
    scaled = processed / p.temperature
    scaled = np.where(ref_top_k_mask(scaled, p.top_k), scaled, -np.inf)
    keep, edge = ref_top_p_mask(scaled, p.top_p)
    probs = ref_softmax(np.where(keep, scaled, -np.inf))
    if p.min_p > 0:
        threshold = p.min_p * probs.max()
        edge = min(edge, float(np.abs(probs - threshold).min() / probs.max()))
        probs = np.where(probs >= threshold, probs, 0.0)
    return probs / probs.sum(), edge


# -- helpers -------------------------------------------------------------------------------------------------


def build(params: list[SamplingParams], vocab_size: int, prompts: list[list[int]] | None = None,
          outputs: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None,
          token_bitmask: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> SamplingBatch:
    """The batch the engine's `Sampler` builds for rows with these token histories: penalty statistics from a
    `PenaltyTable` filled from them, as for sequences sampling for the first time."""
    empty: list[list[int]] = [[] for _ in params]
    prompts, outputs = prompts or empty, outputs or empty
    stats = None
    if any(uses_penalties(p) for p in params):
        table = PenaltyTable(len(params), vocab_size, CPU)
        seqs = [Sequence(ChoiceId("row", i), list(prompt), p, output_token_ids=list(output))
                for i, (p, prompt, output) in enumerate(zip(params, prompts, outputs, strict=True))]
        stats = table.stats(table.slots(seqs))
    return SamplingBatch.build(params, generators or [None] * len(params), vocab_size, CPU, stats,
                               token_bitmask)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(CPU).manual_seed(seed)


@st.composite
def logit_matrices(draw: st.DrawFn, max_rows: int = 5, max_vocab: int = 40) -> np.ndarray:
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    values = draw(st.lists(st.floats(-30, 30, width=32), min_size=rows * vocab, max_size=rows * vocab))
    return np.array(values, dtype=np.float32).reshape(rows, vocab)


def token_lists(vocab: int, rows: int) -> st.SearchStrategy[list[list[int]]]:
    return st.lists(st.lists(st.integers(0, vocab - 1), max_size=12), min_size=rows, max_size=rows)


def assert_off_rows_untouched(before: torch.Tensor, after: torch.Tensor, off: list[bool]) -> None:
    for row, is_off in enumerate(off):
        if is_off:
            assert torch.equal(before[row], after[row]), f"row {row} has the stage off but changed"


# -- each stage against the reference ------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_logit_bias_matches_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    biases = data.draw(st.lists(st.dictionaries(st.integers(0, vocab - 1), st.floats(-100, 100, width=32),
                                                max_size=4), min_size=rows, max_size=rows))
    params = [SamplingParams(max_tokens=1, logit_bias=b) for b in biases]
    before = torch.from_numpy(logits)
    after = process_logits(before, build(params, vocab))
    for row, p in enumerate(params):
        expected = ref_process(logits[row], p, [], [])
        np.testing.assert_allclose(after[row].numpy(), expected, rtol=1e-6, atol=1e-5)
    assert_off_rows_untouched(before, after, [not b for b in biases])


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_repetition_penalty_matches_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    penalties = data.draw(st.lists(st.sampled_from([1.0, 0.5, 1.1, 1.3, 2.0]), min_size=rows, max_size=rows))
    prompts, outputs = data.draw(token_lists(vocab, rows)), data.draw(token_lists(vocab, rows))
    params = [SamplingParams(max_tokens=1, repetition_penalty=r) for r in penalties]
    before = torch.from_numpy(logits)
    after = process_logits(before, build(params, vocab, prompts, outputs))
    for row, p in enumerate(params):
        expected = ref_process(logits[row], p, prompts[row], outputs[row])
        np.testing.assert_allclose(after[row].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert_off_rows_untouched(before, after, [r == 1.0 for r in penalties])


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_frequency_and_presence_penalties_match_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    penalty = st.sampled_from([0.0, 0.0, -1.5, 0.25, 2.0])
    freq = data.draw(st.lists(penalty, min_size=rows, max_size=rows))
    pres = data.draw(st.lists(penalty, min_size=rows, max_size=rows))
    prompts, outputs = data.draw(token_lists(vocab, rows)), data.draw(token_lists(vocab, rows))
    params = [SamplingParams(max_tokens=1, frequency_penalty=f, presence_penalty=p)
              for f, p in zip(freq, pres, strict=True)]
    before = torch.from_numpy(logits)
    after = process_logits(before, build(params, vocab, prompts, outputs))
    for row, p in enumerate(params):
        # The prompt does not count: only generated tokens are penalised.
        expected = ref_process(logits[row], p, prompts[row], outputs[row])
        np.testing.assert_allclose(after[row].numpy(), expected, rtol=1e-6, atol=1e-4)
    assert_off_rows_untouched(before, after, [f == 0 and p == 0 for f, p in zip(freq, pres, strict=True)])


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_temperature_matches_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    temperatures = data.draw(st.lists(st.sampled_from([1.0, 0.05, 0.7, 1.5]), min_size=rows, max_size=rows))
    params = [SamplingParams(max_tokens=1, temperature=t) for t in temperatures]
    before = torch.from_numpy(logits)
    probs = sampling_probs(before, build(params, vocab))
    for row, t in enumerate(temperatures):
        np.testing.assert_allclose(probs[row].numpy(), ref_softmax(logits[row] / t), rtol=1e-4, atol=1e-6)
        if t == 1.0:
            assert torch.equal(probs[row], before[row].softmax(-1))


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_top_k_top_p_keep_exactly_the_reference_set(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    top_ks = data.draw(st.lists(st.integers(0, vocab + 2), min_size=rows, max_size=rows))
    top_ps = data.draw(st.lists(st.sampled_from([1.0, 0.05, 0.5, 0.9, 0.99]), min_size=rows, max_size=rows))
    for row, (k, p) in enumerate(zip(top_ks, top_ps, strict=True)):
        masked = np.where(ref_top_k_mask(logits[row].astype(np.float64), k), logits[row], -np.inf)
        assume(ref_top_p_mask(masked, p)[1] > EDGE)
    params = [SamplingParams(max_tokens=1, top_k=k, top_p=p) for k, p in zip(top_ks, top_ps, strict=True)]
    batch = build(params, vocab)
    before = torch.from_numpy(logits)
    if batch.top_k is None and batch.top_p is None:
        return  # nothing on: the stage is skipped, which test_cheap_path_skips_every_stage covers
    after = apply_top_k_top_p(before, batch.top_k, batch.max_top_k, batch.top_p)
    for row, (k, p) in enumerate(zip(top_ks, top_ps, strict=True)):
        keep = ref_top_k_mask(logits[row].astype(np.float64), k)
        keep &= ref_top_p_mask(np.where(keep, logits[row], -np.inf), p)[0]
        np.testing.assert_array_equal(torch.isfinite(after[row]).numpy(), keep)
        assert torch.equal(after[row][keep], before[row][keep])  # survivors are untouched
    assert_off_rows_untouched(before, after, [(k == 0 or k >= vocab) and p == 1.0
                                              for k, p in zip(top_ks, top_ps, strict=True)])


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, [0]), (0.51, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p: float, kept: list[int]) -> None:
    """Probabilities 1/2, 1/4, 1/8, 1/8 are exact in float32, so the edge cases are exact too: a set whose
    mass equals top_p is enough, and a tie at the edge keeps both tokens."""
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    batch = build([SamplingParams(max_tokens=1, top_p=top_p)], 4)
    after = apply_top_k_top_p(logits, batch.top_k, batch.max_top_k, batch.top_p)
    assert torch.isfinite(after[0]).nonzero().flatten().tolist() == kept


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_min_p_matches_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    min_ps = data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.2, 0.9, 1.0]), min_size=rows, max_size=rows))
    params = [SamplingParams(max_tokens=1, min_p=m) for m in min_ps]
    expected = []
    for row, p in enumerate(params):
        probs, edge = ref_distribution(logits[row], p, [], [])
        assume(edge > EDGE)
        expected.append(probs)
    before = torch.from_numpy(logits)
    probs = sampling_probs(before, build(params, vocab))
    for row, m in enumerate(min_ps):
        got = probs[row].double().numpy()
        np.testing.assert_array_equal(got > 0, expected[row] > 0)
        np.testing.assert_allclose(got / got.sum(), expected[row], rtol=1e-4, atol=1e-6)
        if m == 0.0:
            assert torch.equal(probs[row], before[row].softmax(-1))


@st.composite
def sampling_params(draw: st.DrawFn, vocab: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=1,
        temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, 1, 3, vocab // 2])),
        top_p=draw(st.sampled_from([1.0, 0.3, 0.8])),
        min_p=draw(st.sampled_from([0.0, 0.05, 0.3])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.5, -0.75])),
        presence_penalty=draw(st.sampled_from([0.0, 1.0])),
        logit_bias=draw(st.dictionaries(st.integers(0, vocab - 1),
                                        st.sampled_from([-100.0, -2.5, 3.0, 100.0]), max_size=2)),
    )


@EXAMPLES
@given(data=st.data())
def test_whole_pipeline_matches_reference(data: st.DataObject) -> None:
    """All stages together, in order; logits on a coarse grid, so that float32 makes no ties float64 lacks."""
    rows, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(4, 24))
    grid = data.draw(st.lists(st.integers(-40, 40), min_size=rows * vocab, max_size=rows * vocab))
    logits = np.array(grid, dtype=np.float32).reshape(rows, vocab) / 4
    params = [data.draw(sampling_params(vocab)) for _ in range(rows)]
    prompts, outputs = data.draw(token_lists(vocab, rows)), data.draw(token_lists(vocab, rows))
    expected = []
    for row, p in enumerate(params):
        probs, edge = ref_distribution(logits[row], p, prompts[row], outputs[row])
        assume(edge > EDGE)
        expected.append(probs)
    batch = build(params, vocab, prompts, outputs)
    processed = process_logits(torch.from_numpy(logits), batch)
    probs = sampling_probs(processed, batch)
    for row, p in enumerate(params):
        if p.greedy:
            assert int(processed[row].argmax()) == int(np.argmax(expected[row]))
        else:
            got = probs[row].double().numpy()
            np.testing.assert_allclose(got / got.sum(), expected[row], rtol=1e-4, atol=1e-6)


# -- sampled frequencies -------------------------------------------------------------------------------------

CHI_LOGITS = np.random.default_rng(0).normal(0.0, 1.5, size=12).astype(np.float32)
CHI_CASES = {
    "temperature": SamplingParams(max_tokens=1, temperature=0.7),
    "top_k": SamplingParams(max_tokens=1, top_k=4),
    "top_p": SamplingParams(max_tokens=1, top_p=0.75),
    "min_p": SamplingParams(max_tokens=1, min_p=0.15),
    "all": SamplingParams(max_tokens=1, temperature=1.3, top_k=8, top_p=0.9, min_p=0.05,
                          repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.2,
                          logit_bias={3: 1.5, 5: -100.0}),
}
CHI_PROMPT, CHI_OUTPUT = [0, 1, 2], [2, 4, 4]
DRAWS = 6000


def assert_fits(tokens: list[int], expected: np.ndarray) -> None:
    observed = np.bincount(tokens, minlength=expected.size)
    support = expected > 0
    assert observed[~support].sum() == 0, f"drew tokens outside the support: {observed}"
    assert (expected[support] * len(tokens) >= 5).all(), "test design: too few expected draws per cell"
    assert support.sum() >= 2, "test design: a one-token support says nothing"
    result = chisquare(observed[support], expected[support] * len(tokens))
    assert result.pvalue > 1e-3, (result, observed, expected * len(tokens))


@pytest.mark.parametrize("case", CHI_CASES)
def test_sampled_frequencies_fit_intended_distribution(case: str) -> None:
    """Many identical rows in one step: the unseeded rows share the global generator's draw."""
    p = CHI_CASES[case]
    expected, edge = ref_distribution(CHI_LOGITS, p, CHI_PROMPT, CHI_OUTPUT)
    assert edge > EDGE, "test design: float32 could put a token on the other side of an edge"
    batch = build([p] * DRAWS, CHI_LOGITS.size, [CHI_PROMPT] * DRAWS, [CHI_OUTPUT] * DRAWS)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        tokens = sample(torch.from_numpy(CHI_LOGITS).expand(DRAWS, -1), batch).token_ids
    assert_fits(tokens.tolist(), expected)


def test_seeded_row_frequencies_fit_over_steps() -> None:
    """One seeded request over many steps, its generator carried from step to step as the engine does."""
    p = CHI_CASES["all"]
    expected, edge = ref_distribution(CHI_LOGITS, p, CHI_PROMPT, CHI_OUTPUT)
    assert edge > EDGE, "test design: float32 could put a token on the other side of an edge"
    logits = torch.from_numpy(CHI_LOGITS)[None]
    # The same history every step, so one batch serves them all; its generator advances with each draw.
    batch = build([p], CHI_LOGITS.size, [CHI_PROMPT], [CHI_OUTPUT], [seeded(99)])
    tokens = [int(sample(logits, batch).token_ids) for _ in range(2000)]
    assert_fits(tokens, expected)


# -- greedy, seeding, log-probs, bias ------------------------------------------------------------------------


@EXAMPLES
@given(data=st.data(), logits=logit_matrices())
def test_greedy_rows_return_argmax_of_processed_logits(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    params = [data.draw(sampling_params(vocab)) for _ in range(rows)]
    prompts, outputs = data.draw(token_lists(vocab, rows)), data.draw(token_lists(vocab, rows))
    generators = [seeded(row) if data.draw(st.booleans()) else None for row in range(rows)]
    batch = build(params, vocab, prompts, outputs, generators)
    before = torch.from_numpy(logits)
    tokens = sample(before, batch).token_ids
    processed = process_logits(before, batch)
    for row, p in enumerate(params):
        if p.greedy:
            assert int(tokens[row]) == int(torch.argmax(processed[row]))
    assert torch.equal(before, torch.from_numpy(logits)), "the caller's logits were modified"


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    tokens = sample(logits, build([SamplingParams(max_tokens=1, temperature=0.0)] * 2, 4)).token_ids
    assert tokens.tolist() == [1, 0]


@EXAMPLES
@given(data=st.data(), logits=logit_matrices(max_rows=6))
def test_top_k_of_one_equals_greedy(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    for row in logits:
        assume((row == row.max()).sum() == 1)  # with a tie at the top, top_k=1 may pick either
    params = [SamplingParams(max_tokens=1, top_k=1, temperature=data.draw(st.sampled_from([0.3, 1.0, 2.0])),
                             top_p=data.draw(st.sampled_from([1.0, 0.5])),
                             min_p=data.draw(st.sampled_from([0.0, 0.5]))) for _ in range(rows)]
    tokens = sample(torch.from_numpy(logits), build(params, vocab)).token_ids
    assert tokens.tolist() == logits.argmax(axis=1).tolist()


def run_steps(target_at: int, batch_size: int, steps: int = 20, vocab: int = 64) -> list[int]:
    """The tokens a seeded request draws over `steps` steps, sitting at row `target_at` of a batch whose
    other rows (greedy, unseeded, seeded with other seeds) get random logits of their own."""
    target = SamplingParams(max_tokens=steps, temperature=0.9, top_k=20, top_p=0.95, min_p=0.01,
                            repetition_penalty=1.1, frequency_penalty=0.3, seed=42)
    others = [SamplingParams(max_tokens=steps),
              SamplingParams(max_tokens=steps, temperature=0.0),
              SamplingParams(max_tokens=steps, temperature=1.2, top_p=0.5, seed=7),
              SamplingParams(max_tokens=steps, top_k=3, presence_penalty=1.0, seed=8)]
    params = [others[row % len(others)] for row in range(batch_size - 1)]
    params.insert(target_at, target)
    generators = [seeded(p.seed) if p.seed is not None else None for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    noise = torch.Generator().manual_seed(batch_size)  # the other rows' logits differ between layouts
    for step in range(steps):
        logits = torch.randn(batch_size, vocab, generator=noise) * 3
        # The target sees the same logits in every layout, as the same request would.
        logits[target_at] = torch.randn(vocab, generator=seeded(1000 + step)) * 2
        batch = build(params, vocab, [[1, 2, 3]] * batch_size, outputs, generators)
        for row, token in enumerate(sample(logits, batch).token_ids.tolist()):
            outputs[row].append(token)
    return outputs[target_at]


def test_seeded_request_draws_the_same_tokens_in_any_batch() -> None:
    alone = run_steps(target_at=0, batch_size=1)
    with torch.random.fork_rng():
        torch.manual_seed(5)  # the global generator the unseeded rows draw from is in another state
        batched = run_steps(target_at=3, batch_size=8)
    assert batched == alone
    assert run_steps(target_at=7, batch_size=8) == alone
    assert len(set(alone)) > 3, "test design: the target should actually sample"


@EXAMPLES
@given(data=st.data(), logits=logit_matrices(max_rows=6))
def test_logprobs_are_the_raw_models(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    params = [SamplingParams(max_tokens=1, temperature=data.draw(st.sampled_from([0.0, 0.8])),
                             top_p=data.draw(st.sampled_from([1.0, 0.7])),
                             logit_bias=data.draw(st.sampled_from([{}, {0: 5.0}])),
                             logprobs=data.draw(st.booleans()), top_logprobs=data.draw(st.integers(0, 5)))
              for _ in range(rows)]
    out = sample(torch.from_numpy(logits), build(params, vocab))
    if not any(p.logprobs or p.top_logprobs for p in params):
        assert out.logprobs is None and out.top_logprob_ids is None
        return
    raw = torch.from_numpy(logits).log_softmax(-1)
    assert torch.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    k = min(max(p.top_logprobs for p in params), vocab)
    if k == 0:
        assert out.top_logprob_ids is None and out.top_logprob_values is None
        return
    assert out.top_logprob_ids.shape == out.top_logprob_values.shape == (rows, k)
    assert torch.equal(out.top_logprob_values, raw.gather(1, out.top_logprob_ids))
    assert (out.top_logprob_values[:, :-1] >= out.top_logprob_values[:, 1:]).all()
    for row, p in enumerate(params):
        if p.greedy and not p.logit_bias:
            assert out.top_logprob_values[row, 0] == out.logprobs[row]  # the greedy token heads the list


def test_logit_bias_of_100_forces_and_bans_tokens() -> None:
    vocab, rows = 50, 2000
    logits = torch.randn(vocab, generator=seeded(3)) * 2
    best = int(logits.argmax())
    runner_up = int(logits.topk(2).indices[1])
    forced = {7: 100.0}
    banned = {best: -100.0}
    cases = [
        (SamplingParams(max_tokens=1, temperature=0.0, logit_bias=forced), {7}),
        (SamplingParams(max_tokens=1, logit_bias=forced), {7}),
        (SamplingParams(max_tokens=1, temperature=0.0, logit_bias=banned), {runner_up}),
    ]
    for p, allowed in cases:
        tokens = sample(logits.expand(rows, -1), build([p] * rows, vocab)).token_ids
        assert set(tokens.tolist()) == allowed, p
    with torch.random.fork_rng():
        torch.manual_seed(0)
        p = SamplingParams(max_tokens=1, temperature=2.0, logit_bias=banned)
        tokens = sample(logits.expand(rows, -1), build([p] * rows, vocab)).token_ids
    assert best not in tokens.tolist()
    assert len(set(tokens.tolist())) > 10, "test design: the banned row should still spread its draws"


def test_cheap_path_skips_every_stage() -> None:
    greedy = build([SamplingParams(max_tokens=1, temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)] * 3, 10)
    plain = build([SamplingParams(max_tokens=1)] * 3, 10, outputs=[[1, 2], [3], []])
    for batch in (greedy, plain):
        stages = (batch.logit_bias_index, batch.seen, batch.output_counts, batch.temperature, batch.top_k,
                  batch.top_p, batch.min_p, batch.greedy)
        assert all(stage is None for stage in stages)
        assert not batch.want_logprobs and batch.num_top_logprobs == 0
    assert greedy.all_greedy and not greedy.shared_noise
    assert not plain.all_greedy and plain.shared_noise


# -- grammar bitmask (structured outputs) --------------------------------------------------------------------

GRAMMAR = "start: any"  # rows with a grammar; the sampler reads only whether one is set


def ref_allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    """Which tokens a bitmask row allows: bit j of word k is token 32k + j."""
    return np.array([(int(words[t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)])


def bitmask_of(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    words = np.zeros((len(allowed), (vocab + 31) // 32), dtype=np.int64)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            words[row, t // 32] |= 1 << (t % 32)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


@EXAMPLES
@given(data=st.data(), logits=logit_matrices(max_vocab=80))
def test_token_bitmask_matches_reference(data: st.DataObject, logits: np.ndarray) -> None:
    rows, vocab = logits.shape
    words = (vocab + 31) // 32
    chosen = [row for row in range(rows) if data.draw(st.booleans())] or [0]
    values = data.draw(st.lists(st.integers(-2**31, 2**31 - 1), min_size=len(chosen) * words,
                                max_size=len(chosen) * words))
    bitmask = np.array(values, dtype=np.int32).reshape(len(chosen), words)
    index = None if len(chosen) == rows else torch.tensor(chosen)
    out = apply_token_bitmask(torch.from_numpy(logits), torch.from_numpy(bitmask), index)
    expected = logits.copy()
    for g, row in enumerate(chosen):
        expected[row][~ref_allowed(bitmask[g], vocab)] = -np.inf
    assert torch.equal(out, torch.from_numpy(expected))
    assert_off_rows_untouched(torch.from_numpy(logits), out, [row not in chosen for row in range(rows)])


@pytest.mark.parametrize("case", ["plain", "all"])
def test_a_grammar_row_draws_from_its_allowed_tokens_only(case: str) -> None:
    """The masked distribution is the processed one renormalised over the allowed tokens (chi-square)."""
    vocab, allowed = CHI_LOGITS.size, {0, 2, 3, 6, 9, 11}
    p = replace(CHI_CASES["all"] if case == "all" else SamplingParams(max_tokens=1), grammar=GRAMMAR)
    masked = np.where(ref_allowed(bitmask_of([allowed], vocab)[0].numpy(), vocab), CHI_LOGITS, -np.inf)
    expected, _ = ref_distribution(masked, p, CHI_PROMPT, CHI_OUTPUT)
    logits = torch.from_numpy(CHI_LOGITS).expand(DRAWS, -1)
    batch = build([p] * DRAWS, vocab, [CHI_PROMPT] * DRAWS, [CHI_OUTPUT] * DRAWS,
                  token_bitmask=(bitmask_of([allowed], vocab).expand(DRAWS, -1), None))
    with torch.random.fork_rng():
        torch.manual_seed(11)
        tokens = sample(logits, batch).token_ids.tolist()
    assert set(tokens) <= allowed
    assert_fits(tokens, expected)


def test_greedy_grammar_rows_take_the_best_allowed_token_and_other_rows_are_untouched() -> None:
    vocab = 40
    logits = torch.randn(4, vocab, generator=seeded(5)) * 3
    params = [SamplingParams(max_tokens=1, temperature=0.0, grammar=GRAMMAR),
              SamplingParams(max_tokens=1, seed=3),
              SamplingParams(max_tokens=1, temperature=0.0),
              SamplingParams(max_tokens=1, seed=4, grammar=GRAMMAR)]
    allowed = [{1, 17, 33}, {5, 6}]
    mask = (bitmask_of(allowed, vocab), torch.tensor([0, 3]))
    gens = [None, seeded(3), None, seeded(4)]
    tokens = sample(logits, build(params, vocab, generators=gens, token_bitmask=mask)).token_ids.tolist()
    free = sample(logits, build([replace(p, grammar=None) for p in params], vocab,
                                generators=[None, seeded(3), None, seeded(4)])).token_ids.tolist()
    assert tokens[0] == max(allowed[0], key=lambda t: logits[0, t]) and tokens[3] in allowed[1]
    assert tokens[1:3] == free[1:3]  # rows without a grammar draw what they draw without one beside them
    assert build(params[1:3], vocab, generators=gens[1:3]).token_bitmask is None
