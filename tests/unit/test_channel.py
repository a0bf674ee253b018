"""Channels (serve_app/channel.py) without Ray: many streams over one subscription, whole and in order.

A fake handle stands for Serve's: each call runs the server's generator in a task of its own and hands its
items over a queue, as a remote stream would; `cancel()` cancels that task, as Serve cancels a replica's
generator. Calls go to the servers round robin, and a subscription to the one its `channel_target` names.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools

import pytest

from serve_app.channel import ChannelClient, ChannelHub, ChannelTicket
from serve_app.errors import OverloadedError, ServiceUnavailableError

# Stands for Serve's request context, which a call made inside a request is filed under.
REQUEST = contextvars.ContextVar("request", default=None)


class _RemoteStream:
    def __init__(self, generator):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(generator))

    async def _pump(self, generator) -> None:
        try:
            async for item in generator:
                self._queue.put_nowait(("item", item))
            self._queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            self._queue.put_nowait(("error", asyncio.CancelledError()))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller, as Serve does
            self._queue.put_nowait(("error", exc))

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self._queue.get()
        if kind == "item":
            return value
        self._queue.put_nowait((kind, value))
        if kind == "end":
            raise StopAsyncIteration
        raise value

    def cancel(self) -> None:
        self._task.cancel()


class _Server:
    """A replica whose `generate(count)` yields `[name, i]` lists, one per loop turn."""

    def __init__(self, name: str, channels: bool = True, fail_after: int | None = None, linger_s: float = 2.0,
                 error: type[Exception] = OverloadedError):
        self.name = name
        self.error = error
        self.hub = ChannelHub(name, linger_s=linger_s)
        self.channels = channels
        self.fail_after = fail_after
        self.closed: list[int] = []  # counts of streams whose generator ran its finally
        self.subscription_messages = 0
        self.subscription_delay_s = 0.0
        self.subscription_fails_after: int | None = None  # messages, then the subscription call fails
        self.subscription_contexts: list = []

    async def _produce(self, count: int):
        try:
            for i in range(count):
                if self.fail_after is not None and i == self.fail_after:
                    raise self.error("too busy")
                yield [(self.name, i)]
                await asyncio.sleep(0)
        finally:
            self.closed.append(count)

    async def generate(self, count: int, channel: ChannelTicket | None = None):
        source = self._produce(count)
        if not self.channels:
            async for item in source:
                yield item
            return
        async for item in self.hub.serve(channel, source):
            yield item

    async def subscribe(self, subscriber: str, channel_target: str):
        self.subscription_contexts.append(REQUEST.get())
        async for batch in self.hub.subscribe(subscriber, channel_target):
            if self.subscription_fails_after is not None and self.subscription_messages >= self.subscription_fails_after:
                raise RuntimeError("the subscription's connection broke")
            self.subscription_messages += 1
            await asyncio.sleep(self.subscription_delay_s)
            yield batch


class _Method:
    def __init__(self, handle: _Handle, name: str):
        self._handle, self._name = handle, name

    def options(self, stream: bool):
        assert stream
        return self

    def remote(self, *args, **kwargs):
        if self._name == "subscribe" and self._handle.refusals:
            self._handle.refusals -= 1
            return _RemoteStream(_refused())
        target = kwargs.get("channel_target")
        target = self._handle.unreachable.get(target, target)
        server = self._handle.by_name[target] if target is not None else next(self._handle.turns)
        return _RemoteStream(getattr(server, self._name)(*args, **kwargs))


class BackPressureError(Exception):
    """Named as Serve's: a call refused before it reached any replica."""


async def _refused():
    raise BackPressureError("the handle's queue is full")
    yield


class _Handle:
    def __init__(self, servers: list[_Server]):
        self.by_name = {server.name: server for server in servers}
        self.unreachable: dict[str, str] = {}  # a subscription to the first lands on the second
        self.refusals = 0  # subscriptions Serve refuses (its queue is full) before any reaches a server
        self.turns = itertools.cycle(servers)
        self.generate = _Method(self, "generate")
        self.subscribe = _Method(self, "subscribe")


