"""Multiplexed streams between two deployments: one Serve message per interval for all of a caller's streams.

Every Serve message costs CPU in both processes (serialization, a gRPC frame, an event-loop wake-up), and
each streamed request used to send its own: 32 streams meant 32 messages per step on each hop
(replica → stage → ingress). With a channel, each request still is its own Serve call — so routing,
admission, Serve's ongoing-request counts (autoscaling, `max_ongoing_requests`), cancellation and graceful
draining work as for any call — but only its first item (the first token: nothing waits for a channel to
open) and its end travel on it. Everything in between goes into the caller's mailbox at the serving replica,
and one long-lived `subscribe` call per (caller process, serving replica) carries every mailbox item at once.

- `ChannelHub` (serving side) runs a stream for a `ChannelTicket`: `serve()` yields `ChannelOpened` (with
  the first item), puts the rest in the caller's mailbox, and ends with `ChannelEnd` (how many items went
  out through the subscription, those that no subscription was there to send, and the error that ended the
  stream, if one did). `subscribe()` drains a mailbox, one message per `interval(open streams)` — what
  `StreamPacing` used to apply per stream — and ends once the caller has no open stream here for
  `linger_s` (so a draining replica is not held up).
- `ChannelClient` (calling side) makes each call look like Serve's own stream (`__anext__`, `cancel()`):
  `ChannelStream` reads its first item from the call, the rest from the subscription to the replica that
  `ChannelOpened` names, and ends once `ChannelEnd`'s count of items has arrived. Items are lists; a read
  returns every list that has arrived, concatenated, as one. The subscription runs outside any request's
  context (Serve would cancel it with the request that opened it); if it fails, the streams it carried
  end with a retryable 503.

A subscription reaches its replica through the deployment's request router: `channel_target` in the call's
keyword arguments names the replica (`targeted_replica`). A server that predates channels answers with a
plain stream, which `ChannelStream` passes through.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from serve_app.errors import ServiceError, ServiceUnavailableError, is_serve_refusal

logger = logging.getLogger(__name__)

# A subscription stays open this long after the caller's last stream here ended, so that steady traffic
# keeps one subscription instead of opening one per request.
SUBSCRIPTION_LINGER_S = 2.0
# A mailbox nobody reads (its caller died between a stream's first item and its subscription) is dropped
# after this long without an open stream.
ORPHAN_MAILBOX_S = 60.0
# Between subscriptions that found nothing to read (the replica is gone, or was not the caller's): backoff.
RESUBSCRIBE_BACKOFF_S = (0.05, 1.0)


@dataclass(frozen=True)
class ChannelTicket:
    """Passed with a call: send all but its first item through `subscriber`'s mailbox, under `key`."""

    subscriber: str
    key: str


@dataclass(frozen=True)
class ChannelOpened:
    """A channelled call's first message: which replica serves it (where to subscribe), and its first item."""

    replica: str
    first: Any


@dataclass(frozen=True)
class ChannelEnd:
    """A channelled call's last message: `items` went through the subscription, then come the `tail` items
    (mailed while no subscription read the mailbox, so they travel here instead), then `error` ended the
    stream, if set."""

    items: int
    tail: tuple = ()
    error: Exception | None = None


class _Mailbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.open_streams = 0
        self.flush = False  # a stream ended: send what is there without waiting out the interval
        self.subscription = 0  # which subscription reads it (0: none); a newer one replaces an older one
        self.changed = asyncio.Event()
        self.idle_since = time.monotonic()

    def put(self, key: str, item: Any) -> None:
        self.items.append((key, item))
        self.changed.set()


