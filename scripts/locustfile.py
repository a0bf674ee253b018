"""Locust load for long runs against any OpenAI-compatible chat endpoint (this service by default).

Each simulated user streams chat completions with ShareGPT-like prompt/output lengths (the same generator as
`bench_serving.py`) and reports two extra entries beside the request itself: `TTFT` (time to the first
content chunk) and `TPOT` (time per output token after the first), so Locust's percentiles cover them too.
Failures — a non-200 status, an SSE error event, a stream without `[DONE]` — are counted as such.

    locust -f scripts/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 4 -t 10m \
        --csv bench-out/locust
    # options: LOCUST_MODEL (default: the first of /v1/models), LOCUST_PROMPT_MEDIAN, LOCUST_OUTPUT_MEDIAN
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import sharegpt_like

PROMPT_MEDIAN = int(os.environ.get("LOCUST_PROMPT_MEDIAN", "128"))
OUTPUT_MEDIAN = int(os.environ.get("LOCUST_OUTPUT_MEDIAN", "96"))


class ChatUser(HttpUser):
    wait_time = between(0.0, 1.0)

    def on_start(self) -> None:
        card = self.client.get("/v1/models", name="/v1/models").json()["data"][0]
        self.model = os.environ.get("LOCUST_MODEL") or card["id"]
        self.max_total = card.get("max_model_len") or 4096
        self.rng = random.Random()

    @task
    def chat_stream(self) -> None:
        (sample,) = sharegpt_like(1, self.rng, PROMPT_MEDIAN, OUTPUT_MEDIAN, self.max_total)
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": sample.max_tokens, "messages": [{"role": "user", "content": sample.prompt}]}
        started = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="/v1/chat/completions (stream)") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            done = False
            for raw in response.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    response.failure(str(event["error"])[:200])
                    return
                if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if not done:
                response.failure("stream ended without [DONE]")
                return
            response.success()
        end = time.perf_counter()
        if first is not None:
            fire("TTFT", (first - started) * 1000)
            if tokens > 1:
                fire("TPOT", (end - first) * 1000 / (tokens - 1))


def fire(name: str, milliseconds: float) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=milliseconds, response_length=0,
                        exception=None, context={})
