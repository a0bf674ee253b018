"""The ingress router's Serve deployment: OpenAI's HTTP API in front of the stage.

In: HTTP requests. Out: JSON bodies or server-sent events, and OpenAI-shaped errors for everything else.

Before any route runs, `edge.ApiEdge` checks the API key and caps the body size. Routes parse and validate
(`edge.parse_body`), check the model name, and forward the request to the stage through a streaming
deployment handle: the stage is the only deployment the ingress calls. The stage's first events are awaited
before any byte is sent, so errors found there (context too long, engine overloaded) still get a real status
code; after that, a failure becomes one SSE error event and the stream closes. `responses.py` turns the
stage's events into OpenAI's bodies and chunks. Every failure, from whichever layer, is classified once
(`_service_error`: logged when unexpected) and mapped by `errors.py`.

`/health` and `/metrics` read the replica groups' status from the application's status board
(`status_board.py`), never by a call that could queue behind the streams.
"""

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import status_board
from serve_app.channel import ChannelClient
from serve_app.config import AppConfig
from serve_app.errors import (
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
    ServiceError,
    ServiceUnavailableError,
    sse_error_event,
    to_service_error,
)
from serve_app.ingress.drain import DrainGate, DrainState, DrainWatch
from serve_app.ingress.edge import HEALTH_PATH, LIVENESS_PATH, configure_api, error_response, parse_body
from serve_app.ingress.responses import chat_body, chat_sse, completion_body, completion_sse
from serve_app.metrics import CONTENT_TYPE, RayRequestExport, RequestMeter, ServiceMetrics
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from serve_app.stage.processor import StageEvent

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The status board is read at most this often per ingress replica, and a read that takes longer than the
# timeout leaves the last one in place: /health and /metrics answer at once whatever the load.
BOARD_MAX_AGE_S = 0.5
BOARD_READ_TIMEOUT_S = 1.0


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
    return error_response(_service_error(exc))


def _service_error(exc: BaseException) -> ServiceError:
    """What a failure from any layer means to the client: the error a deployment raised, under Ray's
    wrapping (RayTaskError keeps it as `.cause`), as a `ServiceError`. Unexpected failures (anything that
    maps to a 500) are logged here, with their traceback, and only here."""
    cause = exc
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    error = to_service_error(cause)
    if isinstance(error, InternalError) and not isinstance(cause, ServiceError):
        logger.error("request failed: %s", type(cause).__name__, exc_info=cause)
    return error


async def _metered(meter: RequestMeter, first: list[StageEvent], rest) -> AsyncIterator[list[StageEvent]]:
    meter.observe(first)
    yield first
    async for batch in rest:
        meter.observe(batch)
        yield batch


class Deadline:
    """A request's time limits: for its first token, and for the whole of it."""

    def __init__(self, total_s: float | None):
        self.total_s = total_s
        self.ends_at = time.monotonic() + total_s if total_s is not None else None

    def remaining_s(self) -> float | None:
        return None if self.ends_at is None else max(0.0, self.ends_at - time.monotonic())

    async def first_token(self, first: Awaitable[T], first_token_s: float | None) -> T:
        """`first`, or `RequestTimeoutError` once the first-token or the total deadline passes."""
        limits = [limit for limit in (first_token_s, self.remaining_s()) if limit is not None]
        if not limits:
            return await first
        try:
            return await asyncio.wait_for(first, min(limits))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"The request got no first token within {min(limits):.0f} s; the service "
                                      "is busy. Please retry.", retry_after=1.0) from None

    async def bound(self, batches: AsyncIterator[T]) -> AsyncIterator[T]:
        """`batches`, ended by `RequestTimeoutError` once the total deadline passes."""
        while True:
            remaining = self.remaining_s()
            try:
                batch = await (anext(batches) if remaining is None else asyncio.wait_for(anext(batches), remaining))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise RequestTimeoutError(f"The request did not finish within its {self.total_s:g} s limit "
                                          "(api.request_timeout_s).") from None
            yield batch


# What nginx logs for a request whose client closed the connection before the answer; nobody receives it.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


