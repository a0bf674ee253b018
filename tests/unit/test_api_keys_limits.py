"""The API's edges without Ray: keys, the ASGI edge middleware, error mapping, admission, metrics."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from serve_app.config import ApiConfig
from serve_app.engine.engine import EngineStats
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.errors import AuthenticationError, OverloadedError, mask_key, to_service_error
from serve_app.ingress.edge import (
    _digest,
    configure_api,
    error_response,
    key_is_valid,
    parse_body,
    resolve_api_keys,
)
from serve_app.metrics import ServiceMetrics
from serve_app.protocol import Usage
from serve_app.replica.engine_client import AdmissionLimits, EngineClient
from serve_app.replica.engine_loop import AbortRequest, AddRequests, StepReport
from serve_app.stage.processor import ChoiceDelta, UsageReport
from serve_app.status_board import GroupStatus

KEY = "sk-unit-0123456789abcdef"


def test_keys_come_from_config_environment_and_a_secret_file(tmp_path):
    api = ApiConfig(api_keys=["a-key"])
    assert resolve_api_keys(api, {"LLAMA_SERVE_API_KEYS": " b-key, ,a-key"}) == ("a-key", "b-key")
    assert resolve_api_keys(ApiConfig(), {}) == ()
    secret = tmp_path / "keys"
    secret.write_text("c-key\n\n  d-key  \n")  # as a Kubernetes Secret mounts it
    assert resolve_api_keys(ApiConfig(), {"LLAMA_SERVE_API_KEYS_FILE": str(secret)}) == ("c-key", "d-key")
    with pytest.raises(FileNotFoundError):  # a closed API never comes up open because its secret is missing
        resolve_api_keys(ApiConfig(), {"LLAMA_SERVE_API_KEYS_FILE": str(tmp_path / "missing")})
    required = ApiConfig(require_api_keys=True)
    with pytest.raises(ValueError, match="LLAMA_SERVE_API_KEYS"):  # an exposed deployment whose secret is empty
        resolve_api_keys(required, {"LLAMA_SERVE_API_KEYS": " , "})
    assert resolve_api_keys(required, {"LLAMA_SERVE_API_KEYS": "e-key"}) == ("e-key",)


def test_key_check_and_masking():
    digests = (_digest(KEY),)
    assert key_is_valid(KEY, digests)
    assert not key_is_valid(KEY + "x", digests) and not key_is_valid(None, digests)
    assert mask_key(KEY) == "sk-u" + "*" * (len(KEY) - 8) + "cdef"
    assert mask_key("short") == "*****"
    assert KEY not in AuthenticationError.for_key(KEY).message


def edge_app(keys: tuple[str, ...] = (KEY,), **api) -> TestClient:
    app = FastAPI(redirect_slashes=False)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.post("/echo")
    async def echo(request: Request):
        try:
            from serve_app.protocol import CompletionRequest
            return (await parse_body(request, CompletionRequest)).model_dump()
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    config = ApiConfig(api_keys=list(keys), **api)
    configure_api(app, config, config.max_body_bytes or 1 << 20, {})
    return TestClient(app)


@pytest.mark.parametrize("path", ["/echo", "/nowhere", "//health", "/health/", "/HEALTH", "/health/live/",
                                  "/health/ready"])
def test_every_path_but_health_needs_a_key(path):
    response = edge_app().get(path)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_health_is_open_and_a_good_key_passes():
    client = edge_app()
    assert client.get("/health").status_code == 200 and client.get("/health/live").status_code == 200
    response = client.post("/echo", json={"model": "m", "prompt": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.json()["prompt"] == "hi"


def test_body_limit_content_type_and_json_errors():
    client = edge_app(keys=(), max_body_bytes=2048)
    assert client.post("/echo", content=b"x" * 4096).status_code == 413

    def chunks():
        for _ in range(8):
            yield b" " * 512  # no Content-Length: counted while read

    assert client.post("/echo", content=chunks()).status_code == 413
    assert client.post("/echo", content=b"{}", headers={"content-type": "text/plain"}).status_code == 400
    assert client.post("/echo", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    bad = client.post("/echo", json={"model": "m", "prompt": "hi", "temperature": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def test_cors_only_when_configured():
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in edge_app(keys=()).options("/echo", headers=preflight).headers
    client = edge_app(cors_allow_origins=["http://a.example"])
    assert client.options("/echo", headers=preflight).headers["access-control-allow-origin"] == "http://a.example"


def test_overload_and_backpressure_map_to_429_and_503_with_retry_after():
    response = error_response(OverloadedError("busy", retry_after=1.5))
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    from ray.serve.exceptions import BackPressureError

    error = to_service_error(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert error.status_code == 503 and error.retry_after
    assert to_service_error(RuntimeError("secret path /etc")).message.startswith("The server had an error")


class IdleHost:
    """An engine host for `EngineClient` whose engine takes every request and never steps it."""

    def __init__(self):
        self.commands: list = []

    def start(self, on_report, loop):
        on_report(StepReport(EngineStats(0, 0, 0.0, 1, 1, 0)))

    def send(self, command):
        self.commands.append(command)

    def alive(self):
        return True

    def healthy(self):
        return True

    def stop(self):
        pass


async def _let_tasks_run() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_admission_bounds_waiting_requests_and_tokens_and_admits_choices_together():
    host = IdleHost()

    def request(name: str, index: int = 0, tokens: int = 10) -> EngineRequest:
        return EngineRequest(ChoiceId(name, index), [1] * tokens, SamplingParams(max_tokens=4))

    async def run():
        client = EngineClient(host, limits=AdmissionLimits(2, 100, retry_after_s=3))
        # Client request a's three choices come in one call, and are admitted as one waiting request: b, the
        # second, still fits under the bound of 2, and c does not.
        streams = [client.generate([request("a", 0), request("a", 1), request("a", 2)]),
                   client.generate([request("b")])]
        pending = [asyncio.ensure_future(stream.__anext__()) for stream in streams]
        await _let_tasks_run()
        assert not any(task.done() for task in pending)  # both admitted, waiting for a first token
        assert [len(c.requests) for c in host.commands if isinstance(c, AddRequests)] == [3, 1]
        with pytest.raises(OverloadedError) as error:
            await client.generate([request("c")]).__anext__()
        assert error.value.retry_after == 3
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # a stream that goes away aborts its engine requests
        # Nothing waits any more: a 90-token request is admitted, and then 20 more tokens are too many.
        big = client.generate([request("d", tokens=90)])
        first = asyncio.ensure_future(big.__anext__())
        await _let_tasks_run()
        assert not first.done()
        with pytest.raises(OverloadedError):  # 90 + 20 tokens > 100
            await client.generate([request("e", tokens=20)]).__anext__()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await big.aclose()

    asyncio.run(run())
    aborted = {command.choice for command in host.commands if isinstance(command, AbortRequest)}
    assert aborted >= {ChoiceId("a", 0), ChoiceId("a", 1), ChoiceId("a", 2), ChoiceId("b", 0)}


def test_request_meter_times_tokens_and_counts_usage():
    metrics = ServiceMetrics()
    meter = metrics.meter("chat")
    meter.start = 0.0
    meter.observe([ChoiceDelta(0, "a", num_tokens=1)], now=0.5)
    meter.observe([ChoiceDelta(0, "bc", num_tokens=2)], now=0.7)
    meter.observe([UsageReport(Usage.from_counts(10, 3, 0, 0))], now=0.8)
    meter.finish(200, now=1.0)
    meter.finish(200, now=2.0)  # counted once
    text = metrics.render().decode()
    assert 'llama_serve_time_to_first_token_seconds_sum{route="chat"} 0.5' in text
    # From the first token (0.5) to the last byte (1.0), over the 2 tokens after the first.
    assert 'llama_serve_time_per_output_token_seconds_sum{route="chat"} 0.25' in text
    assert 'llama_serve_inter_token_latency_seconds_count{route="chat"} 2.0' in text
    assert 'llama_serve_e2e_request_latency_seconds_sum{route="chat"} 1.0' in text
    assert 'llama_serve_requests_total{route="chat",status="200"} 1.0' in text
    assert "llama_serve_prompt_tokens_total 10.0" in text and "llama_serve_generation_tokens_total 3.0" in text
    stats = EngineStats(3, 1, 0.25, 30, 40, 2, prefix_cache_query_tokens=500, prefix_cache_hit_tokens=320)
    metrics.set_groups([GroupStatus("g1", True, stats, 0.0), GroupStatus("g2", False, None, 0.0)])
    text = metrics.render().decode()
    assert 'llama_serve_num_sequences_running{replica="g1"} 3.0' in text
    assert 'llama_serve_kv_cache_usage_ratio{replica="g1"} 0.25' in text
    assert 'llama_serve_prefix_cache_hit_tokens{replica="g1"} 320.0' in text
    assert 'llama_serve_replica_group_healthy{replica="g1"} 1.0' in text
    assert 'llama_serve_replica_group_healthy{replica="g2"} 0.0' in text
    metrics.set_groups([GroupStatus("g2", True, stats, 0.0)])  # g1 is gone from the board: so are its series
    assert 'replica="g1"' not in metrics.render().decode()


class RecordingExport:
    """Stands in for `RayRequestExport` (Ray's metrics need a running Ray): what the meter sends it."""

    def __init__(self):
        self.calls = []

    def first_token(self, *args):
        self.calls.append(("first_token", *args))

    def tokens(self, *args):
        self.calls.append(("tokens", *args))

    def finished(self, *args):
        self.calls.append(("finished", *args))


def test_each_request_reaches_rays_metrics_in_a_few_calls_never_one_per_token():
    export = RecordingExport()
    metrics = ServiceMetrics(export)
    meter = metrics.meter("chat")
    meter.start = 0.0
    for i in range(1, 11):
        meter.observe([ChoiceDelta(0, "x", num_tokens=1)], now=0.1 * i)
    meter.observe([UsageReport(Usage.from_counts(7, 10, 0, 0))], now=1.0)
    meter.finish(200, now=1.0)
    assert export.calls == [("first_token", "chat", 0.1), ("tokens", 7, 10),
                            ("finished", "chat", 200, 1.0, pytest.approx(0.1))]
    refused = metrics.meter("complete")
    refused.finish(429, now=refused.start + 0.01)
    assert export.calls[-1] == ("finished", "complete", 429, None, None)  # no latency for a refusal


def test_metrics_help_says_which_requests_it_covers():
    text = ServiceMetrics().render().decode()
    helps = [line for line in text.splitlines() if line.startswith("# HELP llama_serve_requests_total")]
    assert helps and "This ingress replica's requests only" in helps[0]


def test_a_tool_call_delta_becomes_an_openai_chunk():
    import json

    from serve_app.ingress.responses import chat_chunk_lines
    from serve_app.protocol import ChatCompletionChunk, FunctionCall, ToolCall

    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Oslo"}'))

    def chunk(choices):
        body = ChatCompletionChunk(id="x", created=0, model="m", choices=choices)
        return json.dumps(body.model_dump()) + "\n"

    first, last = [json.loads(line) for line in chat_chunk_lines(
        ChoiceDelta(0, "", "tool_calls", tool_calls=[call]), chunk, False).splitlines()]
    delta = first["choices"][0]["delta"]
    assert "content" not in delta and delta["tool_calls"][0] == {"index": 0, "id": "call_1", "type": "function",
                                                                 "function": {"name": "get_weather",
                                                                              "arguments": '{"city": "Oslo"}'}}
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


def test_a_chunk_with_unicode_line_separators_stays_one_line_for_every_reader():
    """The tiny model's gibberish wrote U+2028 in a soak run: httpx's `aiter_lines` cut that event in two."""
    import json

    from serve_app.ingress.responses import sse_data
    from serve_app.protocol import ChatCompletionChunk

    text = "a\u2028b\u2029c\x85d\u00e9"
    body = ChatCompletionChunk(id="x", created=0, model="m", choices=[
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
    event = sse_data(body)
    (line, blank, *rest) = event.splitlines()
    assert blank == "" and not rest and line.startswith("data: ")
    assert json.loads(line[len("data: "):])["choices"][0]["delta"]["content"] == text
    assert "\u00e9" in line  # other text stays UTF-8, not escaped
