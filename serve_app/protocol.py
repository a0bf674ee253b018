"""OpenAI Chat Completions wire format: the request the ingress parses and the bodies it sends back.

Pydantic models that mirror OpenAI's `/v1/chat/completions` and `/v1/models` field by field, with the ranges
and defaults of the hosted Llama 2 chat API this service stands in for. Request models validate strictly (a
string is not a number, `true` is not an integer) but ignore fields they do not know, because the official
clients send more than this service uses. Each request translates itself into engine terms with
`ChatCompletionRequest.to_sampling_params()`.

Rules that span several fields raise errors carrying a `param` in their context, so that
`serve_app.errors.from_validation_error` can name the offending field even though pydantic reports model
level errors without a location.
"""

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serve_app.engine.sampling_params import SamplingParams

MAX_N = 128
"""The schema's ceiling on `n`; the deployment's own limit is `api.max_n` (default 8), checked by the stage."""

_REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _invalid(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error whose `param` (relative to where it is raised) the error mapper appends."""
    return PydanticCustomError("invalid_request", message, {"param": param} if param else None)


# ---------------------------------------------------------------------------------------------- request


class FunctionCall(BaseModel):
    """The function an assistant message called, with its arguments as a JSON string."""

    model_config = _REQUEST_CONFIG

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call to a tool, as carried by an assistant message."""

    model_config = _REQUEST_CONFIG

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of the conversation. List content is joined into one string on the way in."""

    model_config = _REQUEST_CONFIG

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(
        None,
        description="Text, or a list of {'type': 'text', 'text': ...} parts joined by newlines; None only "
        "for an assistant message that carries tool_calls.",
    )
    name: str | None = Field(None, description="Optional name of the participant; not shown to the model.")
    tool_call_id: str | None = Field(None, description="For role 'tool': the call this message answers.")
    tool_calls: list[ToolCall] | None = Field(None, description="For role 'assistant': the tools it called.")

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid("Only content parts of type 'text' are supported", param=str(i))
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid("A text content part needs a string 'text'", param=f"{i}.text")
            texts.append(text)
        # Separate parts by a newline (as vLLM does) so words at a part boundary do not run together.
        return "\n".join(texts)

    @model_validator(mode="after")
    def _check_role_fields(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise _invalid("Only assistant messages may carry tool_calls", param="tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise _invalid("Required unless an assistant message carries tool_calls", param="content")
        if self.role == "tool" and self.tool_call_id is None:
            raise _invalid("Required for messages with role 'tool'", param="tool_call_id")
        return self


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, and a JSON Schema of its arguments."""

    model_config = _REQUEST_CONFIG

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """A tool offered to the model; OpenAI knows only function tools."""

    model_config = _REQUEST_CONFIG

    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(BaseModel):
    """Options that only apply to a streamed response."""

    model_config = _REQUEST_CONFIG

    include_usage: bool = Field(
        False, description="Send one last chunk with empty choices and the usage of the whole request."
    )


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the JSON Schema the output must satisfy, and its name."""

    model_config = ConfigDict(**_REQUEST_CONFIG, populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="The format's name: letters, digits, "
                      "underscores and dashes, at most 64.")
    description: str | None = Field(None, description="What the format is for; not shown to the model.")
    json_schema: dict[str, Any] = Field(
        alias="schema", description="A JSON Schema object. Output is decoded under it, so it always "
        "validates (unless max_tokens cuts it); a feature that cannot be enforced is refused with a 400 "
        "naming it.")
    strict: bool | None = Field(
        None, description="Accepted for compatibility: output is constrained to the schema either way.")


class ResponseFormat(BaseModel):
    """The output format: free text, any JSON object, or JSON that validates against a schema. The JSON
    formats are enforced while decoding (`stage/structured_output.py`), not asked of the model."""

    model_config = _REQUEST_CONFIG

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type 'json_schema' only.")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise _invalid("Required when type is 'json_schema'", param="json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise _invalid("Only allowed when type is 'json_schema'", param="json_schema")
        return self


class ToolChoiceFunction(BaseModel):
    model_config = _REQUEST_CONFIG

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the one function the model must call."""

    model_config = _REQUEST_CONFIG

    type: Literal["function"]
    function: ToolChoiceFunction


class SamplingRequest(BaseModel):
    """The fields `/v1/chat/completions` and `/v1/completions` share: model, sampling, stop, n, streaming."""

    model_config = _REQUEST_CONFIG

    model: str = Field(description="Name of the model to use; must be the one this deployment serves.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep this probability mass.")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop tokens below this fraction of the top token's probability."
    )
    top_k: int = Field(0, ge=0, le=999, description="Sample from the best k tokens; 0 means off.")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Additive penalty on tokens that appeared at all."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Additive penalty per earlier occurrence of a token."
    )
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=5.0, description="Multiplicative penalty on repeated tokens; 1 means off."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of this request's own generator.")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        max_length=4,
        description="Up to 4 strings that end the completion (not included in it); a single string is "
        "stored as a one-element list.",
    )
    n: int = Field(1, ge=1, le=MAX_N, description="How many completions to generate for the input.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None,
        description="Added to the logits of the given token ids (decimal strings, as JSON keys must be) "
        "before sampling. Ids past the vocabulary are the engine's to reject: this model does not know "
        "the vocabulary size.",
    )
    user: str | None = Field(None, description="An end-user identifier; without `prompt_cache_key`, a user's "
                             "requests go to one replica group, where their earlier turns' KV cache is.")
    prompt_cache_key: str | None = Field(
        None, max_length=1024, description="Requests with the same key go to the same replica group, so that "
        "a conversation's turns find their prefix in its cache (docs/routing.md). Without it, the `user` and "
        "then the conversation's opening turn serve as the key.")
    stream: bool = Field(False, description="Send the completion as server-sent events, chunk by chunk.")
    stream_options: StreamOptions | None = Field(None, description="Only allowed when stream is true.")
    response_format: ResponseFormat | None = Field(
        None, description="{'type': 'text'} (the default), {'type': 'json_object'}, or {'type': "
        "'json_schema', 'json_schema': {'name', 'schema', 'strict'}}; the JSON formats are enforced while "
        "decoding.")

    # Resolved by subclasses: whether to return logprobs, and how many alternatives per position.
    def _logprobs(self) -> tuple[bool, int]:
        return False, 0

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's spec makes the optional fields nullable, null meaning "the default", and some clients
        # send it; the typed fields would otherwise reject `"temperature": null`.
        if not isinstance(data, dict):
            return data
        defaulted = {name for name, info in cls.model_fields.items() if not info.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise _invalid("A stop string must not be empty")
            return [value]
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            # isascii() too, because str.isdigit() also accepts digits such as '²' that int() refuses.
            if not (key.isascii() and key.isdigit()):
                raise _invalid("Keys must be token ids (non-negative integers)", param=key)
        return value

    @model_validator(mode="after")
    def _check_streaming(self) -> "SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise _invalid("Only allowed when stream is true", param="stream_options")
        return self

    @property
    def wants_json(self) -> bool:
        """Whether the output is constrained to JSON (`response_format` json_object or json_schema)."""
        return self.response_format is not None and self.response_format.type != "text"

    def to_sampling_params(self, max_tokens: int, grammar: str | None = None) -> SamplingParams:
        """The engine's view of this request, for one of its `n` sequences.

        `max_tokens` is the resolved budget: the caller caps `self.max_tokens` (or, when that is None,
        fills in) the room the prompt leaves in the context. `grammar`: what the output must match, as the
        stage built it from `response_format` and the tools (`stage/structured_output.py`).
        """
        logprobs, top_logprobs = self._logprobs()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            logit_bias={int(token_id): bias for token_id, bias in (self.logit_bias or {}).items()},
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            stop=tuple(self.stop or ()),
            grammar=grammar,
        )


