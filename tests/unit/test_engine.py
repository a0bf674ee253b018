"""The engine without Ray: greedy outputs equal transformers' `generate`, under load, with TP, preemption."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.engine import Engine, start_engine
from serve_app.engine.model_runner import STEP_MESSAGE_SIZE
from serve_app.engine.sampler import PenaltyTable, SamplingBatch, sample
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest, FinishReason, RequestOutput, Sequence
from serve_app.errors import InvalidRequestError
from serve_app.models import llama

MAX_NEW = 24


def _random_prompts(count: int, seed: int, low: int = 3, high: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def reference(greedy_reference):
    return lambda prompt, max_new=MAX_NEW: greedy_reference(prompt, max_new)


def _engine(checkpoint, tp: int = 1, *, kv_cache_bytes: int = 64 * 2**20, max_model_len: int = 1024,
            max_num_seqs: int = 32, max_num_batched_tokens: int = 256, decode_gather_tokens: int = 65536,
            dtype: str = "float32", **engine_settings) -> Engine:
    model = ModelConfig(source=str(checkpoint), served_model_id="tiny", dtype=dtype,
                        tensor_parallel_size=tp, max_model_len=max_model_len)
    engine = EngineConfig(device="cpu", kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, collective_timeout_s=60,
                          heartbeat_interval_s=5, decode_gather_tokens=decode_gather_tokens, **engine_settings)
    return start_engine(model, engine)


def _request(name: str, prompt: list[int], params: SamplingParams) -> EngineRequest:
    return EngineRequest(ChoiceId(name, 0), prompt, params)


def _run(engine: Engine, prompts: list[list[int]], *, stagger: int = 0, max_new: int = MAX_NEW,
         params: SamplingParams | None = None) -> dict[str, list[int]]:
    """Submit prompts (one every `stagger` steps, or all at once) and collect each one's tokens."""
    params = params or SamplingParams(max_tokens=max_new, temperature=0.0)
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for index, prompt in batch:
                engine.add_request(_request(f"r{index}", prompt, params))
                results[f"r{index}"] = []
            pending = pending[len(batch):]
        for output in engine.step():
            results[output.choice.request_id].extend(output.new_token_ids)
        steps += 1
    return results


@pytest.fixture(scope="module")
def engine_tp1(tiny_checkpoint):
    engine = _engine(tiny_checkpoint)
    yield engine
    engine.shutdown()


def test_greedy_single_request_matches_generate(engine_tp1, reference):
    prompt = [1, 15043, 29991]
    assert _run(engine_tp1, [prompt])["r0"] == reference(prompt)


def test_concurrent_staggered_mixed_lengths_match_generate(engine_tp1, reference):
    prompts = _random_prompts(12, seed=1)
    results = _run(engine_tp1, prompts, stagger=3)
    for index, prompt in enumerate(prompts):
        assert results[f"r{index}"] == reference(prompt), f"prompt {index} (len {len(prompt)})"


def test_decode_rows_attended_in_calls_by_length_match_generate(tiny_checkpoint, reference):
    # A 64-token gather bound splits each step's decode attention into many calls, short rows together and
    # each long one alone; every request must still continue exactly as `generate` does.
    engine = _engine(tiny_checkpoint, decode_gather_tokens=64)
    try:
        prompts = _random_prompts(10, seed=5, low=3, high=300)
        results = _run(engine, prompts, stagger=2)
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt), f"prompt {index} (len {len(prompt)})"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("graphs", [False, True], ids=["paged", "paged-static-buffers"])
def test_paged_decode_and_the_cuda_graph_path_match_generate(tiny_checkpoint, reference, monkeypatch, graphs):
    """The paged decode attention (one call over every decode row, reading whole block tables), and on top of
    it the static buffers CUDA graphs replay — batches padded to their bucket, padding rows on a scratch
    block — run here eagerly: staggered arrivals move the batch through buckets 1 to 8, and every request
    still continues exactly as `generate` does."""
    from serve_app.engine.cuda_graphs import DecodeGraphs

    replayed = []
    run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, *args: replayed.append(args[0].numel()) or run(self, *args))
    engine = _engine(tiny_checkpoint, max_num_seqs=8, decode_attention="paged", cuda_graphs=graphs)
    try:
        prompts = _random_prompts(9, seed=11, low=3, high=120)
        results = _run(engine, prompts, stagger=2)
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt), f"prompt {index} (len {len(prompt)})"
        assert engine.stats().num_free_blocks == engine.stats().num_blocks
    finally:
        engine.shutdown()
    if graphs:  # decode steps took the static path, at sizes that need padding (3, 5, 6, 7 of bucket 4 or 8)
        assert len(replayed) > MAX_NEW and set(replayed) & {3, 5, 6, 7}
    else:
        assert replayed == []