async def _read_all(stream) -> list:
    items = []
    async for batch in stream:
        items.extend(batch)
    return items


def test_concurrent_streams_arrive_whole_and_in_order_in_fewer_messages_than_items():
    server = _Server("a")

    async def scenario():
        client = ChannelClient(_Handle([server]))
        return await asyncio.gather(*(_read_all(client.stream("generate", 30)) for _ in range(4))), client

    results, client = asyncio.run(scenario())
    assert results == [[("a", i) for i in range(30)]] * 4
    # 29 items per stream after the first went through the mailbox, 116 in all: one message carries the
    # items of all four streams that came in one loop turn.
    assert 0 < server.subscription_messages <= 116 // 3
    assert not client._streams and not client._keys_at.get("a")


def test_the_first_item_comes_on_the_call_and_a_one_item_stream_ends_without_a_subscription_message():
    server = _Server("a")

    async def scenario():
        return await _read_all(ChannelClient(_Handle([server])).stream("generate", 1))

    assert asyncio.run(scenario()) == [("a", 0)]
    assert server.subscription_messages == 0


def test_an_error_that_ends_a_stream_comes_after_every_item_before_it():
    server = _Server("a", fail_after=5)

    async def scenario():
        stream = ChannelClient(_Handle([server])).stream("generate", 30)
        items = []
        with pytest.raises(OverloadedError):
            async for batch in stream:
                items.extend(batch)
        return items

    assert asyncio.run(scenario()) == [("a", i) for i in range(5)]


def test_an_error_before_the_first_item_is_raised_by_the_first_read():
    server = _Server("a", fail_after=0)

    async def scenario():
        stream = ChannelClient(_Handle([server])).stream("generate", 30)
        with pytest.raises(OverloadedError):
            await stream.__anext__()

    asyncio.run(scenario())


def test_cancelling_a_stream_closes_its_generator_on_the_server():
    server = _Server("a")

    async def scenario():
        client = ChannelClient(_Handle([server]))
        stream = client.stream("generate", 10_000)
        assert await stream.__anext__() == [("a", 0)]
        await stream.__anext__()
        stream.cancel()
        for _ in range(1000):
            if server.closed:
                break
            await asyncio.sleep(0.001)
        return client

    client = asyncio.run(scenario())
    assert server.closed == [10_000]
    assert not client._streams


def test_streams_on_two_replicas_each_read_through_their_own_subscription():
    servers = [_Server("a"), _Server("b")]

    async def scenario():
        client = ChannelClient(_Handle(servers))
        return await asyncio.gather(*(_read_all(client.stream("generate", 20)) for _ in range(4)))

    results = asyncio.run(scenario())
    assert results == [[(name, i) for i in range(20)] for name in "abab"]
    assert all(server.subscription_messages > 0 for server in servers)


def test_a_server_without_channels_streams_as_before():
    server = _Server("a", channels=False)

    async def scenario():
        return await _read_all(ChannelClient(_Handle([server])).stream("generate", 5))

    assert asyncio.run(scenario()) == [("a", i) for i in range(5)]
    assert server.subscription_messages == 0


def test_a_subscription_ends_when_its_streams_are_done_and_a_later_stream_opens_another():
    server = _Server("a", linger_s=0.01)

    async def scenario():
        client = ChannelClient(_Handle([server]))
        first = await _read_all(client.stream("generate", 5))
        for _ in range(2000):  # the subscription lingers, ends, and drops the mailbox
            if not server.hub._mailboxes and not client._readers:
                break
            await asyncio.sleep(0.001)
        assert not server.hub._mailboxes and not client._readers
        return first, await _read_all(client.stream("generate", 5))

    first, second = asyncio.run(scenario())
    assert first == second == [("a", i) for i in range(5)]


