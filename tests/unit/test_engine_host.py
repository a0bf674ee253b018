"""The engine in its own process (the served default), without Ray: it streams the tokens `generate` gives, at
tp=1 and at tp=2 with followers the replica started, and a dead engine or a dead replica does not go unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from serve_app.config import EngineConfig, ModelConfig
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.sequence import ChoiceId, EngineRequest
from serve_app.errors import EngineUnavailableError, InvalidRequestError, to_service_error
from serve_app.replica.engine_client import EngineClient
from serve_app.replica.process_host import ENGINE_TITLE, EngineProcess
from serve_app.stage.structured_output import json_rule

PROMPTS = [[1, 15043, 29991], [1, 450, 4996, 17354, 1701, 29916], [1] + list(range(2000, 2040))]


def _configs(checkpoint, tp: int = 1, collective_timeout_s: float = 60) -> tuple[ModelConfig, EngineConfig]:
    return (ModelConfig(source=str(checkpoint), served_model_id="tiny", dtype="float32", tensor_parallel_size=tp,
                        max_model_len=512),
            EngineConfig(device="cpu", kv_cache_bytes=16 * 2**20, heartbeat_interval_s=1.0,
                         collective_timeout_s=collective_timeout_s))


async def _client(host: EngineProcess) -> EngineClient:
    return EngineClient(host)  # on the runner's event loop, which then reads the engine's reports


def _start(runner: asyncio.Runner, checkpoint, tp: int = 1) -> EngineClient:
    return runner.run(_client(EngineProcess(*_configs(checkpoint, tp), use_ray=False)))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def runner():
    """One event loop for the module, as a replica has: the engine process reports to the loop its streams
    are on, and those reports are read while that loop runs."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def client(runner, tiny_checkpoint):
    client = _start(runner, tiny_checkpoint)
    yield client
    client.stop()


def _request(name: str, prompt: list[int], params: SamplingParams, index: int = 0) -> EngineRequest:
    return EngineRequest(ChoiceId(name, index), prompt, params)


async def _tokens(client: EngineClient, requests: list[EngineRequest], running_seen: list[int] | None = None
                  ) -> dict[ChoiceId, list[int]]:
    tokens: dict[ChoiceId, list[int]] = {request.choice: [] for request in requests}
    async for batch in client.generate(requests):
        if running_seen is not None:
            running_seen.append(client.stats.num_sequences_running)
        for output in batch:
            tokens[output.choice].extend(output.new_token_ids)
    return tokens


