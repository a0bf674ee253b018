"""The application's status board: every replica group's health and engine stats, readable without a request.

In: each replica group publishes a `GroupStatus` about once a second (`LlamaReplica`'s reporter thread).
Out: `read_board(app)`, every group's latest status, for the ingress's `GET /health` and `GET /metrics`.

Why a board and not a call: a call to a replica group is routed like any request, so under load it waits
behind the streams for a free slot, or is refused; and a call reaches one group, not all. The board is a
few small keys in the Ray cluster's own key-value store (GCS), written by the groups and read by the
ingress, so a health check or a scrape costs one read of that store, whatever the load. An entry older than
`STALE_AFTER_S` belongs to a group that is gone (its process killed before it could withdraw) and is
ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from serve_app.engine.engine import EngineStats

NAMESPACE = "llama_serve"
PUBLISH_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0


@dataclass(frozen=True)
class GroupStatus:
    """One replica group, as it last described itself."""

    replica: str  # Serve's replica id, the `replica` label of its Ray metrics
    healthy: bool  # its engine runs and every rank of its tensor-parallel group is there
    stats: EngineStats | None
    published_at: float  # time.time() when written

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> GroupStatus:
        fields = json.loads(raw)
        stats = fields.pop("stats")
        return cls(stats=EngineStats(**stats) if stats is not None else None, **fields)


def _key(app: str, replica: str = "") -> bytes:
    return f"{app}/groups/{replica}".encode()


def publish(app: str, status: GroupStatus) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_key(app, status.replica), status.to_json(), overwrite=True, namespace=NAMESPACE)


def withdraw(app: str, replica: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(app, replica), namespace=NAMESPACE)


def read_board(app: str, now: float | None = None) -> list[GroupStatus]:
    """Every group of `app` that published within `STALE_AFTER_S`; blocking (a GCS round trip per key)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    now = time.time() if now is None else now
    statuses = []
    for key in _internal_kv_list(_key(app), namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:  # withdrawn since the listing
            continue
        status = GroupStatus.from_json(raw)
        if now - status.published_at <= STALE_AFTER_S:
            statuses.append(status)
    return sorted(statuses, key=lambda status: status.replica)


# Stopping an application: the stopper posts a drain notice; each ingress replica, once it has seen it, reports
# how many requests it still has in flight (`serve_app/ingress/drain.py`, `serve_app/cli.py`).


@dataclass(frozen=True)
class DrainNotice:
    """The application is stopping: refuse new requests, and end those still running at `cut_at`. A notice
    past `expires_at` is ignored, so that one left behind (its stopper killed) cannot drain a later start."""

    cut_at: float  # time.time()
    expires_at: float

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()


@dataclass(frozen=True)
class DrainReport:
    """One ingress replica, draining, as it last reported itself."""

    replica: str
    in_flight: int
    published_at: float


def _drain_key(app: str) -> bytes:
    return f"{app}/drain".encode()


def _report_key(app: str, replica: str = "") -> bytes:
    return f"{app}/draining/{replica}".encode()


def post_drain_notice(app: str, notice: DrainNotice) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_drain_key(app), notice.to_json(), overwrite=True, namespace=NAMESPACE)


def read_drain_notice(app: str, now: float | None = None) -> DrainNotice | None:
    """The application's drain notice, unless there is none or it has expired; blocking (one GCS read)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_drain_key(app), namespace=NAMESPACE)
    if raw is None:
        return None
    notice = DrainNotice(**json.loads(raw))
    now = time.time() if now is None else now
    return notice if now < notice.expires_at else None


def report_draining(app: str, report: DrainReport) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_report_key(app, report.replica), json.dumps(dataclasses.asdict(report)).encode(),
                     overwrite=True, namespace=NAMESPACE)


def read_drain_reports(app: str, since: float) -> list[DrainReport]:
    """Every ingress replica of `app` that reported since `since` (time.time()); blocking."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    reports = []
    for key in _internal_kv_list(_report_key(app), namespace=NAMESPACE):
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        report = DrainReport(**json.loads(raw))
        if report.published_at >= since:
            reports.append(report)
    return sorted(reports, key=lambda report: report.replica)