def test_a_paced_subscription_sends_a_finished_stream_at_once():
    """With a long interval, items wait to share a message (after the subscription's first, which goes at
    once), but a stream's end does not wait."""
    server = _Server("a")
    server.hub = ChannelHub("a", interval=lambda open_streams: 30.0)

    async def scenario():
        return await asyncio.wait_for(_read_all(ChannelClient(_Handle([server])).stream("generate", 20)), 10)

    assert asyncio.run(scenario()) == [("a", i) for i in range(20)]
    assert server.subscription_messages <= 2


def test_a_stream_whose_end_overtakes_its_items_waits_for_them():
    """The subscription is another Serve call: the call's `ChannelEnd` may arrive before the items it counts."""
    server = _Server("a")
    server.subscription_delay_s = 0.05

    async def scenario():
        return await _read_all(ChannelClient(_Handle([server])).stream("generate", 10))

    assert asyncio.run(scenario()) == [("a", i) for i in range(10)]


def test_a_subscription_opened_inside_a_request_runs_outside_its_context():
    """Serve files a call under the request whose context makes it; the shared subscription must not be
    cancelled with whichever request happened to open it."""
    server = _Server("a")

    async def scenario():
        client = ChannelClient(_Handle([server]))
        REQUEST.set("user-a")
        return await _read_all(client.stream("generate", 10))

    assert asyncio.run(scenario()) == [("a", i) for i in range(10)]
    assert server.subscription_contexts and set(server.subscription_contexts) == {None}


def test_a_failed_subscription_fails_its_streams_retryably_and_cancels_their_calls():
    server = _Server("a")
    server.subscription_fails_after = 1

    async def scenario():
        client = ChannelClient(_Handle([server]))

        async def read(count):
            items = []
            with pytest.raises(ServiceUnavailableError):
                async for batch in client.stream("generate", count):
                    items.extend(batch)
            return items

        got = await asyncio.wait_for(asyncio.gather(read(10_000), read(10_000)), 10)
        for _ in range(1000):
            if len(server.closed) == 2:
                break
            await asyncio.sleep(0.001)
        return got

    for items in asyncio.run(scenario()):
        assert items == [("a", i) for i in range(len(items))]  # what came is whole up to the failure
    assert server.closed == [10_000, 10_000]


def test_a_stream_on_a_replica_its_subscription_cannot_reach_gets_its_items_with_its_end():
    """The router lost the replica (it is stopping): the subscription lands on another, which has nothing for
    it and must not take over the subscription of its own streams."""
    servers = [_Server("a"), _Server("b")]

    async def scenario():
        handle = _Handle(servers)
        handle.unreachable["a"] = "b"
        client = ChannelClient(handle)
        return await asyncio.wait_for(asyncio.gather(*(_read_all(client.stream("generate", 20)) for _ in range(4))),
                                      10)

    assert asyncio.run(scenario()) == [[(name, i) for i in range(20)] for name in "abab"]


def test_a_stream_dropped_unread_leaves_no_subscription_behind():
    server = _Server("a", linger_s=0.01)

    async def scenario():
        client = ChannelClient(_Handle([server]))
        stream = client.stream("generate", 5)
        await stream.__anext__()  # then never read again, nor cancelled
        for _ in range(2000):
            if not client._streams and not client._readers:
                break
            await asyncio.sleep(0.001)
        return client

    client = asyncio.run(scenario())
    assert not client._streams and not client._readers


def test_an_unexpected_error_comes_after_the_items_before_it():
    server = _Server("a", fail_after=5, error=RuntimeError)
    server.subscription_delay_s = 0.05

    async def scenario():
        stream = ChannelClient(_Handle([server])).stream("generate", 30)
        items = []
        with pytest.raises(RuntimeError, match="too busy"):
            async for batch in stream:
                items.extend(batch)
        return items

    assert asyncio.run(scenario()) == [("a", i) for i in range(5)]


def test_a_subscription_serve_refuses_is_retried_and_no_stream_fails():
    server = _Server("a")

    async def scenario():
        handle = _Handle([server])
        handle.refusals = 2
        return await asyncio.wait_for(_read_all(ChannelClient(handle).stream("generate", 20)), 10)

    assert asyncio.run(scenario()) == [("a", i) for i in range(20)]
