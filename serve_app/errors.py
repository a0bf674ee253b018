"""Typed errors inside the service, and the one place that turns them into OpenAI error bodies and HTTP.

Code that finds a problem raises a `ServiceError` subclass, in whichever process it runs (the engine's
included: errors are pickled across process boundaries as themselves). The ingress maps whatever it caught
with `http_error()` before the first byte of a response, or `sse_error_event()` once a stream has begun.
Each subclass carries its HTTP status, OpenAI error `type` and `code`. A pydantic `ValidationError` becomes
an `InvalidRequestError` naming the offending field; any other exception becomes an `InternalError` whose
body says nothing about the failure, so tracebacks and internals never reach a client (log them instead).
"""

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError

from serve_app.protocol import ErrorBody, ErrorResponse


class ServiceError(Exception):
    """Base of the errors a client can be told about: a message, and the request field it concerns."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retry_after: float | None = None  # seconds; sent as the Retry-After header when set

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Errors cross process boundaries (stage -> ingress through Ray). The default pickling re-calls
        # __init__ with `args`, which breaks for subclasses with other constructors; rebuild from state.
        return _rebuild_service_error, (type(self), self.args, self.__dict__)


def _rebuild_service_error(cls: type[ServiceError], args: tuple, state: dict[str, Any]) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidRequestError(ServiceError):
    """The request is malformed or asks for something this service cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the requested completion do not fit in the model's context."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                 *, param: str = "messages", at_least: bool = False) -> None:
        """`at_least`: `prompt_tokens` is a lower bound (the prompt was refused by its length alone)."""
        what = "messages" if param == "messages" else "prompt"
        if max_tokens is None:
            # Without max_tokens the completion gets the rest of the context, so only the prompt can be
            # too long: it leaves no room at all.
            count = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
            detail = (
                f"However, your {what} resulted in {count} tokens, leaving no room for the "
                f"completion. Please reduce the length of the {what}."
            )
        else:
            detail = (
                f"However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"{what}, {max_tokens} in the completion). Please reduce the length of the {what} "
                "or completion."
            )
        super().__init__(f"This model's maximum context length is {max_model_len} tokens. {detail}", param=param)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class InvalidSchemaError(InvalidRequestError):
    """A JSON Schema (`response_format`'s, or a tool's parameters) that output cannot be constrained to: not a
    schema, or using a feature the grammar library does not implement, which the message names."""

    def __init__(self, owner: str, detail: str, *, param: str) -> None:
        super().__init__(f"Invalid schema for {owner}: {detail}", param=param)


class GrammarUnavailableError(ServiceError):
    """A request needs constrained decoding (structured outputs, tool calls) and this server cannot do it:
    the grammar library is not installed where it runs. A retry would meet the same server, so no
    Retry-After."""

    status_code = 503
    error_type = "server_error"
    code = "structured_outputs_unavailable"

    def __init__(self) -> None:
        super().__init__("This server cannot constrain its output: structured outputs (response_format "
                         "json_object or json_schema) and tool calls need the 'llguidance' package, which is "
                         "not installed here.")


class AuthenticationError(ServiceError):
    """The API key is missing or wrong. The message shows at most the key's ends, as OpenAI does."""

    status_code = 401
    error_type = "invalid_request_error"  # what OpenAI sends for a bad key
    code = "invalid_api_key"

    @classmethod
    def for_key(cls, key: str | None) -> "AuthenticationError":
        if not key:
            return cls("You didn't provide an API key. Provide it in the Authorization header as "
                       "'Authorization: Bearer YOUR_KEY'.")
        return cls(f"Incorrect API key provided: {mask_key(key)}.")


def mask_key(key: str) -> str:
    """`sk-a****wxyz`: enough to tell keys apart, never enough to use one. Short keys are fully masked."""
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:4]}{'*' * (len(key) - 8)}{key[-4:]}"


class ModelNotFoundError(ServiceError):
    """The request names a model this deployment does not serve."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model")


class NotFoundError(ServiceError):
    """No route matches the URL."""

    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowedError(ServiceError):
    """The route exists but not for this HTTP method."""

    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLargeError(ServiceError):
    """The request body is larger than the ingress accepts."""

    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(ServiceError):
    """The client sent more than its share; it may retry after `retry_after` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(RateLimitError):
    """The engine's waiting queue is full; the request was refused before any work was done."""

    code = "overloaded"


