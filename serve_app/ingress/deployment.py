"""The ingress router's Serve deployment: OpenAI's HTTP API in front of the stage.

In: HTTP requests. Out: JSON bodies or server-sent events, and OpenAI-shaped errors for everything else.

Before any route runs, `edge.ApiEdge` checks the API key and caps the body size. Routes parse and validate
(`edge.parse_body`), check the model name, and forward the request to the stage through a streaming
deployment handle. The stage's first events are awaited before any byte is sent, so errors found there
(context too long, engine overloaded) still get a real status code; after that, a failure becomes one SSE
error event and the stream closes. `responses.py` turns the stage's events into OpenAI's bodies and chunks.
Every error, from whichever layer, goes through `errors.error_response`.
"""

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.config import AppConfig
from serve_app.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    ServiceError,
    ServiceUnavailableError,
    error_response,
    sse_error_event,
    to_service_error,
)
from serve_app.ingress.edge import HEALTH_PATH, configure_api, parse_body
from serve_app.ingress.responses import chat_body, chat_sse, completion_body, completion_sse
from serve_app.metrics import CONTENT_TYPE, RequestMeter, ServiceMetrics
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
from serve_app.stage.chat import StageEvent

logger = logging.getLogger(__name__)

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


def root_cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, under Ray's wrapping (RayTaskError keeps it as `.cause`)."""
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


async def _metered(meter: RequestMeter, first: list[StageEvent], rest) -> AsyncIterator[list[StageEvent]]:
    meter.observe(first)
    yield first
    async for batch in rest:
        meter.observe(batch)
        yield batch


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
        sse = chat_sse if method == "chat" else completion_sse
        if request.stream:
            return StreamingResponse(self._stream(sse(request, batches), events, meter),
                                     media_type="text/event-stream")
        collect = chat_body if method == "chat" else completion_body
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
