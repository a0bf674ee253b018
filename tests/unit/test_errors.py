"""Unit tests of the error mapping: typed errors to OpenAI error bodies, HTTP statuses and SSE events."""

import json

import pytest
from pydantic import ValidationError

from serve_app.errors import (
    AuthenticationError,
    ContextLengthExceededError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceError,
    ServiceUnavailableError,
    error_body,
    from_validation_error,
    sse_error_event,
    to_service_error,
)
from serve_app.ingress.edge import error_response
from serve_app.protocol import ChatCompletionRequest

ERROR_KEYS = {"message", "type", "param", "code"}


def validation_error(body: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return info.value


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (InvalidRequestError("bad"), 400, "invalid_request_error", None),
        (
            ContextLengthExceededError(4000, 200, 4096),
            400,
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (AuthenticationError("Incorrect API key provided."), 401, "invalid_request_error", "invalid_api_key"),
        (ModelNotFoundError("gpt-4"), 404, "invalid_request_error", "model_not_found"),
        (NotFoundError("Invalid URL (GET /v1/nope)"), 404, "invalid_request_error", None),
        (MethodNotAllowedError("Method Not Allowed"), 405, "invalid_request_error", None),
        (PayloadTooLargeError("Request body too large"), 413, "invalid_request_error", None),
        (RateLimitError("Slow down", retry_after=2), 429, "rate_limit_error", "rate_limit_exceeded"),
        (ServiceUnavailableError("Overloaded", retry_after=1), 503, "server_error", "service_unavailable"),
        (InternalError(), 500, "server_error", "internal_error"),
    ],
)
def test_each_error_maps_to_its_status_and_body(
    error: ServiceError, status: int, error_type: str, code: str | None
) -> None:
    response = error_response(error)
    assert response.status_code == status
    body = json.loads(response.body)
    assert body == error_body(error)
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == error_type
    assert body["error"]["code"] == code
    assert body["error"]["message"] == error.message
    assert body["error"]["param"] == error.param


def test_param_is_sent() -> None:
    body = error_body(InvalidRequestError("Bad value", param="temperature"))
    assert body == {
        "error": {
            "message": "Bad value",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    assert error_body(ModelNotFoundError("gpt-4"))["error"]["param"] == "model"


def test_context_length_message_names_both_counts() -> None:
    error = ContextLengthExceededError(prompt_tokens=4000, max_tokens=200, max_model_len=4096)
    assert error.message == (
        "This model's maximum context length is 4096 tokens. However, you requested 4200 tokens (4000 in "
        "the messages, 200 in the completion). Please reduce the length of the messages or completion."
    )
    assert error.param == "messages"
    assert (error.prompt_tokens, error.max_tokens, error.max_model_len) == (4000, 200, 4096)


def test_context_length_message_without_max_tokens() -> None:
    error = ContextLengthExceededError(prompt_tokens=5000, max_tokens=None, max_model_len=4096)
    assert error.message == (
        "This model's maximum context length is 4096 tokens. However, your messages resulted in 5000 tokens, "
        "leaving no room for the completion. Please reduce the length of the messages."
    )


def test_retry_after_header() -> None:
    assert error_response(RateLimitError("Slow down", retry_after=1.2)).headers["retry-after"] == "2"
    assert error_response(ServiceUnavailableError("Busy", retry_after=5)).headers["retry-after"] == "5"
    assert "retry-after" not in error_response(ServiceUnavailableError("Busy")).headers
    assert "retry-after" not in error_response(InvalidRequestError("bad")).headers


def test_unknown_exceptions_become_generic_internal_errors() -> None:
    try:
        raise RuntimeError("CUDA error: secret internals at /opt/engine.py:42")
    except RuntimeError as exc:
        response = error_response(exc)
        event = sse_error_event(exc)
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body == error_body(InternalError())
    for text in (response.body.decode(), event):
        assert "CUDA" not in text
        assert "Traceback" not in text
        assert "engine.py" not in text


def test_validation_errors_map_to_invalid_request() -> None:
    exc = validation_error({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3})
    assert isinstance(to_service_error(exc), InvalidRequestError)
    response = error_response(exc)
    assert response.status_code == 400
    assert json.loads(response.body)["error"]["param"] == "temperature"


def test_validation_message_is_readable() -> None:
    error = from_validation_error(
        validation_error({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3})
    )
    assert error.message == "Invalid 'temperature': Input should be less than or equal to 2 (got 3)."
    assert error.param == "temperature"


def test_validation_message_for_nested_field() -> None:
    error = from_validation_error(
        validation_error({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    )
    assert error.param == "messages.0.role"
    assert error.message.startswith("Invalid 'messages.0.role': Input should be 'system', 'user'")
    assert error.message.endswith('(got "robot").')


def test_validation_message_for_missing_field_counts_the_rest() -> None:
    error = from_validation_error(validation_error({}))
    assert error.param == "model"
    assert error.message == "Missing required parameter: 'model'. (1 more problem in the request.)"


def test_validation_message_does_not_echo_long_inputs() -> None:
    long_text = "x" * 1000
    error = from_validation_error(validation_error({"model": "m", "messages": long_text}))
    assert error.param == "messages"
    assert long_text not in error.message


def test_cross_field_errors_name_their_field() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}
    error = from_validation_error(validation_error(body))
    assert error.param == "stream_options"
    assert error.message == "Invalid 'stream_options': Only allowed when stream is true."


def test_invalid_json_has_no_param() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json("{not json")
    error = from_validation_error(info.value)
    assert error.param is None
    assert error.message.startswith("Invalid request body: Invalid JSON")


def test_sse_error_event() -> None:
    event = sse_error_event(ServiceUnavailableError("The engine stopped"))
    assert event.startswith("data: ")
    assert event.endswith("\n\n")
    assert event.count("\n") == 2
    assert json.loads(event.removeprefix("data: ")) == {
        "error": {
            "message": "The engine stopped",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }


def test_errors_survive_pickling_between_deployments():
    """The stage's errors reach the ingress through Ray, i.e. through pickle, with their fields intact."""
    import pickle

    from serve_app.errors import ContextLengthExceededError, RateLimitError

    error = pickle.loads(pickle.dumps(ContextLengthExceededError(4000, 200, 4096)))
    assert isinstance(error, ContextLengthExceededError)
    assert error_body(error)["error"]["code"] == "context_length_exceeded"
    assert "4200" in error.message and "4000" in error.message
    assert pickle.loads(pickle.dumps(RateLimitError("slow down", retry_after=2))).retry_after == 2


def test_a_replica_that_died_under_a_request_is_a_503_to_retry() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    for exc in (ActorDiedError(), ActorUnavailableError("the actor is restarting", b"\0" * 16)):
        error = to_service_error(exc)
        assert isinstance(error, ServiceUnavailableError) and error.retry_after is not None
        assert error_response(error).status_code == 503
