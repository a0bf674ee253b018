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
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ROOT, _wait_until_healthy, wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"
PREFIX = "/affinity"


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

    application = serve.status().applications.get("affinity")
    status = application.deployments.get(deployment) if application is not None else None
    return status.replica_states.get("RUNNING", 0) if status is not None else 0


@pytest.fixture(scope="module")
def affinity_app(server):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(_two_group_args()), name="affinity", route_prefix=PREFIX, blocking=False)
    base = f"{server}{PREFIX}"
    _wait_until_healthy(f"{base}/health")
    wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json()["replica_groups"].get("healthy") == 2,
               what="both replica groups healthy")
    # A group reports itself healthy from its constructor, before Serve runs it and tells the stage's routers;
    # the tests need every router to know both groups.
    wait_until(lambda: _running_replicas("LlamaReplica") == 2 and _running_replicas("ChatStage") == 2,
               what="two running replicas of the replica group and the stage deployments")
    yield base
    serve.delete("affinity")


@pytest.fixture(scope="module")
def client(affinity_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{affinity_app}/v1", api_key="unused", max_retries=0)


def _queries_by_group(base: str) -> dict[str, float]:
    """replica group -> prompt tokens it has looked up in its prefix cache, from the ingress's /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {sample.labels["replica"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "llama_serve_prefix_cache_query_tokens"}


# Each group publishes its stats about once a second and the ingress caches the board for 0.5 s: two reads
# this far apart that agree show a board with nothing still on its way.
BOARD_SETTLED_S = 2.0


def _settled_queries(base: str) -> dict[str, float]:
    """`_queries_by_group` once two reads `BOARD_SETTLED_S` apart agree (no lookups still to be published)."""
    def settled() -> dict[str, float] | None:
        first = _queries_by_group(base)
        time.sleep(BOARD_SETTLED_S)
        return first if _queries_by_group(base) == first and first else None

    return wait_until(settled, what="the status board settled")


def _groups_that_served(base: str, before: dict[str, float], prompt_tokens: int) -> set[str]:
    """The groups whose lookups grew since `before` (a settled reading), once the board has settled again
    and shows exactly this test's `prompt_tokens` looked up."""
    def grown() -> dict[str, float] | None:
        now = _settled_queries(base)
        growth = {group: now.get(group, 0) - before.get(group, 0) for group in now}
        return growth if sum(growth.values()) >= prompt_tokens else None

    growth = wait_until(grown, what="every prompt looked up")
    assert sum(growth.values()) == prompt_tokens, growth  # nothing else ran on these groups meanwhile
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


def test_different_conversations_spread_over_both_groups(client, affinity_app):
    before = _settled_queries(affinity_app)
    prompt_tokens = 0
    for i in range(16):  # all 16 on one group by chance: 1 in 32,768
        completion = client.chat.completions.create(
            model=MODEL, max_tokens=1, messages=[{"role": "user", "content": f"Opening {i} {uuid.uuid4().hex}"}])
        prompt_tokens += completion.usage.prompt_tokens
    assert len(_groups_that_served(affinity_app, before, prompt_tokens)) == 2


def test_one_prompt_cache_key_pins_requests_that_share_nothing(client, affinity_app):
    key = f"ticket-{uuid.uuid4().hex}"
    before = _settled_queries(affinity_app)
    prompt_tokens = 0
    for i in range(8):  # unrelated openings, one key; 8 spread by their openings share a group 1 time in 128
        completion = client.chat.completions.create(
            model=MODEL, max_tokens=1, prompt_cache_key=key,
            messages=[{"role": "user", "content": f"Unrelated question {i} {uuid.uuid4().hex}"}])
        prompt_tokens += completion.usage.prompt_tokens
    assert len(_groups_that_served(affinity_app, before, prompt_tokens)) == 1


def test_routing_decisions_are_counted_in_rays_metrics(client, affinity_app):
    from tests.integration.test_ray_metrics import _ray_samples

    def counted(source: str) -> float:
        return sum(value for labels, value in _ray_samples("ray_llama_serve_routing_decisions_total")
                   if labels.get("application") == "affinity" and labels.get("source") == source
                   and labels.get("reason") in ("affinity", "load_guard", "overflow"))

    before_user, before_conversation = counted("user"), counted("conversation")
    for _ in range(3):
        client.chat.completions.create(model=MODEL, max_tokens=1, user=f"user-{uuid.uuid4().hex}",
                                       messages=[{"role": "user", "content": "Hello"}])
    client.chat.completions.create(model=MODEL, max_tokens=1,
                                   messages=[{"role": "user", "content": f"Hello {uuid.uuid4().hex}"}])
    wait_until(lambda: counted("user") >= before_user + 3 and counted("conversation") >= before_conversation + 1,
               what="three decisions by user and one by conversation in Ray's metrics")