def test_long_prompt_is_prefilled_in_chunks_alongside_decodes(engine_tp1, reference):
    # 600 tokens with a 256-token step budget: three chunks while the short request keeps decoding.
    prompts = _random_prompts(1, seed=2, low=5, high=6) + _random_prompts(1, seed=3, low=600, high=601)
    results = _run(engine_tp1, prompts)
    for index, prompt in enumerate(prompts):
        assert results[f"r{index}"] == reference(prompt)


def test_max_tokens_finishes_with_length(engine_tp1):
    engine_tp1.add_request(_request("len", [1, 15043], SamplingParams(max_tokens=5, temperature=0.0,
                                                                       ignore_eos=True)))
    outputs = []
    while engine_tp1.has_unfinished():
        outputs.extend(engine_tp1.step())
    assert sum(len(o.new_token_ids) for o in outputs) == 5
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_at_once(engine_tp1):
    engine_tp1.add_request(_request("gone", _random_prompts(1, seed=4)[0], SamplingParams(max_tokens=50,
                                                                                           temperature=0)))
    engine_tp1.step()
    assert engine_tp1.stats().num_free_blocks < engine_tp1.stats().num_blocks
    assert engine_tp1.abort_request(ChoiceId("gone", 0))
    stats = engine_tp1.stats()
    assert stats.num_free_blocks == stats.num_blocks and not engine_tp1.has_unfinished()


def _small_cache_engine(checkpoint) -> Engine:
    """24 blocks of 16 tokens = 384 tokens: a handful of 60-110-token sequences must preempt each other."""
    block_bytes = 2 * 4 * 16 * 8 * 32 * 4  # K and V, 4 layers, 16 tokens, 8 heads, head_dim 32, fp32
    return _engine(checkpoint, kv_cache_bytes=24 * block_bytes, max_model_len=384)


def test_kv_exhaustion_preempts_and_resumes_with_identical_tokens(tiny_checkpoint, reference):
    engine = _small_cache_engine(tiny_checkpoint)
    try:
        prompts = _random_prompts(8, seed=5, low=40, high=90)
        results = _run(engine, prompts, max_new=MAX_NEW)
        assert engine.num_preemptions > 0
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt)
        assert engine.stats().num_free_blocks == engine.stats().num_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("settings", [{}, {"decode_attention": "paged", "cuda_graphs": True}],
                         ids=["gather", "paged-static-buffers"])
def test_tensor_parallel_two_ranks_match_generate(tiny_checkpoint, reference, settings):
    engine = _engine(tiny_checkpoint, tp=2, **settings)
    try:
        assert engine.healthy()
        prompts = _random_prompts(6, seed=6)
        results = _run(engine, prompts, stagger=2)
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt)
    finally:
        engine.shutdown()


def test_a_step_larger_than_one_step_message_reaches_the_follower_whole(tiny_checkpoint, reference):
    """A 3,000-token prefill packs past `STEP_MESSAGE_SIZE`: its rest crosses in a second broadcast."""
    prompt = _random_prompts(1, seed=21, low=3000, high=3001)[0]
    assert 3 * len(prompt) > STEP_MESSAGE_SIZE
    engine = _engine(tiny_checkpoint, tp=2, max_model_len=4096, max_num_batched_tokens=4096)
    try:
        assert _run(engine, [prompt, prompt[:40]]) == {"r0": reference(prompt), "r1": reference(prompt[:40])}
    finally:
        engine.shutdown()


