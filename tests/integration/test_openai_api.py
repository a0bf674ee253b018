"""The reference's requests and the official `openai` client against the real app (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.protocol import ChatMessage
from serve_app.stage.chat_template import render_chat_prompt
from serve_app.stage.detokenizer import IncrementalDetokenizer
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"

HELLO = [{"role": "user", "content": "Hello!"}]
CHEF = [
    {"role": "system", "content": "Respond like a michelin starred chef."},
    {"role": "user", "content": "Can you name at least two different techniques to cook lamb?"},
    {"role": "assistant", "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form."},
    {"role": "user", "content": "Tell me more about the second method."},
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


# -- the reference's three requests, with curl-like raw HTTP -----------------------------------------------


def test_models_lists_the_served_model(server):
    body = httpx.get(f"{server}/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 1024
    assert isinstance(card["created"], int) and card["owned_by"] and Path(card["root"]).is_dir()


def test_plain_chat_has_the_reference_shape(server):
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                                                  "max_tokens": 12}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 10  # <s>[INST] Hello! [/INST] in the Llama 2 vocabulary
    assert usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["estimated_cost"] == pytest.approx(usage["total_tokens"] * 0.2e-6)


def test_multi_turn_chat_with_system_message(server):
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": CHEF,
                                                                  "max_tokens": 8}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] > 40


def test_stream_has_the_reference_sse_shape(server):
    request = {"model": MODEL, "messages": HELLO, "stream": True, "max_tokens": 6}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=request, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishing = [chunk for chunk in chunks if chunk["choices"][0]["finish_reason"] is not None]
    assert finishing == chunks[-1:] and finishing[0]["choices"][0]["delta"] == {}
    assert finishing[0]["choices"][0]["finish_reason"] == "length"
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text and "</s>" not in text


# -- the official client -----------------------------------------------------------------------------------


def test_openai_client_sync(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens == 5 and completion.choices[0].finish_reason == "length"

    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_openai_client_async_concurrent(server):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            if i % 2:
                stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                              temperature=0, stream=True)
                return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            completion = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                              temperature=0)
            return completion.choices[0].message.content

        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0]  # greedy: every concurrent request, streamed or not, agrees


def test_a_client_that_leaves_mid_stream_does_not_cut_the_streams_beside_it(server):
    """The streams of one replica share a channel subscription (serve_app/channel.py), opened inside
    whichever request needed it first; that request's cancellation must not take the subscription along."""
    from serve_app.channel import SUBSCRIPTION_LINGER_S

    body = {"model": MODEL, "messages": HELLO, "max_tokens": 48, "temperature": 0, "logit_bias": {"2": -100},
            "stream": True, "stream_options": {"include_usage": True}}

    async def first_content(lines) -> None:
        async for line in lines:
            if line.startswith("data: {") and '"content": "' in line and '"role"' not in line:
                return

    async def to_the_end(lines) -> tuple[int, str | None]:
        tokens, reason = 0, None
        async for line in lines:
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                reason = next((c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")), reason)
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return tokens, reason

    async def run():
        await asyncio.sleep(SUBSCRIPTION_LINGER_S + 1)  # earlier tests' subscriptions have lapsed: the first
        async with httpx.AsyncClient(base_url=f"{server}/v1", timeout=300) as http:  # stream opens them
            leaver = await http.send(http.build_request("POST", "/chat/completions", json=body), stream=True)
            leaver_lines = leaver.aiter_lines()
            await first_content(leaver_lines)
            others = [await http.send(http.build_request("POST", "/chat/completions", json=body), stream=True)
                      for _ in range(3)]
            lines = [response.aiter_lines() for response in others]
            for each in lines:
                await first_content(each)
            await leaver.aclose()  # the client goes away mid-stream
            ends = await asyncio.gather(*(to_the_end(each) for each in lines))
            for response in others:
                await response.aclose()
            return ends

    assert asyncio.run(run()) == [(48, "length")] * 3


def _usage_of(client: openai.OpenAI, stream: bool, **request):
    """The usage the client sees, from the body or from a stream's usage chunk (`include_usage`), and the
    reply's text."""
    if not stream:
        completion = client.chat.completions.create(model=MODEL, **request)
        return completion.usage, completion.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, stream=True,
                                                 stream_options={"include_usage": True}, **request))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices == []
    return chunks[-1].usage, text