class ChatCompletionRequest(SamplingRequest):
    """A `POST /v1/chat/completions` body, with the hosted API's ranges and defaults."""

    messages: list[ChatMessage] = Field(
        min_length=1,
        description="The conversation: (user, assistant, tool*)* user, plus at most one system message "
        "anywhere.",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens to generate; None means the rest of the context. After validation this "
        "also holds max_completion_tokens when only that was given.",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="OpenAI's newer name for max_tokens; if both are given they must agree."
    )
    logprobs: bool = Field(False, description="Return the log probability of each generated token.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Also return this many most likely tokens per position; needs logprobs.",
    )
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="'auto' (the default with tools): text or calls; 'required': one or more calls; "
        "{'type': 'function', 'function': {'name': ...}}: a call of that function; 'none' (the default "
        "without tools): no call, the tools are not shown. Calls are decoded under the functions' schemas.",
    )
    parallel_tool_calls: bool = Field(
        True, description="Whether a reply may call several functions (a JSON list of calls); false allows "
        "exactly one call.")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        # Checked by hand rather than as a union, so that an error names the field, not a union member.
        if isinstance(value, dict):
            try:
                return NamedToolChoice.model_validate(value)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                raise _invalid(first["msg"], param=".".join(str(part) for part in first["loc"])) from None
        if value not in (None, "none", "auto", "required"):
            raise _invalid("Should be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                           "{'name': ...}}")
        return value

    @model_validator(mode="after")
    def _check_field_combinations(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            if self.max_tokens not in (None, self.max_completion_tokens):
                raise _invalid("Disagrees with max_tokens; give only one of them", "max_completion_tokens")
            # Fold the two names into one so that the stage reads max_tokens alone.
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("Needs logprobs to be true", param="top_logprobs")
        if self.tool_choice is not None and not self.tools:
            raise _invalid("Only allowed when tools are given", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools}:
                raise _invalid(f"Names function '{name}', which is not among the tools", param="tool_choice")
        return self

    @property
    def uses_tools(self) -> bool:
        """Whether the model is told about the tools and its reply is parsed for a call."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """The function `tool_choice` names, if it names one."""
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def _logprobs(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0


class CompletionRequest(SamplingRequest):
    """A `POST /v1/completions` body: raw text in, text out, no chat template."""

    prompt: str | list[str] = Field(
        description="The text to continue, or a list of texts (each gets `n` choices, indexed prompt by "
        "prompt). The tokenizer adds BOS; nothing else is added."
    )
    max_tokens: int | None = Field(
        16, ge=1, description="Most tokens to generate; OpenAI's default, 16, when absent or null."
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return the log probability of each token and this many alternatives."
    )
    echo: bool = Field(False, description="Put the prompt before the completion in each choice's text.")
    suffix: None = Field(None, description="Text after the completion; not supported (insertion).")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only equal to n (or null) is supported.")

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise _invalid("Give at least one prompt")
        return value

    @model_validator(mode="after")
    def _check_completion_fields(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise _invalid("Only best_of equal to n is supported", param="best_of")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def _logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


# --------------------------------------------------------------------------------------------- response


FinishReason = Literal["stop", "length", "tool_calls"]


def completion_id(prefix: str = "chatcmpl") -> str:
    """A fresh response id; every chunk of one stream carries the same one."""
    return f"{prefix}-{uuid.uuid4().hex}"


class _ResponseModel(BaseModel):
    """A response body that leaves out the fields in `_omit_if_none` when they are None.

    OpenAI leaves those keys out rather than sending null (a delta without `role`, a chunk without
    `usage`), while others (`finish_reason`, `logprobs`) are sent as null; mirroring that exactly keeps
    strict clients and the reference's examples happy.
    """

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self._omit_if_none:
            if name in data and data[name] is None:
                del data[name]
        return data


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = Field(description="UTF-8 bytes of the token; None when it has none.")


class TokenLogprob(TopLogprob):
    """The sampled token at a position, with the most likely alternatives there."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """Per-token log probabilities of one choice, in OpenAI's `{"content": [...]}` shape."""

    content: list[TokenLogprob] | None


class ChatCompletionMessage(_ResponseModel):
    """The assistant message of a finished choice."""

    _omit_if_none = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    """One of the `n` completions of a non-streamed response."""

    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptTokensDetails(BaseModel):
    """What became of the prompt's tokens, in OpenAI's `usage.prompt_tokens_details`."""

    cached_tokens: int = Field(
        description="Prompt tokens served from the prefix cache instead of being computed; counted like "
        "`prompt_tokens`, once per prompt whatever `n` is.")


class Usage(_ResponseModel):
    """Token counts of one request, over all its choices, and what they cost.

    This service always sets `prompt_tokens_details` (`from_counts`); it is optional only so that bodies of
    services that leave it out, as the reference does, parse as they are.
    """

    _omit_if_none = frozenset({"prompt_tokens_details"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    estimated_cost: float = Field(description="US dollars, at the deployment's per-token prices.")

    @classmethod
    def from_counts(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        input_price_per_token: float,
        output_price_per_token: float,
        *,
        cached_tokens: int = 0,
        cached_input_price_per_token: float | None = None,
    ) -> "Usage":
        """`cached_tokens` of the `prompt_tokens` are priced at `cached_input_price_per_token` (by default the
        input price)."""
        if cached_input_price_per_token is None:
            cached_input_price_per_token = input_price_per_token
        cost = ((prompt_tokens - cached_tokens) * input_price_per_token
                + cached_tokens * cached_input_price_per_token
                + completion_tokens * output_price_per_token)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            # Rounded to 1e-10 dollars, far below any price, so float noise such as 2.2299999999999998e-05
            # does not reach the client.
            estimated_cost=round(cost, 10),
        )


class ChatCompletionResponse(BaseModel):
    """The body of a non-streamed chat completion."""

    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaToolCall(ToolCall):
    """A tool call in a streamed delta: whole (this service sends each call in one chunk), with its index."""

    index: int


class DeltaMessage(_ResponseModel):
    """What one chunk adds to a choice's message; the last chunk of a choice has an empty delta."""

    _omit_if_none = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(BaseModel):
    """One choice's part of a chunk; `finish_reason` is set only in that choice's last chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_ResponseModel):
    """One server-sent event of a streamed chat completion.

    All chunks of a stream share `id` and `created`. With `stream_options.include_usage` the stream ends
    with a chunk whose `choices` is empty and whose `usage` is set.
    """

    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: parallel lists over the generated tokens."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of `/v1/completions`; in a stream, its `text` is the new text only."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(_ResponseModel):
    """The body of a non-streamed completion, and (with text deltas) each chunk of a streamed one."""

    _omit_if_none = frozenset({"usage"})

    id: str = Field(default_factory=lambda: completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str
    root: str = Field(description="The model this one is served from (its weights' name or path).")
    max_model_len: int = Field(description="Context length in tokens: prompt plus completion.")


class ModelList(BaseModel):
    """The body of `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    """OpenAI's error object. All four keys are always sent; `param` and `code` may be null."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response: `{"error": {...}}`."""

    error: ErrorBody
