"""The API's edge, before any route runs: API keys, body size, the request body's parsing, error answers.

`ApiEdge` is plain ASGI middleware: it checks the API key (every path but exactly `/health` and
`/health/live`; deny by default when keys are configured) and refuses bodies over `max_body_bytes` without buffering them. `parse_body`
turns a route's body into a validated request model (`protocol.py`), with OpenAI-shaped 400s for anything
else. `error_response` is every error's HTTP answer, as `errors.http_error` maps it.
"""

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import API_KEYS_ENV, API_KEYS_FILE_ENV, ApiConfig
from serve_app.errors import (
    AuthenticationError,
    InvalidRequestError,
    PayloadTooLargeError,
    from_validation_error,
    http_error,
)

HEALTH_PATH = "/health"
LIVENESS_PATH = "/health/live"
# What a load balancer or a Kubernetes probe calls: never behind an API key.
OPEN_PATHS = frozenset({HEALTH_PATH, LIVENESS_PATH})


def error_response(exc: BaseException) -> JSONResponse:
    """The HTTP response for `exc` when nothing has been sent yet: its status, body and Retry-After."""
    error = http_error(exc)
    return JSONResponse(error.body, status_code=error.status_code, headers=error.headers)


def resolve_api_keys(api: ApiConfig, environ: Mapping[str, str]) -> tuple[str, ...]:
    """The config's keys, the comma-separated keys of `LLAMA_SERVE_API_KEYS`, and the lines of the file
    `LLAMA_SERVE_API_KEYS_FILE` names (a mounted secret), without blanks. A named file that cannot be read
    fails the ingress's start: an API meant to be closed must not come up open."""
    from_env = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",")]
    from_file = []
    if environ.get(API_KEYS_FILE_ENV):
        with open(environ[API_KEYS_FILE_ENV], encoding="utf-8") as keys_file:
            from_file = [line.strip() for line in keys_file]
    keys = tuple(dict.fromkeys(key for key in [*api.api_keys, *from_env, *from_file] if key))
    if api.require_api_keys and not keys:
        raise ValueError(f"api.require_api_keys is set but no API key was given: set {API_KEYS_ENV} or "
                         f"{API_KEYS_FILE_ENV} (a mounted secret), or api.api_keys")
    return keys


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
    """ASGI middleware at the API's edge: API keys (all paths but exactly `/health` and `/health/live`) and
    body size.

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
        if self.digests and relative_path(scope) not in OPEN_PATHS:
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


def configure_api(api: FastAPI, config: ApiConfig, max_body_bytes: int, environ: Mapping[str, str]) -> FastAPI:
    """Add the edge middleware (and CORS, only when origins are configured) to the app, once."""
    if getattr(api.state, "edge_configured", False):
        return api
    api.add_middleware(ApiEdge, api_keys=resolve_api_keys(config, environ), max_body_bytes=max_body_bytes)
    if config.cors_allow_origins:  # added last, so it runs first: preflights carry no API key
        api.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    api.state.edge_configured = True
    return api


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
