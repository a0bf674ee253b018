"""The ingress router: OpenAI's HTTP API in front of the stage.

In: HTTP requests. Out: JSON bodies or server-sent events, and OpenAI-shaped errors for everything else.

Before any route runs, `ApiEdge` (plain ASGI middleware) checks the API key (every path but `/health`,
deny by default) and caps the body size. Routes parse and validate (pydantic, `protocol.py`), check the
model name, and forward the request to the stage through a streaming deployment handle. The stage's first
events are awaited before any byte is sent, so errors found there (context too long, engine overloaded)
still get a real status code; after that, a failure becomes one SSE error event and the stream closes.
Every error, from whichever layer, goes through `errors.error_response`.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import API_KEYS_ENV, ApiConfig, AppConfig
from serve_app.errors import (
    AuthenticationError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceError,
    ServiceUnavailableError,
    error_response,
    from_validation_error,
    sse_error_event,
    to_service_error,
)
from serve_app.metrics import CONTENT_TYPE, RequestMeter, ServiceMetrics
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenLogprob,
    completion_id,
)
from serve_app.stage.chat import ChoiceDelta, StageEvent, UsageReport

logger = logging.getLogger(__name__)

HEALTH_PATH = "/health"
STATS_TIMEOUT_S = 5.0

app = FastAPI(title="llama-serve", version="0.1.0", redirect_slashes=False,
              description="OpenAI-compatible chat and text completions for Llama 2 chat models.")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 answers, in OpenAI's error shape."""
    if exc.status_code == 405:
        return error_response(MethodNotAllowedError("Method not allowed for this route"))
    if exc.status_code == 404:
        return error_response(NotFoundError("Unknown route"))
    return error_response(InvalidRequestError(str(exc.detail)))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (path and query parameters) says 400, never 422."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return error_response(InvalidRequestError(f"Invalid request: {first.get('msg', 'invalid')}", param=param))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """Anything a route did not map: a generic 500, the details only in the log."""
    logger.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return error_response(to_service_error(exc))


# Module-level helpers stand above the deployment class: `@serve.deployment` serializes the class when it is
# defined, and names defined after that point would be missing in the replica.


def sse_data(body: BaseModel) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"


@dataclass
class CollectedChoices:
    """A whole non-streamed response's choices, gathered from the stage's events."""

    texts: list[str]
    reasons: list[str | None]
    logprobs: list[list[TokenLogprob]]
    calls: list[list | None]
    usage: Any = None


async def collect_choices(batches, count: int) -> CollectedChoices:
    got = CollectedChoices([""] * count, [None] * count, [[] for _ in range(count)], [None] * count)
    async for batch in batches:
        for event in batch:
            if isinstance(event, UsageReport):
                got.usage = event.usage
                continue
            got.texts[event.index] += event.text
            got.reasons[event.index] = event.finish_reason or got.reasons[event.index]
            got.logprobs[event.index].extend(event.logprobs or [])
            got.calls[event.index] = event.tool_calls or got.calls[event.index]
    return got


def resolve_api_keys(api: ApiConfig, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The config's keys and the comma-separated keys of `LLAMA_SERVE_API_KEYS`, without blanks."""
    from_env = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(key for key in [*api.api_keys, *from_env] if key))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_is_valid(key: str | None, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check of `key` against every accepted key (hashed, so lengths leak nothing either)."""
    if not key:
        return False
    candidate = _digest(key)
    return any([hmac.compare_digest(candidate, digest) for digest in digests])  # noqa: C419 - check them all


def relative_path(scope: Scope) -> str:
    """The request path inside this application (under its Serve route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class ApiEdge:
    """ASGI middleware at the API's edge: API keys (all paths but exactly `/health`) and body size.

    A body announced (Content-Length) or found (while read) to be over `max_body_bytes` is refused with 413;
    it is never buffered whole.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int) -> None:
        self.app = app
        self.digests = tuple(_digest(key) for key in api_keys)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.digests and relative_path(scope) != HEALTH_PATH:
            key = _bearer_token(headers.get("authorization"))
            if not key_is_valid(key, self.digests):
                await error_response(AuthenticationError.for_key(key))(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            error = (PayloadTooLargeError(self._too_large()) if length.isdigit()
                     else InvalidRequestError("Invalid Content-Length header"))
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> str:
        return f"The request body is larger than {self.max_body_bytes} bytes."

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise PayloadTooLargeError(self._too_large())
            return message

        return counted


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def configure_api(api: FastAPI, config: ApiConfig, environ: Mapping[str, str]) -> FastAPI:
    """Add the edge middleware (and CORS, only when origins are configured) to the app, once."""
    if getattr(api.state, "edge_configured", False):
        return api
    api.add_middleware(ApiEdge, api_keys=resolve_api_keys(config, environ), max_body_bytes=config.max_body_bytes)
    if config.cors_allow_origins:  # added last, so it runs first: preflights carry no API key
        api.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    api.state.edge_configured = True
    return api


def root_cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, under Ray's wrapping (RayTaskError keeps it as `.cause`)."""
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


async def parse_body(http_request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`: JSON (by content type, when one is given) holding an object that validates."""
    media_type = http_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise InvalidRequestError(f"Unsupported Content-Type '{media_type}'; send application/json.")
    raw = await http_request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _metered(meter: RequestMeter, first: list[StageEvent], rest) -> AsyncIterator[list[StageEvent]]:
    meter.observe(first)
    yield first
    async for batch in rest:
        meter.observe(batch)
        yield batch


async def deltas_and_usage(batches, request: SamplingRequest, usage_chunk) -> AsyncIterator[ChoiceDelta | str]:
    """The stage's deltas one at a time; its usage report becomes the SSE text `usage_chunk(usage)` when the
    request asked for usage in the stream (`stream_options.include_usage`), and nothing otherwise."""
    async for batch in batches:
        for event in batch:
            if not isinstance(event, UsageReport):
                yield event
            elif request.stream_options is not None and request.stream_options.include_usage:
                yield usage_chunk(event.usage)


def chat_chunk_lines(event: ChoiceDelta, chunk, with_logprobs: bool) -> str:
    """SSE lines for a stage delta: its text (or tool calls), then, on its last delta, its finish reason."""
    logprobs = ChoiceLogprobs(content=event.logprobs or []) if with_logprobs else None
    choices = []
    if event.tool_calls:
        calls = [DeltaToolCall(index=i, **call.model_dump()) for i, call in enumerate(event.tool_calls)]
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(tool_calls=calls),
                                                 logprobs=logprobs))
    elif event.text or (with_logprobs and event.logprobs):
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(content=event.text),
                                                 logprobs=logprobs))
    if event.finish_reason is not None:
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(),
                                                 finish_reason=event.finish_reason))
    return "".join(chunk([choice]) for choice in choices)


def legacy_logprobs(entries: list[TokenLogprob], top: int, offset: int) -> CompletionLogprobs:
    """Completions' parallel-list logprobs; `offset` is where the first token's text starts in the choice."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{alt.token: alt.logprob for alt in entry.top_logprobs} for entry in entries] if top else None,
        text_offset=offsets,
    )


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


_SSE = {"description": "JSON, or with `stream: true` server-sent events ending with `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}}}
_POST_ERRORS = {200: _SSE, **_error_responses(400, 401, 404, 413, 429, 500, 503)}
_GET_ERRORS = _error_responses(401, 404, 500)


