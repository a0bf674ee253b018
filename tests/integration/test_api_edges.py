"""The API's edges through the real app: surface, one error mapping, API keys, limits, cancellation, overload.

Most tests talk to the `/edge` application of conftest.py (tp=1, API key, 256-token context, 16 KiB bodies,
8 messages, 2 running and 2 waiting engine requests); the open `/` application covers the keyless case.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import EDGE_KEY, EDGE_PREFIX, wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-llama-2-chat"
HELLO = [{"role": "user", "content": "Hello!"}]
AUTH = {"Authorization": f"Bearer {EDGE_KEY}"}
ERROR_KEYS = {"message", "type", "param", "code"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def edge(server) -> str:
    return f"{server}{EDGE_PREFIX}"


@pytest.fixture(scope="module")
def client(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{edge}/v1", api_key=EDGE_KEY, max_retries=0)


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def metric(base: str, name: str, headers: dict[str, str] = AUTH) -> float:
    """`name` summed over its series: over every replica group of the application, for the engine's gauges."""
    text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name]
    assert samples, f"{name} not in {base}/metrics"
    return sum(sample.value for sample in samples)


# -- surface ----------------------------------------------------------------------------------------------


def test_completions_with_the_openai_client(client):
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    (choice,) = completion.choices
    assert choice.finish_reason == "length" and choice.text
    assert completion.usage.completion_tokens == 5 and completion.usage.prompt_tokens == 5  # BOS + 4

    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions_prompt_list_n_echo_logprobs(edge):
    body = {"model": MODEL, "prompt": ["Hello", "Bye"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 2,
            "temperature": 0}
    response = httpx.post(f"{edge}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"].startswith("Hello") and choices[2]["text"].startswith("Bye")
    assert choices[0]["text"] == choices[1]["text"]  # greedy
    logprobs = choices[0]["logprobs"]
    assert len(logprobs["tokens"]) == 3 and logprobs["text_offset"][0] == len("Hello")
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_greedy_completion_equals_chat_of_the_same_prompt(edge):
    """The completions route reuses the stage's loop: the templated prompt as raw text gives the same tokens."""
    chat = httpx.post(f"{edge}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0}).json()
    completion = httpx.post(f"{edge}/v1/completions", headers=AUTH, timeout=60,
                            json={"model": MODEL, "prompt": "[INST] Hello! [/INST]", "max_tokens": 8,
                                  "temperature": 0}).json()
    assert completion["choices"][0]["text"] == chat["choices"][0]["message"]["content"]


def test_model_by_id_and_health(edge, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = httpx.get(f"{edge}/health", timeout=30)  # no key needed
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "replica_groups": {"healthy": 1, "total": 1}}


def test_metrics_expose_every_series_with_one_prefix(edge, client):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    text = httpx.get(f"{edge}/metrics", headers=AUTH, timeout=10).text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "num_sequences_running", "num_sequences_waiting",
                 "kv_cache_usage_ratio", "replica_group_healthy", "engine_generated_tokens", "prompt_tokens_total", "generation_tokens_total", "requests_total"):
        assert f"llama_serve_{name}" in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(line.startswith("llama_serve_") for line in samples)
    assert metric(edge, "llama_serve_generation_tokens_total") >= 3


def test_openapi_document_declares_request_bodies(edge):
    document = httpx.get(f"{edge}/openapi.json", headers=AUTH, timeout=10).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert "422" not in operation["responses"] and "400" in operation["responses"]


# -- tools ------------------------------------------------------------------------------------------------


def test_tool_messages_and_tool_choices(client, edge):
    conversation = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    with_tools = client.chat.completions.create(model=MODEL, messages=conversation, tools=[WEATHER],
                                                tool_choice="auto", max_tokens=4)
    ignored = client.chat.completions.create(model=MODEL, messages=conversation, tools=[WEATHER],
                                             tool_choice="none", max_tokens=4)
    plain = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=4)
    # "auto" tells the model the schemas (a longer prompt); "none" renders exactly as without tools.
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens == ignored.usage.prompt_tokens
    # Four tokens are not a whole call: whatever the tiny model began comes back as text.
    assert with_tools.choices[0].finish_reason == "length" and with_tools.choices[0].message.tool_calls is None