class ChannelHub:
    """The serving side: the mailboxes of this replica's callers."""

    def __init__(self, replica: str, interval: Callable[[int], float] | None = None,
                 linger_s: float = SUBSCRIPTION_LINGER_S):
        """`replica`: this replica's id as the router knows it (`RunningReplica.replica_id.unique_id`).
        `interval(open streams)`: the least time between two messages of one subscription."""
        self.replica = replica
        self._interval = interval or (lambda open_streams: 0.0)
        self._linger_s = linger_s
        self._mailboxes: dict[str, _Mailbox] = {}
        self._subscription_ids = itertools.count(1)

    @property
    def open_streams(self) -> int:
        return sum(box.open_streams for box in self._mailboxes.values())

    def _mailbox(self, subscriber: str) -> _Mailbox:
        box = self._mailboxes.get(subscriber)
        if box is None:
            now = time.monotonic()
            for name, other in list(self._mailboxes.items()):
                if not other.subscription and not other.open_streams and now - other.idle_since > ORPHAN_MAILBOX_S:
                    del self._mailboxes[name]
            box = self._mailboxes[subscriber] = _Mailbox()
        return box

    async def serve(self, ticket: ChannelTicket | None, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """`stream` as the call's own messages: all of it without a ticket, else opened, mailed, ended."""
        if ticket is None:
            async for item in stream:
                yield item
            return
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            return
        try:
            yield ChannelOpened(self.replica, first)
        except BaseException:
            await _close(stream)  # the caller went away before the rest: its finally (an abort) runs now
            raise
        # Taken after the first item, with no await before counting the stream, so that a subscription that
        # ends meanwhile (the caller had no other stream here) cannot drop the mailbox this stream uses.
        box = self._mailbox(ticket.subscriber)
        box.open_streams += 1
        mailed = 0
        error = None
        try:
            async for item in stream:
                box.put(ticket.key, item)
                mailed += 1
        except Exception as exc:  # it follows the items before it, as on the call's own stream
            if not isinstance(exc, ServiceError):
                logger.warning("a channelled stream failed", exc_info=exc)
            error = exc
        finally:
            box.open_streams -= 1
            box.idle_since = time.monotonic()
            box.flush = True
            box.changed.set()
        tail = ()
        if not box.subscription:
            # Nobody reads the mailbox (the caller could not reach this replica, which may be stopping):
            # this stream's items not yet sent go with its end instead.
            tail = tuple(item for key, item in box.items if key == ticket.key)
            if tail:
                box.items = [(key, item) for key, item in box.items if key != ticket.key]
        yield ChannelEnd(mailed - len(tail), tail, error)

    async def subscribe(self, subscriber: str, target: str) -> AsyncIterator[list[tuple[str, Any]]]:
        """Every item mailed to `subscriber`, as `(key, item)` pairs, one message per interval. Ends at once
        if `target` is another replica (the router could not reach that one: it may be stopping, and its
        streams' ends then carry their items) or `subscriber` has nothing here, and `linger_s` after its last
        stream here ended."""
        box = self._mailboxes.get(subscriber) if target == self.replica else None
        if box is None:
            return
        mine = box.subscription = next(self._subscription_ids)
        last_sent = float("-inf")
        try:
            while box.subscription == mine:
                if box.items:
                    hold = last_sent + self._interval(self.open_streams) - time.monotonic()
                    if hold > 0 and not box.flush:
                        box.changed.clear()
                        try:  # a stream that ends cuts the wait short: its end goes at once
                            await asyncio.wait_for(box.changed.wait(), hold)
                        except asyncio.TimeoutError:
                            pass
                        if box.subscription != mine:  # replaced while it waited: the newer one sends
                            break
                        if not box.flush:
                            continue
                    batch, box.items, box.flush = box.items, [], False
                    last_sent = time.monotonic()
                    yield batch
                    continue
                box.flush = False
                box.changed.clear()
                if box.open_streams:
                    await box.changed.wait()
                    continue
                try:
                    await asyncio.wait_for(box.changed.wait(), self._linger_s)
                except asyncio.TimeoutError:
                    if not box.open_streams and not box.items:
                        return
        finally:
            if box.subscription == mine:
                box.subscription = 0
                if not box.open_streams and not box.items and self._mailboxes.get(subscriber) is box:
                    del self._mailboxes[subscriber]


async def _close(stream: AsyncIterator[Any]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _lost_in_transit() -> ServiceUnavailableError:
    return ServiceUnavailableError("The service lost part of this response in transit. Please retry.",
                                   retry_after=1.0)


class _Failed:
    """The call's own stream raised: its error, in order after the items that came before it."""

    def __init__(self, error: BaseException):
        self.error = error


class ChannelStream:
    """One call's stream on the calling side, with the interface of Serve's `DeploymentResponseGenerator`
    (`__anext__`, `cancel()`)."""

    def __init__(self, client: ChannelClient, key: str, start: Callable[[ChannelTicket], Any]):
        self._client, self._key = client, key
        self._items: deque[Any] = deque()
        self._wake = asyncio.Event()
        self._expected: int | None = None
        self._received = 0  # mailed items read
        self._arrived = 0  # mailed items arrived
        self._tail: list = []
        self._end_error: Exception | None = None
        self._replica: str | None = None
        self._ending: asyncio.Task | None = None
        self._mode = "first"
        client._streams[key] = self
        self._call = start(ChannelTicket(client.subscriber, key))

    def __aiter__(self) -> ChannelStream:
        return self

    def _mailed(self, item: Any) -> None:
        self._items.append(item)
        if not isinstance(item, _Failed):
            self._arrived += 1
            self._detach_when_complete()
        self._wake.set()

    def _fail(self, error: BaseException) -> None:
        """End the stream with `error`, after what has arrived; it needs the subscription no more."""
        self._mailed(_Failed(error))
        self._detach()

    def _detach_when_complete(self) -> None:
        # Once the end and every item it counts are here the stream needs the subscription no more: detached
        # now, not when read, so that a stream its consumer drops unread does not keep a subscription open.
        if self._expected is not None and self._arrived >= self._expected:
            self._detach()

    async def __anext__(self) -> Any:
        if self._mode == "direct":
            return await self._call.__anext__()
        if self._mode == "first":
            try:
                message = await self._call.__anext__()
            except BaseException:
                self._detach()
                raise
            if not isinstance(message, ChannelOpened):  # a server without channels
                self._mode = "direct"
                self._detach()
                return message
            if self._mode == "closed":  # cancelled while this read was resuming
                raise StopAsyncIteration
            self._mode = "channel"
            self._replica = message.replica
            self._client._attach(message.replica, self._key)
            self._ending = asyncio.ensure_future(self._await_end())
            return message.first
        return await self._next_mailed()

    async def _next_mailed(self) -> Any:
        while True:
            if self._items:
                head = self._items.popleft()
                if isinstance(head, _Failed):
                    self._detach()
                    raise head.error
                merged = list(head)
                self._received += 1
                while self._items and not isinstance(self._items[0], _Failed):
                    merged.extend(self._items.popleft())
                    self._received += 1
                return merged
            if self._expected is not None and self._received >= self._expected:
                if self._tail:
                    tail, self._tail = self._tail, []
                    return [entry for item in tail for entry in item]
                self._detach()
                if self._end_error is not None:
                    raise self._end_error
                raise StopAsyncIteration
            if self._mode == "closed":
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def _await_end(self) -> None:
        """The call's own stream, after its first message: its `ChannelEnd`, or its failure."""
        try:
            message = await self._call.__anext__()
        except StopAsyncIteration:
            message = None
        except asyncio.CancelledError:
            if not asyncio.current_task().cancelling():  # Serve cancelled the call, not `cancel_call()`
                self._fail(_lost_in_transit())
            return
        except BaseException as exc:  # noqa: BLE001 - the reader raises it, after what came before it
            self._fail(exc)
            return
        if not isinstance(message, ChannelEnd):
            self._fail(RuntimeError(f"a channelled call sent {type(message).__name__} after its first item"))
            return
        self._expected, self._tail, self._end_error = message.items, list(message.tail), message.error
        self._detach_when_complete()
        self._wake.set()

    def cancel_call(self) -> None:
        """Cancel the call (its server aborts what it runs); what has arrived can still be read."""
        self._call.cancel()
        if self._ending is not None:
            self._ending.cancel()
        self._detach()

    def cancel(self) -> None:
        """Cancel the call (its server aborts what it runs), and stop reading."""
        self.cancel_call()
        if self._mode != "direct":
            self._mode = "closed"
        self._wake.set()

    def _detach(self) -> None:
        self._client._detach(self._replica, self._key)


class ChannelClient:
    """The calling side: this process's subscriptions to the replicas of one deployment."""

    def __init__(self, handle):
        """`handle`: the deployment's `DeploymentHandle`; its `subscribe` method takes `subscriber` and
        `channel_target`, and its request router honours `channel_target` (`targeted_replica`)."""
        self.handle = handle
        self.subscriber = uuid.uuid4().hex
        self._streams: dict[str, ChannelStream] = {}
        self._keys_at: dict[str, set[str]] = {}
        self._readers: dict[str, asyncio.Task] = {}

    def stream(self, method: str, *args, **kwargs) -> ChannelStream:
        """Call `method` with a ticket (as its `channel` keyword argument), streaming."""
        call = getattr(self.handle, method).options(stream=True)
        return ChannelStream(self, uuid.uuid4().hex,
                             lambda ticket: call.remote(*args, channel=ticket, **kwargs))

    def _attach(self, replica: str, key: str) -> None:
        self._keys_at.setdefault(replica, set()).add(key)
        if replica not in self._readers:
            # In a context of its own: Serve files a call under the request whose context makes it, and
            # cancelling that one request would cancel the subscription all of this replica's streams share.
            self._readers[replica] = asyncio.get_running_loop().create_task(
                self._read(replica), context=contextvars.Context())

    def _detach(self, replica: str | None, key: str) -> None:
        self._streams.pop(key, None)
        keys = self._keys_at.get(replica)
        if keys is not None:
            keys.discard(key)

    async def _read(self, replica: str) -> None:
        """Subscribe to `replica` while streams there are open; hand each mailed item to its stream. A
        subscription that fails may have lost items in flight: the streams there fail, retryably, rather
        than wait for items that will not come."""
        backoff = RESUBSCRIBE_BACKOFF_S[0]
        try:
            while self._keys_at.get(replica):
                delivered = False
                subscription = self.handle.subscribe.options(stream=True).remote(
                    subscriber=self.subscriber, channel_target=replica)
                try:
                    async for batch in subscription:
                        delivered = True
                        for key, item in batch:
                            stream = self._streams.get(key)
                            if stream is not None:
                                stream._mailed(item)
                except asyncio.CancelledError:
                    subscription.cancel()
                    if asyncio.current_task().cancelling():
                        raise
                    self._fail_streams_at(replica, "cancelled")
                except Exception as exc:  # noqa: BLE001 - any failure of the call is one of the subscription
                    subscription.cancel()  # so that the hub stops taking items for nobody at once
                    if is_serve_refusal(exc):  # it reached no replica and took nothing: retry
                        logger.warning("a channel subscription to replica %s was refused (%s); retrying",
                                       replica, type(exc).__name__)
                    else:
                        self._fail_streams_at(replica, type(exc).__name__)
                if delivered:
                    backoff = RESUBSCRIBE_BACKOFF_S[0]
                elif self._keys_at.get(replica):
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, RESUBSCRIBE_BACKOFF_S[1])
        finally:
            del self._readers[replica]
            if not self._keys_at.get(replica):
                self._keys_at.pop(replica, None)

    def _fail_streams_at(self, replica: str, why: str) -> None:
        keys = self._keys_at.get(replica, set())
        logger.warning("a channel subscription to replica %s failed (%s); its %d streams fail", replica, why,
                       len(keys))
        error = _lost_in_transit()
        for key in list(keys):
            stream = self._streams.get(key)
            if stream is not None:
                stream._fail(error)
                stream.cancel_call()


def is_subscription(pending_request) -> bool:
    return pending_request is not None and "channel_target" in pending_request.kwargs


def targeted_replica(candidates: list, pending_request) -> Any | None:
    """The candidate replica a call's `channel_target` names, if it names one that is running; a request
    router's `choose_replicas` returns `[[it]]` (and any replica when it names none: that one's hub ends
    the subscription at once)."""
    if not is_subscription(pending_request):
        return None
    target = pending_request.kwargs["channel_target"]
    for replica in candidates:
        if replica.replica_id.unique_id == target:
            return replica
    return None
