"""The service's configuration: one typed tree, loaded from the `args:` of a `serve run` YAML.

Every model size gets its own YAML in `configs/`; they share this schema. Unknown keys are rejected so a
typo fails at start instead of being silently ignored. Ray Serve's own per-deployment options
(`num_replicas`, `autoscaling_config`, `max_ongoing_requests`, `ray_actor_options`, ...) are passed through
verbatim under `deployments.<name>`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TINY_MODEL_SOURCE = "builtin:tiny-llama-2-chat"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    source: str = Field(
        description="Hugging Face model id or local checkpoint folder. "
        f"`{TINY_MODEL_SOURCE}` builds the tiny random-weight Llama used by the CPU default.")
    served_model_id: str = Field(description="The `model` name clients send and `/v1/models` lists.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Weights and KV cache dtype. At tensor_parallel_size > 1, a local checkpoint in "
        "another dtype is converted once per node into safetensors in this one, under "
        "`$LLAMA_SERVE_CACHE/converted/` (default `~/.cache/llama-serve`), so that each rank memory-maps it "
        "and holds only its shard.")
    tensor_parallel_size: int = Field(1, ge=1, description="Ranks (GPUs, or CPU processes) per replica group.")
    max_model_len: int = Field(4096, ge=16, description="Prompt plus completion tokens, per request.")
    owned_by: str = Field("llama-serve", description="Shown in `/v1/models`.")


class EngineConfig(StrictModel):
    device: Literal["cpu", "cuda"] = Field("cuda", description="Where the ranks run; `cpu` uses gloo.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences in the running batch.")
    max_num_batched_tokens: int = Field(2048, ge=16, description="Prefill + decode tokens per engine step.")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    decode_gather_tokens: int = Field(
        65536, ge=1, description="The most cache tokens one batched decode-attention call gathers (rows x the "
        "longest row's length): decode rows go in calls by context length under this bound, so short rows are "
        "not padded to a long one's length, and the call's transient memory (for Llama-2-7B at fp16, 16 KiB "
        "per token per layer over all ranks) stays bounded. A row longer than this gets a call of its own.")
    decode_attention: Literal["auto", "gather", "paged"] = Field(
        "auto", description="How decode rows attend. `gather`: rows in calls by length, each call gathering "
        "its rows' blocks into one tensor (the CPU's path). `paged`: every decode row in one call that reads "
        "the block tables in place, a Triton kernel on CUDA (a full-width masked gather elsewhere); its "
        "shapes do not depend on the rows' lengths, which CUDA graphs need. `auto`: paged on CUDA, gather on "
        "CPU. The choice is logged at start.")
    cuda_graphs: bool = Field(
        True, description="On CUDA with paged decode attention: replay decode-only steps of up to "
        "`cuda_graph_max_batch` rows from CUDA graphs captured at start, one per batch-size bucket, instead of "
        "launching every kernel from Python. Prefill, mixed and larger steps run eagerly.")
    cuda_graph_max_batch: int = Field(
        64, ge=1, description="The largest decode batch replayed from a CUDA graph (at most max_num_seqs).")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV-cache budget per rank in bytes; required on CPU.")
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="On GPU: the share of device memory that weights, the largest step's "
        "activations (measured at start) and the KV cache may fill together.")
    cpus_per_rank: float = Field(
        1.0, gt=0, description="On CPU: Ray CPUs reserved per rank (each rank's placement-group bundle).")
    cpu_threads_per_rank: int | None = Field(
        None, ge=1, description="On CPU: torch threads per rank; default leaves torch's choice.")
    cpu_small_step_tokens: int | None = Field(
        None, ge=1, description="On CPU, with `cpu_threads_per_rank` > 1: steps of fewer tokens than this run on "
        "one torch thread. A one-stream decode step is too small to share, and its second thread would take a "
        "core from the serving processes; a batch of decodes or a prefill uses them all.")
    enable_prefix_caching: bool = Field(
        True, description="Share the KV blocks of identical prompt prefixes (system prompts, earlier turns) "
        "between requests instead of computing them again.")
    grammar_cache_size: int = Field(
        256, ge=1, description="Prepared grammars (structured outputs' JSON schemas, tool-call formats) the "
        "engine keeps, the least recently used evicted first: requests with a schema seen before start "
        "without preparing it again.")
    separate_process: bool = Field(
        True, description="Run rank 0's engine in a process of its own instead of on a thread of the Serve "
        "replica's process, so that the replica's streaming (Python, per message) and the engine's step "
        "(Python between kernels) do not take turns on one interpreter lock.")
    stream_interval_s: float = Field(
        0.0, ge=0, le=1, description="After a stream's first token (always sent at once), send its later "
        "tokens at most this often: fewer messages per token through the deployments, at the cost of "
        "burstier inter-token latency. 0 lets every engine step's tokens go as they come.")
    stream_messages_per_s: float | None = Field(
        None, gt=0, description="Bound on the messages per second a replica group sends over all its "
        "streams: with S streams open, each sends at most every S / this seconds (never less often than "
        "`stream_max_interval_s`). The serving path's CPU cost is per message, so this keeps it flat as "
        "concurrency grows; a lone stream gets a message at most every 1 / this seconds. None: no bound.")
    stream_max_interval_s: float = Field(
        0.25, gt=0, le=5, description="The longest a stream holds tokens back under `stream_messages_per_s`.")
    collective_timeout_s: float = Field(
        120.0, gt=0, description="A rank that does not answer a collective in this time fails the group.")
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="An idle group exchanges a heartbeat this often, so hung ranks are noticed.")
    step_timeout_s: float | None = Field(
        120.0, gt=0, description="The engine watchdog: a step that takes longer while streams wait on it (a hung "
        "kernel or collective) fails the replica group: its streams get a 503, its engine is killed and Serve "
        "replaces the group. Leave room for the slowest step the group makes (the first ones after start "
        "compile kernels on a GPU). None: no watchdog.")

    @model_validator(mode="after")
    def _cpu_needs_a_budget(self) -> EngineConfig:
        if self.device == "cpu" and self.kv_cache_bytes is None:
            raise ValueError("engine.kv_cache_bytes is required when engine.device is 'cpu'")
        if self.heartbeat_interval_s >= self.collective_timeout_s:
            raise ValueError("heartbeat_interval_s must be shorter than collective_timeout_s")
        return self


class PricingConfig(StrictModel):
    """Per-token prices for `usage.estimated_cost`, in USD.

    The reference's two examples imply different prices (they were taken a year apart), so the defaults are a
    round $0.20 per million tokens each way; set your own per config.
    """

    input_per_million_tokens: float = Field(0.2, ge=0, description="Prompt tokens the engine computed.")
    cached_input_per_million_tokens: float | None = Field(
        None, ge=0, description="Prompt tokens served from the prefix cache "
        "(`usage.prompt_tokens_details.cached_tokens`). None: `input_per_million_tokens`.")
    output_per_million_tokens: float = Field(0.2, ge=0, description="Completion tokens.")

    @property
    def cached_input_per_million(self) -> float:
        """The price of a cached prompt token, the input price unless one is set."""
        if self.cached_input_per_million_tokens is None:
            return self.input_per_million_tokens
        return self.cached_input_per_million_tokens


class RoutingConfig(StrictModel):
    """How the stage picks a replica group for each request (`serve_app/affinity.py`, docs/routing.md)."""

    policy: Literal["cache_affinity", "power_of_two"] = Field(
        "cache_affinity", description="`cache_affinity`: every turn of a conversation (one `prompt_cache_key`, "
        "`user` or opening) goes to the same group, where its earlier turns' KV cache is. `power_of_two`: Ray "
        "Serve's default policy (`two_choices.py`), the less loaded of two random groups, blind to caches.")
    max_imbalance: int | None = Field(
        None, ge=0, description="Under `cache_affinity`, a request goes to the least loaded group instead of "
        "its own when its own has more than this many requests in flight beyond that one. None: "
        "`engine.max_num_seqs`, a whole batch.")


class DeploymentOptions(StrictModel):
    """Ray Serve options for the three deployments, passed to `.options(**...)` unchanged."""

    ingress: dict[str, Any] = Field(default_factory=dict)
    stage: dict[str, Any] = Field(default_factory=dict)
    replica: dict[str, Any] = Field(default_factory=dict)


API_KEYS_ENV = "LLAMA_SERVE_API_KEYS"
API_KEYS_FILE_ENV = "LLAMA_SERVE_API_KEYS_FILE"
# Bytes of request body allowed per token of context when `api.max_body_bytes` is not set: room for a
# context's worth of text even when every character is JSON-escaped, and no more.
BODY_BYTES_PER_CONTEXT_TOKEN = 128


class ApiConfig(StrictModel):
    """The HTTP API's edges: who may call it, how big a request may be, and how much may wait.

    Every default keeps the service usable out of the box; existing configs need no `api:` section.
    """

    api_keys: list[str] = Field(
        default_factory=list,
        description=f"Accepted `Authorization: Bearer` keys, added to the comma-separated keys in the "
        f"`{API_KEYS_ENV}` environment variable and the lines of the file `{API_KEYS_FILE_ENV}` names. With "
        "no key from any of them, the API is open. Keys written here are printed back by `serve config` and "
        "Serve's REST API: deployments take them from a secret, through the environment or the file.")
    require_api_keys: bool = Field(
        False, description="Refuse to start without at least one key: for deployments reachable from outside "
        "the node, where a missing secret must not leave the API open.")
    max_body_bytes: int | None = Field(
        None, ge=1024, description="Larger request bodies get 413. None: "
        f"{BODY_BYTES_PER_CONTEXT_TOKEN} bytes per token of `model.max_model_len` (at least 64 KiB), enough for "
        "a full context of JSON-escaped text, so no request makes the stage tokenize far more than fits.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request (400 beyond).")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one `/v1/completions` request.")
    max_n: int = Field(8, ge=1, le=128, description="Most choices (`n`) one request may ask for; each is a "
                       "sequence in the engine's batch.")
    max_waiting_requests: int = Field(
        256, ge=1, description="Engine requests admitted but not yet started, per replica group; beyond "
        "that a request is refused at once with 429.")
    max_waiting_tokens: int = Field(
        65536, ge=1, description="Prompt tokens of those waiting requests, per replica group (429 beyond).")
    retry_after_s: float = Field(
        1.0, gt=0, description="The Retry-After sent when the engine refuses a request (429).")
    first_token_timeout_s: float | None = Field(
        None, gt=0, description="A request whose first token has not come in this time (it waited for capacity) "
        "is refused with 504 `request_timeout` and Retry-After, and its work is cancelled. None: no deadline.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="A request not finished in this time ends with 504 `request_timeout` (an SSE "
        "error event once streaming) and its work is cancelled. None: no deadline.")
    non_stream_keepalive_s: float | None = Field(
        None, gt=0, description="A non-streamed answer's status and headers go out with its first token, and "
        "then a space (JSON allows it before the body) this often until the body: a proxy that notices a client "
        "gone only when it writes (HAProxy) then aborts the request within about two of these, instead of "
        "letting it run to its end. The price: a failure after the first token is a 200 whose body is the "
        "OpenAI error. None: the answer is sent whole, with its own status.")
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty (the default) turns CORS off.")


class AppConfig(StrictModel):
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    deployments: DeploymentOptions = Field(default_factory=DeploymentOptions)
    api: ApiConfig = Field(default_factory=ApiConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)

    @property
    def max_imbalance(self) -> int:
        """`routing.max_imbalance`, or a whole batch of the engine."""
        if self.routing.max_imbalance is not None:
            return self.routing.max_imbalance
        return self.engine.max_num_seqs

    @property
    def group_capacity(self) -> int:
        """Client requests one replica group takes before its engine refuses more (429): a running batch
        and the waiting queue's bound, counting each request as one sequence."""
        return self.engine.max_num_seqs + self.api.max_waiting_requests

    @property
    def max_body_bytes(self) -> int:
        """`api.max_body_bytes`, or the default that fits the model's context."""
        if self.api.max_body_bytes is not None:
            return self.api.max_body_bytes
        return max(64 * 1024, BODY_BYTES_PER_CONTEXT_TOKEN * self.model.max_model_len)