async def _eventually(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _all_blocks_free(client: EngineClient) -> bool:
    return client.stats.num_free_blocks == client.stats.num_blocks and client.stats.num_sequences_running == 0


def test_engine_process_streams_the_tokens_generate_gives(runner, client, greedy_reference):
    requests = [_request("c", prompt, _greedy(8 + 4 * j), index=j) for j, prompt in enumerate(PROMPTS)]
    running_seen: list[int] = []
    tokens = runner.run(_tokens(client, requests, running_seen))
    for request in requests:
        assert tokens[request.choice] == greedy_reference(request.prompt_token_ids, request.params.max_tokens)
    # The engine's stats come back with its outputs: the call's three requests running from its first step,
    # then none and every block free.
    assert running_seen[0] == 3
    assert runner.run(_eventually(lambda: _all_blocks_free(client)))


def test_the_engine_process_names_itself(client):
    """What `ps`, `top` and `nvidia-smi` show for it: the engine, not `python -c ...spawn_main`."""
    cmdline = Path(f"/proc/{client.host.pid}/cmdline").read_bytes()
    assert cmdline.startswith(ENGINE_TITLE.encode())


def test_a_request_the_engine_refuses_is_a_400_and_the_engine_keeps_serving(runner, client, greedy_reference):
    bad = _request("bad", PROMPTS[0], SamplingParams(max_tokens=4, logit_bias={10**6: 5.0}))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as refused:
        runner.run(_tokens(client, [bad]))
    assert refused.value.param == "logit_bias"  # the engine's own error, across the process boundary
    ok = _request("ok", PROMPTS[0], _greedy(6))
    assert runner.run(_tokens(client, [ok]))[ok.choice] == greedy_reference(PROMPTS[0], 6)


def test_grammars_cross_to_the_engine_process_and_a_failed_one_is_refused(runner, client, tiny_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_checkpoint)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    grammar = "start: " + json_rule(schema)
    request = _request("json", PROMPTS[0], SamplingParams(max_tokens=20, seed=3, grammar=grammar))
    assert json.loads(tokenizer.decode(runner.run(_tokens(client, [request]))[request.choice])) in (
        {"ok": True}, {"ok": False})
    # Prepared after the request was added, on the engine's grammar thread: refused by a later report.
    bad = _request("bad-grammar", PROMPTS[0], SamplingParams(max_tokens=4, grammar='start: %json {"type": 7}'))
    with pytest.raises(InvalidRequestError, match="output constraint"):
        runner.run(_tokens(client, [bad]))


def test_closing_a_stream_aborts_its_request_in_the_engine_process(runner, client):
    async def leave_one_of_two() -> None:
        gone = client.generate([_request("gone", PROMPTS[2], _greedy(400))])
        await gone.__anext__()
        await gone.aclose()
        kept = _request("kept", PROMPTS[1], _greedy(100))
        assert len((await _tokens(client, [kept]))[kept.choice]) == 100
        # Had it not been aborted, the first request would have 300 tokens to go when the second finishes.
        assert client.stats.num_sequences_running == 0
        assert await _eventually(lambda: _all_blocks_free(client))

    runner.run(leave_one_of_two())


def test_stopping_the_engine_fails_open_streams_with_a_503(runner, tiny_checkpoint):
    client = _start(runner, tiny_checkpoint)

    async def stream_while_stopped() -> None:
        stream = client.generate([_request("s", PROMPTS[0], _greedy(400))])
        await stream.__anext__()
        client.stop()  # as Serve tears a replica down: on its event loop
        async for _ in stream:
            pass

    with pytest.raises(EngineUnavailableError) as failed:
        runner.run(asyncio.wait_for(stream_while_stopped(), timeout=120))  # a stream left open would hang
    assert to_service_error(failed.value).status_code == 503 and failed.value.retry_after
    assert not client.alive and client.host.pid is not None and not _running(client.host.pid)


def test_tp2_engine_process_joins_the_followers_its_replica_started(runner, tiny_checkpoint, greedy_reference):
    host = EngineProcess(*_configs(tiny_checkpoint, tp=2), use_ray=False)
    # Between the followers' launch and rank 0's join any process may take a free port (Ray's own connections
    # do): the group's port must be held from the moment it was chosen, or rank 0 fails with EADDRINUSE.
    with socket.socket() as squatter:
        with contextlib.suppress(OSError):
            squatter.bind((host.group.address.master_addr, host.group.address.master_port))
            squatter.listen()
        client = runner.run(_client(host))
    followers = client.host.group.local_processes  # started in this process, as the replica starts its actors
    try:
        assert client.healthy() and followers
        requests = [_request("t", prompt, _greedy(10), index=j) for j, prompt in enumerate(PROMPTS)]
        tokens = runner.run(_tokens(client, requests))
        assert tokens == {request.choice: greedy_reference(request.prompt_token_ids, 10) for request in requests}
    finally:
        client.stop()
    assert not any(follower.is_alive() for follower in followers)


def test_a_killed_engine_process_fails_open_streams_and_the_health_check(runner, tiny_checkpoint):
    client = _start(runner, tiny_checkpoint)

    async def stream_until_killed() -> None:
        stream = client.generate([_request("k", PROMPTS[0], _greedy(400))])
        await stream.__anext__()
        os.kill(client.host.pid, signal.SIGKILL)
        async for _ in stream:
            pass

    try:
        with pytest.raises(EngineUnavailableError):
            runner.run(stream_until_killed())
        assert not client.alive and not client.healthy()
        with pytest.raises(EngineUnavailableError):
            runner.run(_tokens(client, [_request("after", PROMPTS[0], _greedy(4))]))
    finally:
        client.stop()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_engine_process_exits_when_its_replica_is_killed(runner, tiny_checkpoint, tmp_path):
    # A replica process killed outright (OOM, `ray kill`) runs no cleanup; its engine must not live on,
    # holding the GPU, with nobody to serve.
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from serve_app.config import EngineConfig, ModelConfig
        from serve_app.replica.engine_client import EngineClient
        from serve_app.replica.process_host import EngineProcess

        async def main():
            client = EngineClient(EngineProcess(
                ModelConfig(source={str(tiny_checkpoint)!r}, served_model_id="tiny", dtype="float32",
                            max_model_len=512),
                EngineConfig(device="cpu", kv_cache_bytes=2**24, heartbeat_interval_s=1.0), use_ray=False))
            with open({str(tmp_path / "engine.pid")!r}, "w") as pid_file:
                print(client.host.pid, file=pid_file)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    # Output to files, not pipes: the engine inherits them, and a pipe would keep this waiting on it.
    with open(tmp_path / "replica.log", "w") as log:
        replica = subprocess.run([sys.executable, "-c", script], check=False, stdout=log, stderr=log,
                                 timeout=300)
    assert replica.returncode == -signal.SIGKILL, (tmp_path / "replica.log").read_text()[-2000:]
    engine_pid = int((tmp_path / "engine.pid").read_text())
    assert runner.run(_eventually(lambda: not _running(engine_pid)))


def test_an_engine_that_cannot_be_built_fails_the_replica_at_start(runner, tmp_path):
    model, engine = _configs(tmp_path / "no-checkpoint-here")
    with pytest.raises(RuntimeError, match="building the engine failed"):
        runner.run(_client(EngineProcess(model, engine, use_ray=False)))


def test_a_follower_that_dies_while_the_group_starts_fails_the_start_at_once(runner, tiny_checkpoint):
    # A rank that runs out of memory loading its shard, or is killed, leaves rank 0 waiting for it in a
    # collective; the replica must say which rank failed now, not time out after collective_timeout_s. With
    # an hour for that timeout, the named failure can only come from the follower check.
    host = EngineProcess(*_configs(tiny_checkpoint, tp=2, collective_timeout_s=3600), use_ray=False)
    follower = host.group.local_processes[0]
    follower.kill()
    follower.join(10)
    with pytest.raises(RuntimeError, match="rank 1 exited with code -9"):
        runner.run(_client(host))
    assert not _running(host.pid)


def test_killing_a_hung_engine_process_ends_it_and_its_followers_at_once(runner, tiny_checkpoint):
    """What the watchdog does to a hung engine: no StopEngine (a hung loop reads none), SIGKILL for the engine
    process and its follower ranks, and the open streams fail."""
    client = _start(runner, tiny_checkpoint, tp=2)
    followers = client.host.group.local_processes

    async def stream_until_killed() -> None:
        stream = client.generate([_request("h", PROMPTS[0], _greedy(400))])
        await stream.__anext__()
        client.host.kill()
        async for _ in stream:
            pass

    with pytest.raises(EngineUnavailableError):
        runner.run(asyncio.wait_for(stream_until_killed(), timeout=120))
    assert runner.run(_eventually(lambda: not _running(client.host.pid)))
    assert runner.run(_eventually(lambda: not any(follower.is_alive() for follower in followers)))
    assert not client.alive