# -- one error mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, status, param", [
    ({"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, None),
    ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, None),
    ({"content": b'{"model": "x"}', "headers": {"content-type": "text/plain"}}, 400, None),
    ({"json": {"model": MODEL, "messages": HELLO, "temperature": "hot"}}, 400, "temperature"),
    ({"json": {"model": MODEL}}, 400, "messages"),
    ({"json": {"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop"),
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}] * 4 + HELLO}}, 400, "messages"),
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "x" * 20000}]}}, 413, None),
])
def test_bad_requests_are_openai_errors(edge, kwargs, status, param):
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = httpx.post(f"{edge}/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert_error(response, status, param=param)


def test_context_length_names_both_counts(edge, client):
    response = httpx.post(f"{edge}/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "messages": HELLO, "max_tokens": 250})
    error = assert_error(response, 400, code="context_length_exceeded", param="messages")
    assert "256" in error["message"] and "10 in the messages, 250 in the completion" in error["message"]
    response = httpx.post(f"{edge}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "prompt": "word " * 300})
    assert_error(response, 400, code="context_length_exceeded", param="prompt")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=300)


def test_routes_methods_and_models(edge):
    assert_error(httpx.get(f"{edge}/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(f"{edge}/v1/models/", headers=AUTH), 404)  # no redirect, an error
    assert_error(httpx.delete(f"{edge}/v1/chat/completions", headers=AUTH), 405)
    assert_error(httpx.get(f"{edge}/v1/completions", headers=AUTH), 405)
    response = httpx.post(f"{edge}/v1/completions", headers=AUTH, json={"model": "gpt-4", "prompt": "hi"})
    assert_error(response, 404, code="model_not_found", param="model")


# -- keys and exposure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json", "/v1/nothing", "//health",
                                  "/health/", "/HEALTH", "/health/x"])
def test_every_path_but_health_needs_a_key(edge, path):
    response = httpx.get(f"{edge}{path}", timeout=10)
    assert_error(response, 401, code="invalid_api_key")


def test_wrong_key_is_masked_and_the_client_sees_authentication_error(edge):
    wrong = "sk-wrong-0123456789abcdef"
    error = assert_error(httpx.get(f"{edge}/v1/models", headers={"Authorization": f"Bearer {wrong}"}), 401)
    assert wrong not in error["message"] and "sk-w" in error["message"]
    bad = openai.OpenAI(base_url=f"{edge}/v1", api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert_error(httpx.post(f"{edge}/v1/chat/completions", json={"model": MODEL, "messages": HELLO}), 401)


def test_cors_is_off_by_default(edge):
    response = httpx.options(f"{edge}/v1/models", headers={"Origin": "http://evil.example",
                                                           "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers


# -- cancellation and overload -----------------------------------------------------------------------------


def test_a_client_that_leaves_a_stream_frees_its_kv_blocks(server):
    """On the open tp=2 application, with a 1,024-token context: a stream of 1,000 tokens runs for seconds, so
    the engine can only stop short of them if the client's going away aborted it. (A non-streamed request's
    client leaving is not seen behind HAProxy, which passes a client's close on only when it writes: that
    path is `test_ingress_cancellation.py`'s, and `api.request_timeout_s` bounds it here.)"""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1000, "stream": True, "min_p": 0,
            "logit_bias": {"2": -100}}  # never EOS: only the abort can end it early
    generated_before = metric(server, "llama_serve_engine_generated_tokens", {})
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any('"content"' in line for line in lines)  # generating: its blocks are held
        # Running and holding KV blocks (polled together: two separate scrapes could straddle its end).
        wait_until(lambda: metric(server, "llama_serve_num_sequences_running", {}) == 1
                  and metric(server, "llama_serve_kv_cache_usage_ratio", {}) > 0)
    # The connection is closed. The abort reaches the engine at its next command drain, i.e. within a step;
    # the board shows it within a second or so.
    wait_until(lambda: metric(server, "llama_serve_num_sequences_running", {}) == 0)
    assert metric(server, "llama_serve_kv_cache_usage_ratio", {}) == 0
    generated = metric(server, "llama_serve_engine_generated_tokens", {}) - generated_before
    assert 0 < generated < 1000
    assert httpx.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 2}).status_code == 200


def test_overload_is_refused_at_once_with_retry_after(edge):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "min_p": 0}

    async def run() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            async def one() -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await client.post(f"{edge}/v1/chat/completions", json=body)
                return response, time.monotonic() - started

            return await asyncio.gather(*(one() for _ in range(10)))

    results = asyncio.run(run())
    refused = [(r, t) for r, t in results if r.status_code != 200]
    served = [(r, t) for r, t in results if r.status_code == 200]
    assert refused and served
    for response, elapsed in refused:
        assert_error(response, 429, code="overloaded")
        assert response.headers["retry-after"] == "2"
        assert elapsed < min(t for _, t in served)  # refused before any admitted request finished

    # The official client, without retries, sees RateLimitError; afterwards a normal request succeeds.
    async def with_client() -> list:
        client = openai.AsyncOpenAI(base_url=f"{edge}/v1", api_key=EDGE_KEY, max_retries=0)

        async def one():
            try:
                return await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200)
            except openai.APIStatusError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(10)))

    outcomes = asyncio.run(with_client())
    assert any(isinstance(o, openai.RateLimitError) for o in outcomes)
    assert all(not isinstance(o, Exception) or isinstance(o, openai.RateLimitError) for o in outcomes)
    assert httpx.post(f"{edge}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 2}).status_code == 200


def test_open_app_needs_no_key_and_streams_completions(server):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- schemathesis over the OpenAPI document -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_server_errors_and_responses_match_the_schema(edge, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

    document = httpx.get(f"{edge}/openapi.json", headers=AUTH, timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    generation_mode = GenerationMode(mode)
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=generation_mode))
        def check(case) -> None:
            case.call_and_validate(base_url=edge, headers=AUTH, checks=checks, timeout=60)

        try:
            check()
            tested += 1
        except Unsatisfiable:  # negative mode: nothing to make invalid (GET /health, /metrics, /v1/models)
            assert mode == "negative"
    assert tested >= 2  # at least both POST bodies
    # Whatever was thrown at it, the service still serves.
    assert httpx.post(f"{edge}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": MODEL, "messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(edge, client):
    system = {"role": "system", "content": "You are a terse assistant for a hardware shop. " * 8}
    messages = [system, {"role": "user", "content": "Which drill should I buy?"}]
    hits_before = metric(edge, "llama_serve_prefix_cache_hit_tokens")
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    # The second request reuses the first one's blocks (all but the last, partial one) and answers the same.
    assert second.choices[0].message.content == first.choices[0].message.content
    expected = (first.usage.prompt_tokens // 16 - 1) * 16
    assert expected > 0
    # The group's stats reach /metrics through the status board, about once a second.
    wait_until(lambda: metric(edge, "llama_serve_prefix_cache_hit_tokens") - hits_before >= expected)


def test_with_tools_offered_a_text_reply_streams_token_by_token(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], max_tokens=12,
                                            temperature=0, stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert not "".join(contents).lstrip().startswith(("{", "[", "`"))  # the tiny model's reply is text
    assert len(contents) > 1 and chunks[-1].choices[0].finish_reason == "length"
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