def test_a_half_precision_tp_group_keeps_the_rotary_frequencies_in_float32(tiny_checkpoint):
    """DeepSpeed's init casts every buffer to the model's dtype; in bfloat16 the rotary frequencies would be
    off by up to ~0.4%, a phase error that grows with the position until long sequences attend wrongly."""
    engine = _engine(tiny_checkpoint, tp=2, dtype="bfloat16", kv_cache_bytes=16 * 2**20)
    try:
        rotary = engine.runner.model.model.rotary_emb
        exact = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).model.rotary_emb
        assert rotary.inv_freq.dtype == torch.float32
        assert torch.equal(rotary.inv_freq, exact.inv_freq)
        assert engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
        # The CPU rank's head shard is input-major (`models/llama.py`), and DeepSpeed's cast kept it so.
        assert llama.is_input_major(engine.runner.model.lm_head.weight)
        engine.add_request(_request("half", [1, 15043, 29991], SamplingParams(max_tokens=4, temperature=0)))
        tokens = [t for _ in range(8) if engine.has_unfinished() for o in engine.step() for t in o.new_token_ids]
        assert len(tokens) == 4
    finally:
        engine.shutdown()


def test_a_dead_rank_fails_the_group_loudly_instead_of_hanging(tiny_checkpoint):
    engine = _engine(tiny_checkpoint, tp=2)
    engine.add_request(_request("doomed", [1, 15043, 29991], SamplingParams(max_tokens=50, temperature=0)))
    engine.step()
    for process in engine.group.local_processes:
        process.kill()
        process.join()
    assert not engine.healthy()

    def step_until_done() -> None:
        while engine.has_unfinished():
            engine.step()

    # The next collective fails within the group's timeout (60 s here) instead of waiting forever; the bound
    # below only keeps a regression from hanging the suite.
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError):
        pool.submit(step_until_done).result(timeout=600)
    with pytest.raises(RuntimeError):
        engine.shutdown()  # cannot reach the dead rank, but still leaves the process group


def test_penalties_kept_on_device_match_counting_from_token_ids(tiny_checkpoint, reference):
    """Incremental on-device penalty statistics give the tokens a from-scratch count gives, through preemption."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, repetition_penalty=1.5,
                            frequency_penalty=0.7, presence_penalty=0.4)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()

    def expected(prompt: list[int]) -> list[int]:
        output: list[int] = []
        with torch.no_grad():
            for _ in range(MAX_NEW):
                logits = model(torch.tensor([prompt + output])).logits[:, -1]
                table = PenaltyTable(1, 32000, torch.device("cpu"))  # a fresh one: counted from scratch
                stats = table.stats(table.slots([Sequence(ChoiceId("x", 0), prompt, params, list(output))]))
                batch = SamplingBatch.build([params], [None], 32000, torch.device("cpu"), stats)
                output.append(int(sample(logits, batch).token_ids[0]))
        return output

    engine = _small_cache_engine(tiny_checkpoint)
    try:
        prompts = _random_prompts(6, seed=8, low=40, high=90)
        results = _run(engine, prompts, params=params)
        assert engine.num_preemptions > 0
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == expected(prompt)
        assert any(results[f"r{i}"] != reference(p) for i, p in enumerate(prompts))  # penalties did act
        assert engine.sampler.penalties.num_held == 0  # every slot was released
    finally:
        engine.shutdown()


def test_a_request_the_engine_cannot_serve_is_refused_alone(engine_tp1):
    with pytest.raises(InvalidRequestError, match="vocabulary") as refused:
        engine_tp1.add_request(_request("bad-bias", [1, 15043], SamplingParams(max_tokens=2,
                                                                                logit_bias={40000: 5.0})))
    assert refused.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError, match="prompt"):
        engine_tp1.add_request(_request("too-long", [1] * 1024, SamplingParams(max_tokens=2)))
    engine_tp1.add_request(_request("fine", [1, 15043], SamplingParams(max_tokens=2, temperature=0)))
    while engine_tp1.has_unfinished():
        engine_tp1.step()


def _shared_prefix_prompts(count: int, seed: int, prefix_len: int = 70) -> list[list[int]]:
    """Chat-like prompts: one long shared prefix (a system prompt) and each request's own question."""
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(3, 32000) for _ in range(prefix_len - 1)]
    return [prefix + [rng.randrange(3, 32000) for _ in range(rng.randrange(2, 40))] for _ in range(count)]