async def _unless_disconnected(http_request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client goes away first: then `work` is cancelled (and with it the request's
    stream down to the engine) and `ClientDisconnected` raised. Starlette does not cancel a route whose
    client left; without this, an abandoned non-streamed request would run to its last token."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(http_request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def _disconnect(http_request: Request) -> None:
    """Returns when the client has gone (the body has been read, so the next ASGI message says so)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _json_with_keepalive(body: Awaitable[dict[str, Any]], events, meter: RequestMeter,
                               interval_s: float) -> AsyncIterator[bytes]:
    """A non-streamed answer as a body that starts at once: a space every `interval_s` until the JSON. Behind
    HAProxy, which passes a client's close on only when it writes, this is how a client's leaving reaches us
    (Starlette then cancels this generator, and with it the engine request)."""
    task = asyncio.ensure_future(body)
    status = 200
    try:
        while not (await asyncio.wait({task}, timeout=interval_s))[0]:
            yield b" "
        try:
            yield JSONResponse(task.result()).body
        except Exception as exc:  # noqa: BLE001 - the status is sent: the error can only be the body
            response = error_response(_service_error(exc))
            status = response.status_code
            yield response.body
    finally:
        task.cancel()
        events.cancel()  # a client that went away must not keep the engine busy
        meter.finish(status if task.done() and not task.cancelled() else CLIENT_CLOSED_REQUEST)


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
    def __init__(self, config: AppConfig, stage: DeploymentHandle):
        self.config = config
        self.stage = ChannelClient(stage)
        self.metrics = ServiceMetrics(RayRequestExport())
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.replica = context.replica_id.unique_id
        self.drain = DrainState()
        self.drain_watch = DrainWatch(self.drain, self._drain_cut_at, self._report_draining).start()
        self._groups: list[status_board.GroupStatus] | None = None  # the board, as last read
        self._groups_read_at = float("-inf")
        self.model_card = ModelCard(id=config.model.served_model_id, owned_by=config.model.owned_by,
                                    root=resolve_checkpoint(config.model.source),
                                    max_model_len=config.model.max_model_len)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this in the replica, after __init__: the edge middleware needs this replica's config
        # and environment (API keys), which the module-level app cannot know. The drain gate runs inside the
        # edge: a request without a valid key is refused for that first, draining or not.
        if not getattr(self.app.state, "edge_configured", False):
            self.app.add_middleware(DrainGate, state=self.drain)
        return configure_api(self.app, self.config.api, self.config.max_body_bytes, os.environ)

    def _drain_cut_at(self) -> float | None:
        notice = status_board.read_drain_notice(self.app_name)
        return notice.cut_at if notice is not None else None

    def _report_draining(self, in_flight: int) -> None:
        status_board.report_draining(self.app_name, status_board.DrainReport(self.replica, in_flight, time.time()))

    def __del__(self) -> None:
        watch = getattr(self, "drain_watch", None)
        if watch is not None:
            watch.stop()

    async def _replica_groups(self) -> list[status_board.GroupStatus] | None:
        """The replica groups on the status board, read at most every `BOARD_MAX_AGE_S`; None until a first
        read has succeeded."""
        if time.monotonic() - self._groups_read_at >= BOARD_MAX_AGE_S:
            self._groups_read_at = time.monotonic()
            try:
                self._groups = await asyncio.wait_for(asyncio.to_thread(status_board.read_board, self.app_name),
                                                      BOARD_READ_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the last reading stays until one succeeds
                logger.warning("reading the status board failed: %s", type(exc).__name__)
        return self._groups

    @app.get(LIVENESS_PATH)
    async def liveness(self) -> JSONResponse:
        """Alive while this ingress replica answers HTTP: what a liveness probe restarts on, never the model."""
        return JSONResponse({"status": "alive"})

    @app.get(HEALTH_PATH, responses=_error_responses(503))
    async def health(self) -> Response:
        """Ready while some replica group of this application can serve: what a load balancer and a readiness
        probe call."""
        groups = await self._replica_groups() or []
        healthy = sum(group.healthy for group in groups)
        if not healthy:
            return error_response(ServiceUnavailableError("The model is not ready", retry_after=5))
        return JSONResponse({"status": "ok", "replica_groups": {"healthy": healthy, "total": len(groups)}})

    @app.get("/metrics", response_class=Response, responses=_GET_ERRORS)
    async def prometheus_metrics(self) -> Response:
        groups = await self._replica_groups()
        if groups is not None:
            self.metrics.set_groups(groups)
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
        deadline = Deadline(self.config.api.request_timeout_s)
        events = None
        try:
            request = await parse_body(http_request, model)
            if request.model != self.model_card.id:
                raise ModelNotFoundError(request.model)
            events = self.stage.stream(method, request)
            first = await _unless_disconnected(http_request, deadline.first_token(
                events.__anext__(), self.config.api.first_token_timeout_s))
        except ClientDisconnected:
            events.cancel()  # a client that went away must not keep the engine busy
            meter.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error in one place
            if events is not None:  # e.g. no first token in time: the work must not run on
                events.cancel()
            return self._error_response(exc, meter)
        except BaseException:  # cancelled (client gone) while waiting for the first token
            if events is not None:
                events.cancel()
            raise
        batches = deadline.bound(_metered(meter, first, events))
        sse = chat_sse if method == "chat" else completion_sse
        if request.stream:  # Starlette's streaming response watches for the client going away itself
            return StreamingResponse(self._stream(sse(request, batches), events, meter),
                                     media_type="text/event-stream")
        collect = chat_body if method == "chat" else completion_body
        keepalive_s = self.config.api.non_stream_keepalive_s
        if keepalive_s is not None:
            return StreamingResponse(_json_with_keepalive(collect(request, batches), events, meter, keepalive_s),
                                     media_type="application/json")
        try:
            body = await _unless_disconnected(http_request, collect(request, batches))
        except ClientDisconnected:
            meter.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # noqa: BLE001
            return self._error_response(exc, meter)
        finally:
            events.cancel()  # a client that went away must not keep the engine busy
        meter.finish(200)
        return JSONResponse(body)

    @staticmethod
    def _error_response(exc: BaseException, meter: RequestMeter) -> JSONResponse:
        response = error_response(_service_error(exc))
        meter.finish(response.status_code)
        return response

    async def _stream(self, lines: AsyncIterator[str], events, meter: RequestMeter) -> AsyncIterator[str]:
        """The SSE body: the route's lines and `[DONE]`, or one error event once the stream has begun."""
        status = 200
        try:
            async for line in lines:
                yield line
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error in one place
            error = _service_error(exc)
            status = error.status_code
            yield sse_error_event(error)
        finally:
            events.cancel()  # a client that went away must not keep the engine busy
            meter.finish(status)
