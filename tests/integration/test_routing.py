"""Cache-affine routing on a real application with two replica groups and two stage replicas (each stage
replica runs its own router): a conversation stays on one group, so the `openai` client sees its
`cached_tokens` grow turn after turn; different conversations spread over both groups; `prompt_cache_key`
pins requests that share nothing; every decision is counted in Ray's metrics."""

from __future__ import annotations

import copy
import time
import uuid

import httpx
import openai
import pytest
import yaml

from serve_app import status_board
from tests.integration.conftest import ROOT, _wait_until_healthy, wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"
APPLICATION = "affinity"
PREFIX = f"/{APPLICATION}"


def _two_group_args() -> dict:
    """configs/tiny.yaml's application at tp=1 (the engine on a thread of its replica), with exactly two
    replica groups and two stage replicas, none of them autoscaled."""
    args = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["applications"][0]["args"])
    args["model"]["tensor_parallel_size"] = 1
    args["engine"]["separate_process"] = False
    for name, count in (("replica", 2), ("stage", 2), ("ingress", 1)):
        options = {key: value for key, value in args["deployments"][name].items() if key != "autoscaling_config"}
        args["deployments"][name] = {**options, "num_replicas": count}
    return args


def _running_replicas(deployment: str) -> int:
    from ray import serve

    application = serve.status().applications.get(APPLICATION)
    status = application.deployments.get(deployment) if application is not None else None
    return status.replica_states.get("RUNNING", 0) if status is not None else 0


@pytest.fixture(scope="module")
def affinity_app(server):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(_two_group_args()), name=APPLICATION, route_prefix=PREFIX, blocking=False)
    base = f"{server}{PREFIX}"
    _wait_until_healthy(f"{base}/health")
    wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json()["replica_groups"].get("healthy") == 2,
               what="both replica groups healthy")
    # A group reports itself healthy from its constructor, before Serve runs it and tells the stage's routers;
    # the tests need every router to know both groups.
    wait_until(lambda: _running_replicas("LlamaReplica") == 2 and _running_replicas("ChatStage") == 2,
               what="two running replicas of the replica group and the stage deployments")
    yield base
    serve.delete(APPLICATION)


@pytest.fixture(scope="module")
def client(affinity_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{affinity_app}/v1", api_key="unused", max_retries=0)


def _queries_published_after(mark: float) -> dict[str, int]:
    """replica group -> prompt tokens it has looked up in its prefix cache, from the status board once both
    groups have published stats taken after `mark` (a `time.time()`): every lookup made before `mark` is in
    them, whatever the board's period."""
    def fresh() -> dict[str, int] | None:
        groups = status_board.read_board(APPLICATION)
        if len(groups) == 2 and all(group.published_at > mark and group.stats is not None for group in groups):
            return {group.replica: group.stats.prefix_cache_query_tokens for group in groups}
        return None

    return wait_until(fresh, what="both groups' stats published after the mark")


def _groups_that_served(before: dict[str, int], prompt_tokens: int) -> set[str]:
    """The groups whose lookups grew since `before`, read once every request sent since is finished; their
    growth is exactly this test's `prompt_tokens` (nothing else ran on these groups meanwhile)."""
    after = _queries_published_after(time.time())
    growth = {group: after[group] - before.get(group, 0) for group in after}
    assert sum(growth.values()) == prompt_tokens, growth
    return {group for group, tokens in growth.items() if tokens > 0}


def test_a_conversation_stays_on_one_group_and_its_cached_tokens_grow(client):
    """With Serve's default router each turn would find its group's cache half the time: three conversations
    of four turns all hit only with the router (chance without it: 1 in 512)."""
    for conversation in range(3):
        messages = [{"role": "system", "content": f"Conversation {uuid.uuid4().hex}: you answer in short "
                                                  "plain sentences about the rivers of Europe."}]
        previous_prompt = 0
        for turn in range(4):
            messages.append({"role": "user", "content": f"Question {turn}: which river is longer, and by "
                                                        "how much, the Danube or the Rhine?"})
            completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                        temperature=0)
            usage = completion.usage
            cached = usage.prompt_tokens_details.cached_tokens
            if turn == 0:
                assert cached == 0, usage
            else:
                # Every full block of the last turn's prompt, which this one begins with, came from the cache.
                assert cached >= previous_prompt // 16 * 16, (conversation, turn, usage)
            previous_prompt = usage.prompt_tokens
            messages.append({"role": "assistant", "content": completion.choices[0].message.content})


def test_different_conversations_spread_over_both_groups(client):
    before = _queries_published_after(time.time())
    prompt_tokens = 0
    for i in range(16):  # all 16 on one group by chance: 1 in 32,768
        completion = client.chat.completions.create(
            model=MODEL, max_tokens=1, messages=[{"role": "user", "content": f"Opening {i} {uuid.uuid4().hex}"}])
        prompt_tokens += completion.usage.prompt_tokens
    assert len(_groups_that_served(before, prompt_tokens)) == 2


@pytest.mark.parametrize("field", ["prompt_cache_key", "user"])
def test_one_prompt_cache_key_or_user_pins_requests_that_share_nothing(client, field):
    key = f"ticket-{uuid.uuid4().hex}"
    before = _queries_published_after(time.time())
    prompt_tokens = 0
    for i in range(8):  # unrelated openings, one key; 8 spread by their openings share a group 1 time in 128
        completion = client.chat.completions.create(
            model=MODEL, max_tokens=1, **{field: key},
            messages=[{"role": "user", "content": f"Unrelated question {i} {uuid.uuid4().hex}"}])
        prompt_tokens += completion.usage.prompt_tokens
    assert len(_groups_that_served(before, prompt_tokens)) == 1


def test_routing_decisions_are_counted_in_rays_metrics(client):
    from tests.integration.test_ray_metrics import _ray_samples

    def counted(source: str) -> float:
        return sum(value for labels, value in _ray_samples("ray_llama_serve_routing_decisions_total")
                   if labels.get("application") == APPLICATION and labels.get("source") == source
                   and labels.get("reason") in ("affinity", "full", "load_guard", "overflow"))

    before_user, before_conversation = counted("user"), counted("conversation")
    for _ in range(3):
        client.chat.completions.create(model=MODEL, max_tokens=1, user=f"user-{uuid.uuid4().hex}",
                                       messages=[{"role": "user", "content": "Hello"}])
    client.chat.completions.create(model=MODEL, max_tokens=1,
                                   messages=[{"role": "user", "content": f"Hello {uuid.uuid4().hex}"}])
    wait_until(lambda: counted("user") >= before_user + 3 and counted("conversation") >= before_conversation + 1,
               what="three decisions by user and one by conversation in Ray's metrics")