class ServiceUnavailableError(ServiceError):
    """The service cannot take the request now (overloaded, starting, draining)."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(ServiceError):
    """A request outran one of its deadlines (`api.first_token_timeout_s`, `api.request_timeout_s`); its work
    was cancelled."""

    status_code = 504
    error_type = "server_error"
    code = "request_timeout"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(ServiceUnavailableError):
    """A replica group's engine has stopped or failed: the group is unhealthy and Serve replaces it. A retry
    reaches another group, or this one's replacement."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=1.0)


class InternalError(ServiceError):
    """A failure of the service itself. The body stays generic; the cause belongs in the logs."""

    status_code = 500
    error_type = "server_error"
    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("The server had an error while processing your request.")


def from_validation_error(exc: ValidationError) -> InvalidRequestError:
    """The first problem pydantic found, as an error naming its field (`messages.0.role`, `temperature`)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = [str(part) for part in first["loc"]]
    # Errors raised by the protocol's own validators carry the field they concern, relative to where they
    # were raised (a model validator has no location of its own).
    extra = (first.get("ctx") or {}).get("param")
    if extra:
        path.append(extra)
    param = ".".join(path) or None

    if param is None:
        message = f"Invalid request body: {first['msg']}."
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid '{param}': {first['msg']}{_shown_input(first['input'])}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in the request.)"
    return InvalidRequestError(message, param=param)


def _shown_input(value: Any) -> str:
    """` (got 3)` for a short scalar input; nothing for long or structured ones, which would flood the
    message (and echo the conversation back)."""
    if isinstance(value, bool | int | float | str):
        shown = json.dumps(value)
        if len(shown) <= 40:
            return f" (got {shown})"
    return ""


BACKPRESSURE_RETRY_AFTER_S = 1.0


# ray.exceptions.RayActorError (and its ActorDiedError) and ActorUnavailableError, by name like BackPressureError.
RAY_ACTOR_GONE = frozenset({"RayActorError", "ActorUnavailableError"})


def is_serve_refusal(exc: BaseException) -> bool:
    """Ray Serve refused the call before any replica took it (`ray.serve.exceptions.BackPressureError`)."""
    return type(exc).__name__ == "BackPressureError"


def to_service_error(exc: BaseException) -> ServiceError:
    """The typed error that `exc` stands for; unknown exceptions become an `InternalError`.

    Ray Serve's own refusal (a deployment's `max_queued_requests` reached) is an overload, not a bug: 503
    with Retry-After, so clients back off instead of reporting a server fault. It is matched by name
    (`is_serve_refusal`), so that the engine's processes never import Ray to map an error.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if is_serve_refusal(exc):
        return ServiceUnavailableError("The server is overloaded. Please retry shortly.",
                                       retry_after=BACKPRESSURE_RETRY_AFTER_S)
    if RAY_ACTOR_GONE & {cls.__name__ for cls in type(exc).__mro__}:
        # A replica that died under a request (its node lost, the process killed): Serve starts another, so a
        # retry is served; it is not the request's fault nor a bug of ours.
        return ServiceUnavailableError("A replica of the service failed while serving this request. Please "
                                       "retry.", retry_after=BACKPRESSURE_RETRY_AFTER_S)
    return InternalError()


def error_body(exc: BaseException) -> dict[str, Any]:
    """OpenAI's `{"error": {"message", "type", "param", "code"}}` for `exc`."""
    error = to_service_error(exc)
    body = ErrorBody(message=error.message, type=error.error_type, param=error.param, code=error.code)
    return ErrorResponse(error=body).model_dump()


@dataclass(frozen=True)
class HttpError:
    """What to answer for an error when nothing has been sent yet: status, OpenAI body, headers."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


def http_error(exc: BaseException) -> HttpError:
    error = to_service_error(exc)
    headers = {}
    if error.retry_after is not None:
        # Retry-After takes whole seconds; round up so that a client never retries too early.
        headers["Retry-After"] = str(math.ceil(error.retry_after))
    return HttpError(error.status_code, error_body(error), headers)


def sse_error_event(exc: BaseException) -> str:
    """One server-sent event reporting `exc` after a stream has begun; the stream ends after it."""
    return f"data: {json.dumps(error_body(exc))}\n\n"