def openapi_document(api: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request bodies the routes parse by hand (so clients and fuzzers see them)."""
    if api.openapi_schema:
        return api.openapi_schema
    document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        document["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    for operations in document["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)  # validation fails with 400 here
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    api.openapi_schema = document
    return document


app.openapi = lambda: openapi_document(app)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: AppConfig, stage: DeploymentHandle, replica: DeploymentHandle):
        self.config = config
        self.stage = stage
        self.replica = replica
        self.metrics = ServiceMetrics()
        self.app_name = serve.get_replica_context().app_name
        self.model_card = ModelCard(id=config.model.served_model_id, owned_by=config.model.owned_by,
                                    root=resolve_checkpoint(config.model.source),
                                    max_model_len=config.model.max_model_len)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this in the replica, after __init__: the edge middleware needs this replica's config
        # and environment (API keys), which the module-level app cannot know.
        return configure_api(self.app, self.config.api, os.environ)

    @app.get(HEALTH_PATH, responses=_error_responses(503))
    async def health(self) -> Response:
        try:
            await self.replica.check_health.remote()
            healthy = await asyncio.to_thread(self._replica_groups_healthy, self.app_name)
        except Exception:  # noqa: BLE001 - any failure means "not healthy", and says no more
            healthy = False
        if not healthy:
            return error_response(ServiceUnavailableError("The model is not ready", retry_after=5))
        return JSONResponse({"status": "ok"})

    @staticmethod
    def _replica_groups_healthy(app_name: str) -> bool:
        """Whether Serve sees every replica group of this application as healthy (all ranks pass
        `check_health`), not only the one that answered the call above."""
        application = serve.status().applications.get(app_name)
        if application is None:
            return False
        deployment = application.deployments.get("LlamaReplica")
        return deployment is not None and deployment.status in ("HEALTHY", "UPSCALING", "DOWNSCALING")

    @app.get("/metrics", response_class=Response, responses=_GET_ERRORS)
    async def prometheus_metrics(self) -> Response:
        try:
            stats = await asyncio.wait_for(self.replica.stats.remote(), STATS_TIMEOUT_S)
            self.metrics.set_engine_stats(stats)
        except Exception as exc:  # noqa: BLE001 - serve the rest; the gauges keep their last values
            logger.warning("engine stats unavailable: %s", type(root_cause(exc)).__name__)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_GET_ERRORS)
    async def models(self) -> JSONResponse:
        return JSONResponse(ModelList(data=[self.model_card]).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_GET_ERRORS)
    async def model(self, model_id: str) -> JSONResponse:
        if model_id != self.model_card.id:
            return error_response(ModelNotFoundError(model_id))
        return JSONResponse(self.model_card.model_dump())

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_POST_ERRORS)
    async def chat_completions(self, http_request: Request) -> Response:
        return await self._serve(http_request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_POST_ERRORS)
    async def completions(self, http_request: Request) -> Response:
        return await self._serve(http_request, CompletionRequest, "complete")

    async def _serve(self, http_request: Request, model: type[SamplingRequest], method: str) -> Response:
        meter = self.metrics.meter(method)
        events = None
        try:
            request = await parse_body(http_request, model)
            if request.model != self.model_card.id:
                raise ModelNotFoundError(request.model)
            events = getattr(self.stage, method).options(stream=True).remote(request)
            first = await events.__anext__()
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error in one place
            return self._error(exc, meter)
        except BaseException:  # cancelled (client gone) while waiting for the first token
            if events is not None:
                events.cancel()
            raise
        batches = _metered(meter, first, events)
        sse = self._chat_sse if method == "chat" else self._completion_sse
        if request.stream:
            return StreamingResponse(self._stream(sse(request, batches), events, meter),
                                     media_type="text/event-stream")
        collect = self._collect_chat if method == "chat" else self._collect_completion
        try:
            body = await collect(request, batches)
        except Exception as exc:  # noqa: BLE001
            return self._error(exc, meter)
        finally:
            events.cancel()  # a client that went away must not keep the engine busy
        meter.finish(200)
        return JSONResponse(body)

    def _error(self, exc: BaseException, meter: RequestMeter | None = None) -> JSONResponse:
        cause = root_cause(exc)
        if not isinstance(cause, ServiceError) and type(cause).__name__ != "BackPressureError":
            logger.error("request failed: %s", type(cause).__name__, exc_info=cause)
        response = error_response(cause)
        if meter is not None:
            meter.finish(response.status_code)
        return response

    async def _stream(self, lines: AsyncIterator[str], events, meter: RequestMeter) -> AsyncIterator[str]:
        """The SSE body: the route's lines and `[DONE]`, or one error event once the stream has begun."""
        status = 200
        try:
            async for line in lines:
                yield line
            yield "data: [DONE]\n\n"
        except Exception as exc:
            cause = root_cause(exc)
            status = to_service_error(cause).status_code
            if not isinstance(cause, ServiceError):
                logger.error("stream failed: %s", type(cause).__name__, exc_info=cause)
            yield sse_error_event(cause)
        finally:
            events.cancel()  # a client that went away must not keep the engine busy
            meter.finish(status)

    # -- /v1/chat/completions --------------------------------------------------------------------------------

    async def _collect_chat(self, request: ChatCompletionRequest, batches) -> dict:
        got = await collect_choices(batches, request.n)
        choices = []
        for i in range(request.n):
            # A reply that is a tool call has no content, as in OpenAI's responses.
            message = ChatCompletionMessage(content=None if got.calls[i] else got.texts[i], tool_calls=got.calls[i])
            choices.append(ChatCompletionChoice(
                index=i, message=message, finish_reason=got.reasons[i],
                logprobs=ChoiceLogprobs(content=got.logprobs[i]) if request.logprobs else None))
        return ChatCompletionResponse(model=request.model, choices=choices, usage=got.usage).model_dump()

    async def _chat_sse(self, request: ChatCompletionRequest, batches) -> AsyncIterator[str]:
        chunk_id, created = completion_id(), int(time.time())

        def chunk(choices: list[ChatCompletionChunkChoice], usage=None) -> str:
            return sse_data(ChatCompletionChunk(id=chunk_id, created=created, model=request.model,
                                                choices=choices, usage=usage))

        yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(request.n)])
        async for item in deltas_and_usage(batches, request, lambda usage: chunk([], usage=usage)):
            if isinstance(item, str):
                yield item
            elif lines := chat_chunk_lines(item, chunk, request.logprobs):
                yield lines

    # -- /v1/completions -------------------------------------------------------------------------------------

    def _num_choices(self, request: CompletionRequest) -> int:
        return len(request.prompts) * request.n

    async def _collect_completion(self, request: CompletionRequest, batches) -> dict:
        count = self._num_choices(request)
        got = await collect_choices(batches, count)
        echo = [request.prompts[i // request.n] if request.echo else "" for i in range(count)]
        choices = [
            CompletionChoice(index=i, text=got.texts[i], finish_reason=got.reasons[i],
                             logprobs=legacy_logprobs(got.logprobs[i], request.logprobs, len(echo[i]))
                             if request.logprobs is not None else None)
            for i in range(count)
        ]
        return CompletionResponse(model=request.model, choices=choices, usage=got.usage).model_dump()

    async def _completion_sse(self, request: CompletionRequest, batches) -> AsyncIterator[str]:
        chunk_id, created = completion_id("cmpl"), int(time.time())
        offsets = [0] * self._num_choices(request)

        def chunk(choices: list[CompletionChoice], usage=None) -> str:
            return sse_data(CompletionResponse(id=chunk_id, created=created, model=request.model,
                                               choices=choices, usage=usage))

        async for event in deltas_and_usage(batches, request, lambda usage: chunk([], usage=usage)):
            if isinstance(event, str):
                yield event
                continue
            logprobs = None
            if request.logprobs is not None:
                entries = event.logprobs or []
                # The echoed prompt comes first in the choice's first delta; token offsets follow it.
                start = offsets[event.index] + len(event.text) - sum(len(e.token) for e in entries)
                logprobs = legacy_logprobs(entries, request.logprobs, max(start, 0))
            offsets[event.index] += len(event.text)
            yield chunk([CompletionChoice(index=event.index, text=event.text, logprobs=logprobs,
                                          finish_reason=event.finish_reason)])