def test_shared_prefixes_are_computed_once_and_change_no_token(engine_tp1, reference):
    before = engine_tp1.stats()
    prompts = _shared_prefix_prompts(8, seed=8)
    results = _run(engine_tp1, prompts, stagger=4)
    for index, prompt in enumerate(prompts):
        assert results[f"r{index}"] == reference(prompt), f"prompt {index}"
    after = engine_tp1.stats()
    # The first request computes the 64 tokens of the prefix's four full blocks; the other seven reuse them.
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens >= 7 * 64
    # Each request is looked up once, when admitted.
    assert after.prefix_cache_query_tokens - before.prefix_cache_query_tokens == sum(map(len, prompts))
    assert after.num_free_blocks == after.num_blocks  # reused blocks are released like any other


def test_prefix_cache_under_preemption_and_eviction_changes_no_token(tiny_checkpoint, reference):
    engine = _small_cache_engine(tiny_checkpoint)
    try:
        prompts = _shared_prefix_prompts(8, seed=9, prefix_len=40) + _random_prompts(4, seed=10, low=40, high=90)
        results = _run(engine, prompts, stagger=1)
        assert engine.num_preemptions > 0 and engine.stats().prefix_cache_hit_tokens > 0
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt), f"prompt {index}"
    finally:
        engine.shutdown()


def test_tensor_parallel_with_shared_prefixes_matches_generate(tiny_checkpoint, reference):
    engine = _engine(tiny_checkpoint, tp=2)
    try:
        prompts = _shared_prefix_prompts(4, seed=11)
        results = _run(engine, prompts, stagger=3)
        assert engine.stats().prefix_cache_hit_tokens >= 3 * 64
        for index, prompt in enumerate(prompts):
            assert results[f"r{index}"] == reference(prompt)
    finally:
        engine.shutdown()


def _outputs_of(engine: Engine, name: str, prompt: list[int], n: int = 1) -> list[RequestOutput]:
    for index in range(n):
        engine.add_request(EngineRequest(ChoiceId(name, index), prompt,
                                         SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_each_choice_reports_the_prompt_tokens_it_found_cached_on_its_first_output(engine_tp1):
    prompt = _random_prompts(1, seed=16, low=99, high=100)[0]  # 100 tokens: six full blocks and four more
    first = _outputs_of(engine_tp1, "cold", prompt)
    assert [o.num_cached_tokens for o in first] == [0] + [None] * 5
    again = _outputs_of(engine_tp1, "warm", prompt)
    assert [o.num_cached_tokens for o in again] == [96] + [None] * 5  # every full block of the prompt
    # A prompt that shares the first 70 tokens shares their four full blocks, and nothing after them.
    branch = prompt[:70] + _random_prompts(1, seed=17, low=30, high=31)[0]
    assert _outputs_of(engine_tp1, "branch", branch)[0].num_cached_tokens == 64
    # Choices admitted together each report what they found: the blocks were there before either ran.
    both = [o for o in _outputs_of(engine_tp1, "pair", prompt, n=2) if o.num_cached_tokens is not None]
    assert sorted((o.choice.index, o.num_cached_tokens) for o in both) == [(0, 96), (1, 96)]
