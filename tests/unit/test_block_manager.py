"""Block bookkeeping without a model: allocation, freeing, and prefix caching's sharing and eviction."""

from __future__ import annotations

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, Sequence

BLOCK = 16


def _seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(ChoiceId(name, 0), list(tokens), SamplingParams(max_tokens=8))


def _compute_all(manager: BlockManager, seq: Sequence) -> None:
    """What the scheduler and a step do for a whole prompt: blocks, then the tokens marked computed."""
    manager.reuse_cached_prefix(seq)
    manager.grow(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.register_full_blocks(seq)


def test_a_released_prefix_is_reused_and_the_last_token_is_left_to_compute():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    prompt = list(range(100, 140))  # 40 tokens: two full blocks and a partial one
    first = _seq(prompt, "a")
    _compute_all(manager, first)
    blocks = list(first.block_table)
    manager.free(first)
    assert manager.num_free_blocks == 8  # cached blocks nobody holds still count as free

    again = _seq(prompt + [7, 8], "b")
    assert manager.reuse_cached_prefix(again) == 32
    assert again.block_table == blocks[:2] and again.num_computed_tokens == 32

    exact = _seq(list(range(100, 132)), "c")  # exactly two blocks: the second must be computed again
    assert manager.reuse_cached_prefix(exact) == 16


def test_blocks_are_shared_while_held_and_freed_only_by_the_last_holder():
    manager = BlockManager(num_blocks=6, block_size=BLOCK)
    system = list(range(500, 548))  # a 48-token shared prefix (3 blocks)
    a, b = _seq(system + [1, 2, 3], "a"), _seq(system + [4, 5, 6, 7], "b")
    _compute_all(manager, a)
    assert manager.reuse_cached_prefix(b) == 48
    assert b.block_table[:3] == a.block_table[:3]
    manager.grow(b, b.num_tokens)
    assert manager.num_free_blocks == 6 - 4 - 1  # 3 shared + 1 each
    manager.free(a)
    assert manager.num_free_blocks == 2  # a's own tail block only; the prefix is still b's
    manager.free(b)
    assert manager.num_free_blocks == 6 and manager.usage == 0.0


def test_different_tokens_or_positions_never_hit():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    _compute_all(manager, _seq(list(range(16)) + list(range(16, 33)), "a"))
    assert manager.reuse_cached_prefix(_seq([99] + list(range(1, 40)), "b")) == 0
    # The second block's tokens, but one block later: its chain (its positions) differs.
    shifted = _seq(list(range(200, 216)) + list(range(16, 33)), "c")
    assert manager.reuse_cached_prefix(shifted) == 0


def test_unheld_cached_blocks_are_evicted_oldest_first_when_the_free_list_is_empty():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    old, new = _seq(list(range(17)), "old"), _seq(list(range(1000, 1017)), "new")
    _compute_all(manager, old)  # blocks: 1 full (cached) + 1 partial
    manager.free(old)
    _compute_all(manager, new)
    manager.free(new)
    filler = _seq(list(range(5000, 5049)), "filler")  # 4 blocks: both cached blocks must be evicted
    manager.reuse_cached_prefix(filler)
    manager.grow(filler, filler.num_tokens)
    manager.free(filler)
    assert manager.reuse_cached_prefix(_seq(list(range(17)), "x")) == 0


def test_eviction_keeps_the_most_recently_released_prefix():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    old, new = _seq(list(range(17)), "old"), _seq(list(range(1000, 1017)), "new")
    for seq in (old, new):
        _compute_all(manager, seq)
        manager.free(seq)
    filler = _seq(list(range(5000, 5033)), "filler")  # 3 blocks: two free + one evicted (old's)
    manager.grow(filler, filler.num_tokens)
    assert manager.reuse_cached_prefix(_seq(list(range(1000, 1017)), "y")) == 16
    assert manager.reuse_cached_prefix(_seq(list(range(17)), "z")) == 0


def test_prefix_caching_can_be_switched_off():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    first = _seq(list(range(40)), "a")
    _compute_all(manager, first)
    manager.free(first)
    assert manager.reuse_cached_prefix(_seq(list(range(40)), "b")) == 0