def _one_replica_group(server: str) -> None:
    """Wait until the application runs one replica group: an earlier test's load may have autoscaled it to two
    (gone 30 s after the load), and the default router would then send a turn where its cache is not. Tests
    run one at a time, so nothing scales it up again while a test here runs."""
    wait_until(lambda: httpx.get(f"{server}/health", timeout=10).json().get("replica_groups", {}).get("total") == 1,
               what="one replica group")


def test_cached_tokens_grow_over_a_conversation(server, client):
    """Every turn resends the conversation: the next one is served the last one's prompt from the cache."""
    _one_replica_group(server)
    # Its own opening words, so that no earlier request shares even the first block with this conversation.
    system = (f"Conversation {uuid.uuid4().hex}. You are a patient guide to the mountains of Europe; "
              "answer in short plain sentences.")
    messages = [{"role": "system", "content": system}]
    questions = ["Which range has the highest summit, and how high is it above the sea?",
                 "How long does a fit walker need to climb it in summer, with one night in a hut?",
                 "What should I pack for that night in the hut, and what can I rent there instead?",
                 "Is there a train that goes most of the way up, and when does it run in the season?"]
    previous_prompt, previous_cached = 0, 0
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        stream = turn % 2 == 1  # streamed and not, turn about
        usage, text = _usage_of(client, stream, messages=messages, max_tokens=8, temperature=0)
        cached = usage.prompt_tokens_details.cached_tokens
        assert cached % 16 == 0 and cached < usage.prompt_tokens, (turn, usage)
        if turn == 0:
            assert cached == 0, usage
        else:
            # At least every full block of the last turn's prompt, which this prompt begins with.
            assert cached >= previous_prompt // 16 * 16 and cached > previous_cached, (turn, usage)
        # Cached input is priced as input by default: the cost is what it was before caching.
        assert usage.estimated_cost == pytest.approx(usage.total_tokens * 0.2e-6)
        previous_prompt, previous_cached = usage.prompt_tokens, cached
        messages.append({"role": "assistant", "content": text})


def test_completions_report_the_cached_prompt_tokens(server, client):
    _one_replica_group(server)
    prompt = f"Notes {uuid.uuid4().hex}: " + "the river runs past the mill and under the stone bridge. " * 4
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == first.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0


# -- greedy equals transformers' generate, tp=2 and tp=1 ----------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/tp1"])
@pytest.mark.parametrize("messages", [HELLO, CHEF], ids=["hello", "chef"])
def test_temperature_zero_equals_transformers_generate(server, tiny_checkpoint, greedy_reference, prefix,
                                                        messages):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    prompt = render_chat_prompt([ChatMessage.model_validate(m) for m in messages],
                                lambda text: tokenizer.encode(text, add_special_tokens=False),
                                tokenizer.bos_token_id, tokenizer.eos_token_id)
    new_ids = greedy_reference(prompt, 24)
    detokenizer = IncrementalDetokenizer(tokenizer)
    expected = detokenizer.push(new_ids) + detokenizer.flush()

    client = openai.OpenAI(base_url=f"{server}{prefix}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == len(new_ids)
    assert completion.choices[0].message.content == expected


# -- errors keep the service serving ------------------------------------------------------------------------


def test_errors_are_openai_shaped_and_the_next_request_succeeds(server, client):
    def post(body, **kwargs):
        return httpx.post(f"{server}/v1/chat/completions", timeout=60, **({"json": body} | kwargs))

    too_long = post({"model": MODEL, "messages": [{"role": "user", "content": "word " * 1100}]})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"

    bad_temperature = post({"model": MODEL, "messages": HELLO, "temperature": 3})
    assert bad_temperature.status_code == 400 and bad_temperature.json()["error"]["param"] == "temperature"

    unknown_model = post({"model": "gpt-4", "messages": HELLO})
    assert unknown_model.status_code == 404 and unknown_model.json()["error"]["code"] == "model_not_found"

    not_json = httpx.post(f"{server}/v1/chat/completions", content=b"{nope", timeout=30,
                          headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and set(not_json.json()["error"]) == {"message", "type", "param", "code"}

    assert httpx.get(f"{server}/v1/nothing-here").status_code == 404

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, top_p=0)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2
