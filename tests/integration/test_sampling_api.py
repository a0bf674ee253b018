"""Sampling parameters through the HTTP API, as a user of the `openai` client sees them."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_seeded_request_reproduces_alone_and_beside_31_others(server, client):
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "temperature": 1.0, "seed": 1234}
    alone = client.chat.completions.create(**request).choices[0].message.content

    async def crowd() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

        async def one(seed: int) -> str:
            completion = await async_client.chat.completions.create(**(request | {"seed": seed}))
            return completion.choices[0].message.content

        return await asyncio.gather(*(one(1234 if i == 17 else 5000 + i) for i in range(32)))

    texts = asyncio.run(crowd())
    assert texts[17] == alone
    assert len(set(texts)) > 16  # other seeds really sample something else


def test_top_k_one_equals_greedy(client):
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    top1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.5,
                                          extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens_is_cut_and_not_returned(client, stream):
    greedy = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                            logprobs=True)
    pieces = [entry.token for entry in greedy.choices[0].logprobs.content]
    text = greedy.choices[0].message.content
    assert "".join(pieces) == text
    # The end of the second token plus the start of the third: a stop string that no single token holds.
    boundary = len(pieces[0]) + len(pieces[1])
    stop = text[boundary - 2: boundary + 2]
    expected = text[: text.index(stop)]
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0,
               "stop": [stop, "never-seen"]}
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        completion = client.chat.completions.create(**request)
        content, reason = completion.choices[0].message.content, completion.choices[0].finish_reason
    assert content == expected and stop not in content
    assert reason == "stop"


def test_max_tokens_gives_length_and_exact_count(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 7


def test_n_three_gives_three_indexed_choices(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=3, seed=7)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == 18
    assert len({choice.message.content for choice in completion.choices}) > 1


def test_logprobs_are_finite_and_greedy_token_heads_the_top(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=5)
    content = completion.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)


@pytest.mark.parametrize("field, value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("min_p", 1.5),
    ("top_k", 1000), ("top_k", -1), ("max_tokens", 0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("repetition_penalty", 0), ("repetition_penalty", 6), ("seed", -1),
    ("seed", 2**63), ("n", 0), ("n", 100), ("top_logprobs", 21), ("stop", ["a", "b", "c", "d", "e"]),
    ("logit_bias", {"40000": 1}), ("logit_bias", {"5": 200}), ("temperature", "hot"),
])
def test_out_of_range_values_are_400_naming_the_field(server, field, value):
    body = {"model": MODEL, "messages": HELLO, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == field


def test_stream_options_without_stream_is_400(server):
    response = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"
