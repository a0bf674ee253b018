"""The ingress router: OpenAI's HTTP API in front of the stage.

In: HTTP requests. Out: JSON bodies or server-sent events, and OpenAI-shaped errors for everything else.
It parses and validates (pydantic, `protocol.py`), checks the model name, and forwards the request to the
stage through a streaming deployment handle. The stage's first events are awaited before any byte is sent,
so errors found there (context too long, bad token ids) still get a real status code; after that, a failure
becomes one SSE error event and the stream closes.
"""


import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
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
    from_validation_error,
    sse_error_event,
)
from serve_app.models.checkpoint import resolve_checkpoint
from serve_app.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    ModelCard,
    ModelList,
    completion_id,
)
from serve_app.stage.chat import ChoiceDelta, StageEvent, UsageReport

logger = logging.getLogger(__name__)

app = FastAPI(title="llama-serve", description="OpenAI-compatible chat completions for Llama 2 chat models.")


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 answers, in OpenAI's error shape."""
    if exc.status_code == 405:
        return error_response(MethodNotAllowedError("Method not allowed for this route"))
    if exc.status_code == 404:
        return error_response(NotFoundError("Unknown route"))
    return error_response(InvalidRequestError(str(exc.detail)))


# Module-level helpers stand above the deployment class: `@serve.deployment` serializes the class when it is
# defined, and names defined after that point would be missing in the replica.


def root_cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, under Ray's wrapping (RayTaskError keeps it as `.cause`)."""
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def from_delta(event: ChoiceDelta, chunk, with_logprobs: bool) -> str:
    """One SSE line for a stage delta; a finishing delta carries its last text and its finish reason."""
    logprobs = ChoiceLogprobs(content=event.logprobs or []) if with_logprobs else None
    choices = []
    if event.text or (with_logprobs and event.logprobs):
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(content=event.text),
                                                 logprobs=logprobs))
    if event.finish_reason is not None:
        choices.append(ChatCompletionChunkChoice(index=event.index, delta=DeltaMessage(),
                                                 finish_reason=event.finish_reason))
    return "".join(chunk([choice]) for choice in choices)


async def _chain(first: list[StageEvent], rest) -> AsyncIterator[list[StageEvent]]:
    yield first
    async for batch in rest:
        yield batch


async def _parse_chat_request(http_request: Request) -> ChatCompletionRequest:
    raw = await http_request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"The body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: AppConfig, stage: DeploymentHandle, replica: DeploymentHandle):
        self.config = config
        self.stage = stage
        self.replica = replica
        self.model_card = ModelCard(id=config.model.served_model_id, owned_by=config.model.owned_by,
                                    root=resolve_checkpoint(config.model.source),
                                    max_model_len=config.model.max_model_len)

    @app.get("/health")
    async def health(self) -> Response:
        try:
            await self.replica.check_health.remote()
        except Exception:  # noqa: BLE001 - any failure means "not healthy", and says no more
            return error_response(ServiceUnavailableError("The model is not ready", retry_after=5))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(ModelList(data=[self.model_card]).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> JSONResponse:
        if model_id != self.model_card.id:
            return error_response(ModelNotFoundError(model_id))
        return JSONResponse(self.model_card.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, http_request: Request) -> Response:
        try:
            request = await _parse_chat_request(http_request)
            if request.model != self.model_card.id:
                raise ModelNotFoundError(request.model)
            events = self.stage.chat.options(stream=True).remote(request)
            first = await events.__anext__()
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error in one place
            return self._error(exc)
        if request.stream:
            return StreamingResponse(self._sse(request, events, first), media_type="text/event-stream")
        try:
            return JSONResponse(await self._collect(request, events, first))
        except Exception as exc:  # noqa: BLE001
            return self._error(exc)

    def _error(self, exc: BaseException) -> JSONResponse:
        cause = root_cause(exc)
        if not isinstance(cause, ServiceError):
            logger.error("request failed: %s", type(cause).__name__, exc_info=cause)
        return error_response(cause)

    async def _collect(self, request: ChatCompletionRequest, events, first: list[StageEvent]) -> dict:
        texts = [""] * request.n
        reasons: list[str | None] = [None] * request.n
        logprobs: list[list] = [[] for _ in range(request.n)]
        usage = None
        async for batch in _chain(first, events):
            for event in batch:
                if isinstance(event, UsageReport):
                    usage = event.usage
                    continue
                texts[event.index] += event.text
                reasons[event.index] = event.finish_reason or reasons[event.index]
                logprobs[event.index].extend(event.logprobs or [])
        choices = [
            ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=texts[i]),
                                 logprobs=ChoiceLogprobs(content=logprobs[i]) if request.logprobs else None,
                                 finish_reason=reasons[i])
            for i in range(request.n)
        ]
        return ChatCompletionResponse(model=request.model, choices=choices, usage=usage).model_dump()

    async def _sse(self, request: ChatCompletionRequest, events, first: list[StageEvent]) -> AsyncIterator[str]:
        chunk_id, created = completion_id(), int(time.time())

        def chunk(choices: list[ChatCompletionChunkChoice], usage=None) -> str:
            body = ChatCompletionChunk(id=chunk_id, created=created, model=request.model, choices=choices,
                                       usage=usage)
            return f"data: {json.dumps(body.model_dump(), ensure_ascii=False)}\n\n"

        try:
            yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(request.n)])
            async for batch in _chain(first, events):
                for event in batch:
                    if isinstance(event, UsageReport):
                        if request.stream_options is not None and request.stream_options.include_usage:
                            yield chunk([], usage=event.usage)
                        continue
                    if lines := from_delta(event, chunk, request.logprobs):
                        yield lines
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, then close
            cause = root_cause(exc)
            if not isinstance(cause, ServiceError):
                logger.error("stream failed: %s", type(cause).__name__, exc_info=cause)
            yield sse_error_event(cause)
        finally:
            events.cancel()  # a client that went away must not keep the engine busy
