"""Cache-affine routing without a cluster: the stage's affinity keys, the policy (`affinity.py`) and the Serve
router that applies it (`replica/router.py`) on stand-in replicas."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.affinity import COMPLETION_KEY_TOKENS, AffinityKey, choose_group, rendezvous_order
from serve_app.config import ApiConfig, AppConfig, ModelConfig, PricingConfig
from serve_app.protocol import ChatCompletionRequest, CompletionRequest
from serve_app.stage.processor import ChatProcessor

MODEL = "tiny"
GROUPS = ["qk3v9a1z", "m2x8r0td", "a7c4e6pb", "zz10wq5n"]
KEYS = [AffinityKey.of("conversation", f"conversation {i}") for i in range(2000)]


def first_choices(groups: list[str]) -> dict[str, str]:
    return {key.digest: rendezvous_order(key.digest, groups, str)[0] for key in KEYS}


def test_every_router_computes_the_same_order_whatever_order_it_lists_the_groups_in():
    for key in KEYS[:50]:
        orders = {tuple(rendezvous_order(key.digest, groups, str))
                  for groups in (GROUPS, GROUPS[::-1], sorted(GROUPS), GROUPS[1:] + GROUPS[:1])}
        assert len(orders) == 1


def test_keys_spread_evenly_and_a_group_leaving_moves_only_its_own_keys():
    before = first_choices(GROUPS)
    shares = collections.Counter(before.values())
    assert set(shares) == set(GROUPS)
    assert all(0.2 < count / len(KEYS) < 0.3 for count in shares.values())  # 2,000 keys over 4 groups

    gone = GROUPS[1]
    after = first_choices([g for g in GROUPS if g != gone])
    moved = {digest for digest in before if before[digest] != after[digest]}
    assert moved == {digest for digest, group in before.items() if group == gone}
    # ... and each of them to its own second choice, spread over the rest rather than piled on one.
    assert len({after[d] for d in moved}) == 3


def test_the_load_guard_moves_a_request_only_past_the_allowed_imbalance():
    key = KEYS[0]
    preferred, *others = rendezvous_order(key.digest, GROUPS, str)
    lightest = others[-1]

    def loads(busy: int):
        return lambda group: busy if group == preferred else (0 if group == lightest else 5)

    within = choose_group(key, GROUPS, str, loads(32), max_imbalance=32)
    assert within.reason == "affinity" and within.order == [preferred, *others]
    beyond = choose_group(key, GROUPS, str, loads(33), max_imbalance=32)
    assert beyond.reason == "load_guard"
    # The lightest group first; the rest keep the key's order, so an overflow still lands consistently.
    assert beyond.order == [lightest, preferred, *others[:-1]]


def test_a_group_with_a_full_engine_goes_last_so_the_keys_next_group_takes_the_request():
    """A group at its engine's capacity would answer 429; the key's next group, not any group, gets it."""
    key = KEYS[1]
    first, second, third, fourth = rendezvous_order(key.digest, GROUPS, str)
    loads = {first: 96, second: 10, third: 0, fourth: 96}
    choice = choose_group(key, GROUPS, str, loads.__getitem__, max_imbalance=1000, capacity=96)
    assert choice.reason == "full" and choice.order == [second, third, first, fourth]
    below = choose_group(key, GROUPS, str, {**loads, first: 95}.__getitem__, max_imbalance=1000, capacity=96)
    assert below.reason == "affinity" and below.order[0] == first
    everyone_full = choose_group(key, GROUPS, str, lambda group: 96, max_imbalance=1000, capacity=96)
    assert everyone_full.order == [first, second, third, fourth]  # Serve queues it on the key's own group


def test_the_client_named_key_wins_then_the_user_then_the_opening():
    opening = "You are terse.\nHi"
    assert AffinityKey.for_request("conv-1", "alice", opening) == AffinityKey.of("prompt_cache_key", "conv-1")
    assert AffinityKey.for_request(None, "alice", opening) == AffinityKey.of("user", "alice")
    assert AffinityKey.for_request(None, None, opening) == AffinityKey.of("conversation", opening)
    assert AffinityKey.for_request("", "", opening).source == "conversation"
    # The key carries a digest, never the client's text, through Serve's routing and logs.
    assert "alice" not in AffinityKey.of("user", "alice").digest


# -- the stage's keys ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage(tiny_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)

    async def unused(requests, affinity):  # `prepare` never calls the engine
        raise AssertionError
        yield

    return ChatProcessor(tokenizer, ModelConfig(source="x", served_model_id=MODEL, max_model_len=1024),
                         PricingConfig(), unused, ApiConfig())


def chat_key(stage: ChatProcessor, messages: list[dict], **fields) -> AffinityKey:
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages, **fields})
    return stage.prepare(request)[2]


CONVERSATION = [
    {"role": "system", "content": "You are a helpful travel agent."},
    {"role": "user", "content": "I want to see the northern lights in March."},
    {"role": "assistant", "content": "Tromsø in Norway is a good choice."},
    {"role": "user", "content": "How do I get there from Berlin?"},
    {"role": "assistant", "content": "Fly via Oslo."},
    {"role": "user", "content": "And what should I pack?"},
]


def test_every_turn_of_a_conversation_has_one_key_and_other_conversations_others(stage):
    turns = [CONVERSATION[:2], CONVERSATION[:4], CONVERSATION[:6]]
    keys = {chat_key(stage, messages) for messages in turns}
    assert len(keys) == 1 and next(iter(keys)).source == "conversation"
    other_opening = [CONVERSATION[0], {"role": "user", "content": "I want to see the midnight sun."}]
    other_system = [{"role": "system", "content": "You are a pirate."}, CONVERSATION[1]]
    assert len(keys | {chat_key(stage, other_opening), chat_key(stage, other_system)}) == 3


def test_the_tools_offered_are_part_of_the_conversations_key(stage):
    tool = {"type": "function", "function": {"name": "book_flight", "parameters": {"type": "object"}}}
    assert chat_key(stage, CONVERSATION[:2], tools=[tool]) != chat_key(stage, CONVERSATION[:2])


def test_prompt_cache_key_and_user_pin_requests_whatever_their_text(stage):
    assert chat_key(stage, CONVERSATION[:2], prompt_cache_key="trip-42") == chat_key(
        stage, [{"role": "user", "content": "Unrelated."}], prompt_cache_key="trip-42", user="bob")
    assert chat_key(stage, CONVERSATION[:2], user="bob") == chat_key(stage, CONVERSATION[:4], user="bob")


def test_completion_prompts_are_keyed_by_their_first_tokens(stage):
    def completion_key(prompt: str) -> AffinityKey:  # as `ChatProcessor.complete` keys its call
        request = CompletionRequest.model_validate({"model": MODEL, "prompt": prompt})
        prompts = stage.prepare_completion(request)
        return AffinityKey.for_prompt(request.prompt_cache_key, request.user, prompts[0].token_ids)

    long_start = " ".join(f"word{i}" for i in range(COMPLETION_KEY_TOKENS))
    assert completion_key(long_start + " and one ending") == completion_key(long_start + " and another")
    assert completion_key("Once upon a time") != completion_key("Once upon a midnight")


# -- the Serve router on stand-in replicas --------------------------------------------------------------------

@dataclass
class StandInReplica:
    replica_id: object
    max_ongoing_requests: int = 64


def make_router(max_imbalance: int):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from serve_app.replica.router import CacheAffinityRouter

    deployment = DeploymentID("LlamaReplica", "app")
    router = CacheAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.REPLICA)
    router.initialize_state(max_imbalance=max_imbalance)
    replicas = [StandInReplica(ReplicaID(unique_id, deployment)) for unique_id in GROUPS[:2]]
    return router, replicas


def pending(key: AffinityKey | None, request_id: str):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    kwargs = {} if key is None else {"affinity": key}
    return PendingRequest(args=[[]], kwargs=kwargs, metadata=RequestMetadata(request_id, request_id))


def test_the_router_ranks_each_group_alone_in_the_keys_order_and_counts_why(monkeypatch):
    router, replicas = make_router(max_imbalance=4)
    counted = []
    monkeypatch.setattr(router._counter, "inc", lambda tags: counted.append(tags))
    key = KEYS[7]
    first, second = rendezvous_order(key.digest, replicas, lambda r: r.replica_id.unique_id)

    async def route(request_key: AffinityKey | None, request_id: str, accepted_by=None):
        request = pending(request_key, request_id)  # Serve's pending requests are made on its event loop
        ranks = await router.choose_replicas(replicas, request)
        router.on_request_routed(request, (accepted_by or ranks[0][0]).replica_id, None)
        return ranks, request

    async def scenario():
        ranks, request = await route(key, "r1")
        assert ranks == [[first], [second]]
        assert request.routing_context.should_backoff  # a full set of groups is retried with backoff
        router.replica_queue_len_cache.update(first.replica_id, 9)  # 9 in flight there, none on the other
        assert (await route(key, "r2"))[0] == [[second], [first]]
        router.replica_queue_len_cache.update(first.replica_id, 3)
        await route(key, "r3", accepted_by=second)  # Serve found the first choice full and took the next rank
        assert (await route(None, "r4"))[0] == [replicas]

    asyncio.run(scenario())
    assert [tags["reason"] for tags in counted] == ["affinity", "load_guard", "overflow", "no_key"]
    assert [tags["source"] for tags in counted] == ["conversation"] * 3 + ["none"]


def test_with_one_group_a_full_group_is_retried_with_backoff():
    router, replicas = make_router(max_imbalance=4)

    async def scenario():
        request = pending(KEYS[0], "solo")
        assert await router.choose_replicas(replicas[:1], request) == [replicas[:1]]
        return request

    assert asyncio.run(scenario()).routing_context.should_backoff


def test_the_default_config_routes_by_cache_affinity_with_a_batch_of_slack():
    from serve_app.app import replica_routing
    from serve_app.replica.router import CacheAffinityRouter
    from serve_app.two_choices import TwoChoicesRouter

    args = {"model": {"source": "x", "served_model_id": MODEL},
            "engine": {"device": "cpu", "kv_cache_bytes": 1 << 20, "max_num_seqs": 24}}
    options = replica_routing(AppConfig.model_validate(args))["request_router_config"]
    # A group takes its running batch plus the waiting queue's bound (api.max_waiting_requests, 256) at most.
    assert options == {"request_router_class": CacheAffinityRouter,
                       "request_router_kwargs": {"max_imbalance": 24, "capacity": 24 + 256}}
    # Serve's default policy, in a router that also sends channel subscriptions where they belong.
    assert replica_routing(AppConfig.model_validate({**args, "routing": {"policy": "power_of_two"}})) == {
        "request_router_config": {"request_router_class": TwoChoicesRouter}}


def test_a_channel_subscription_goes_to_the_group_it_names_whatever_its_key():
    """A stage's subscription reads the streams one group holds: any other group has nothing for it."""
    from ray.serve._private.common import DeploymentHandleSource, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from serve_app.two_choices import TwoChoicesRouter

    router, replicas = make_router(max_imbalance=4)
    two_choices = TwoChoicesRouter(deployment_id=router._deployment_id, handle_source=DeploymentHandleSource.REPLICA)

    def subscription(target: str):
        return PendingRequest(args=[], kwargs={"subscriber": "s", "channel_target": target},
                              metadata=RequestMetadata("sub", "sub"))

    async def scenario():
        for replica in replicas:
            target = replica.replica_id.unique_id
            assert await router.choose_replicas(replicas, subscription(target)) == [[replica]]
            assert await two_choices.choose_replicas(replicas, subscription(target)) == [[replica]]
        # A group that is gone: any group, whose hub ends the subscription at once (nothing there for it).
        assert await router.choose_replicas(replicas, subscription("gone")) == [replicas]
        ranks = await two_choices.choose_replicas(replicas, subscription("gone"))
        assert len(ranks) == 1 and sorted(ranks[0], key=id) == sorted(replicas, key=id)

    asyncio.run(scenario())
