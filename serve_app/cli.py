"""`llama-serve run CONFIG`: `serve run CONFIG` that drains on SIGTERM and Ctrl-C instead of cutting streams.

`serve run` cuts every answer in flight when it is stopped: a terminal's Ctrl-C reaches Ray's own processes
too (they share its process group), and SIGTERM exits its driver at once, taking the local cluster down.
Under docker, Kubernetes or systemd, SIGTERM is how every stop, restart and rollout begins, so this command
stops in order instead:

1. the first SIGTERM or Ctrl-C posts a drain notice for each application of the config (on its status
   board): its ingress replicas refuse new requests with a 503 and fail `/health`, so a load balancer moves
   away, and let the requests in flight finish (`serve_app/ingress/drain.py`);
2. once no ingress replica has a request in flight, or at the drain deadline (`--drain-timeout-s`; by
   default the config's largest `graceful_shutdown_timeout_s`, which its comments size to outlast the longest
   answer), the service stops: a cluster this command started goes down with its driver, a cluster it joined
   gets `serve run`'s own `serve.shutdown()`. Requests still running at the deadline are ended by the
   service: a stream with one error event, a response not yet begun with a 503;
3. a second signal stops at once (SIGTERM to Serve's driver), a third kills the driver's process group.

How: `serve run` runs in a child process in a session of its own, so that a terminal's Ctrl-C reaches this
process and not Ray's. The parent tells the child to drain with SIGUSR1; the child is Serve's driver, so it
reaches the status board and `serve.status()` through the connection `serve run` opened. The child gets
SIGTERM when the parent dies (PR_SET_PDEATHSIG), so a killed `llama-serve` leaves no cluster behind. Every
other option goes to `serve run` as it is.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

logger = logging.getLogger("llama_serve.cli")

DEFAULT_DRAIN_TIMEOUT_S = 300.0
# After the deadline, what the replicas get to end the requests still running (an error event each) and
# report it, before Serve is shut down under them.
CUT_GRACE_S = 3.0
# A notice outlives the stop by this much: enough for Serve's own shutdown, short enough that a notice left
# behind (its stopper killed) cannot drain a later start on the same cluster for long.
NOTICE_AFTERLIFE_S = 120.0
POLL_S = 0.5
# A draining ingress replica reports every 0.5 s; one silent for this long is gone.
REPORT_FRESH_S = 3.0
SETTLE_S = 1.5
PROGRESS_EVERY_S = 5.0
_PR_SET_PDEATHSIG = 1


def config_applications(config_path: Path) -> tuple[list[str], float | None]:
    """The application names of a `serve run` config, and the largest `graceful_shutdown_timeout_s` any of
    its deployments sets (None when none does)."""
    config = yaml.safe_load(config_path.read_text()) or {}
    names, timeouts = [], []
    for application in config.get("applications", []):
        names.append(application.get("name", "default"))
        # Serve's own per-deployment overrides, and this app's typed ones (`args.deployments`, by role).
        deployments = list(application.get("deployments") or [])
        deployments += list(((application.get("args") or {}).get("deployments") or {}).values())
        for deployment in deployments:
            if (deployment or {}).get("graceful_shutdown_timeout_s") is not None:
                timeouts.append(float(deployment["graceful_shutdown_timeout_s"]))
    return names, max(timeouts) if timeouts else None


class Drainer:
    """Drains applications through their status boards and reports, while their `serve run` keeps running.

    `in_flight(app, since)` returns the number of the app's ingress replicas that reported since `since`,
    and their requests in flight; `ingress_replicas(app)` how many of them Serve runs. Both are injected so
    that the waiting logic runs and is tested without Ray."""

    def __init__(self, apps: Sequence[str], timeout_s: float, post: Callable[[str, float, float], None],
                 in_flight: Callable[[str, float], tuple[int, int]], ingress_replicas: Callable[[str], int],
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.apps, self.timeout_s = list(apps), timeout_s
        self._post, self._in_flight, self._ingress_replicas = post, in_flight, ingress_replicas
        self._clock, self._sleep = clock, sleep

    def drain(self) -> bool:
        """Post the notices, then wait until every ingress replica of every app has seen one and has nothing
        in flight (True), or until the deadline and its grace have passed (False)."""
        started = self._clock()
        cut_at = started + self.timeout_s
        for app in self.apps:
            self._post(app, cut_at, cut_at + NOTICE_AFTERLIFE_S)
        logger.warning("draining %s: new requests get 503; waiting up to %.0f s for the requests in flight",
                       ", ".join(self.apps), self.timeout_s)
        last_progress = float("-inf")
        while True:
            now = self._clock()
            waiting_for = unseen = replicas = 0
            for app in self.apps:
                # Only fresh reports count: a replica that died while draining drops out.
                reported, running = self._in_flight(app, max(started, now - REPORT_FRESH_S))
                expected = self._ingress_replicas(app)
                if now - started < REPORT_FRESH_S:
                    # Serve's view can lag or come back empty (seen once, on a loaded machine, with the
                    # replica serving): until the replicas have had time to report, wait for one at least.
                    expected = max(expected, 1)
                waiting_for += running
                replicas += max(expected, reported)
                unseen += max(0, expected - reported)
            # Every live replica reads the notice every 0.5 s: by SETTLE_S each has reported at least once.
            if now - started >= SETTLE_S and not waiting_for and not unseen:
                logger.warning("drained in %.1f s: nothing in flight on %d ingress replicas", now - started,
                               replicas)
                return True
            if now >= cut_at + CUT_GRACE_S:
                logger.warning("drain deadline passed: %d requests were ended by the service", waiting_for)
                return False
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                logger.warning("draining: %d requests in flight, %d ingress replicas yet to report, %.0f s "
                               "to the deadline", waiting_for, unseen, max(0.0, cut_at - now))
            self._sleep(POLL_S)


def _ray_drainer(apps: Sequence[str], timeout_s: float) -> Drainer:
    from ray import serve

    from serve_app import status_board

    def post(app: str, cut_at: float, expires_at: float) -> None:
        status_board.post_drain_notice(app, status_board.DrainNotice(cut_at=cut_at, expires_at=expires_at))

    def in_flight(app: str, since: float) -> tuple[int, int]:
        reports = status_board.read_drain_reports(app, since)
        return len(reports), sum(report.in_flight for report in reports)

    said_none: set[str] = set()

    def ingress_replicas(app: str) -> int:
        status = serve.status().applications.get(app)
        ingress = status.deployments.get("Ingress") if status is not None else None
        # A replica Serve still calls STARTING may already serve (seen in the suite: the controller's view lags
        # on a loaded machine): every replica not on its way out is one to hear from.
        states = ingress.replica_states if ingress is not None else {}
        running = sum(count for state, count in states.items() if state not in ("STOPPING", "STOPPED"))
        if not running and app not in said_none:
            said_none.add(app)
            logger.warning("Serve reports no running ingress replica of %s (application %s, ingress %s); "
                           "waiting for the replicas' own reports", app,
                           getattr(status, "status", "not found"), getattr(ingress, "replica_states", None))
        return running

    return Drainer(apps, timeout_s, post, in_flight, ingress_replicas)


def _child(config: Path, drain_timeout_s: float | None, serve_args: list[str]) -> None:
    """Serve's driver: `serve run` in this process, and a drain on SIGUSR1 before it stops."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s llama-serve: %(message)s")
    # Imported now, not when the signal comes: it brings torch (seconds), and the drain should begin at once.
    import serve_app.status_board  # noqa: F401
    apps, graceful_s = config_applications(config)
    timeout_s = drain_timeout_s if drain_timeout_s is not None else (graceful_s or DEFAULT_DRAIN_TIMEOUT_S)
    started = threading.Event()

    def drain_then_stop() -> None:
        own_cluster = False
        try:
            import ray

            if ray.is_initialized():
                _ray_drainer(apps, timeout_s).drain()
                own_cluster = _started_this_cluster()
        except Exception:  # a drain that fails must still let the service stop
            logger.exception("draining failed; stopping now")
        # Drained, a cluster this process started goes down with it at once (Ray's exit hook stops its
        # processes, HAProxy included): Serve's own shutdown would first hold each ingress replica open for
        # RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) for load balancers that the drain has already
        # turned away. On a cluster it joined (`--address`), `serve run`'s own Ctrl-C path: serve.shutdown().
        os.kill(os.getpid(), signal.SIGUSR2 if own_cluster else signal.SIGINT)

    def exit_now(signum, frame) -> None:
        raise SystemExit(0)

    def on_drain_signal(signum, frame) -> None:
        if not started.is_set():
            started.set()
            threading.Thread(target=drain_then_stop, name="drain", daemon=True).start()

    # A background job starts with SIGINT ignored, and Python then leaves it so: the drain ends with one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR1, on_drain_signal)
    signal.signal(signal.SIGUSR2, exit_now)
    from ray.serve.scripts import cli as serve_cli

    serve_cli.main(args=["run", str(config), *serve_args], prog_name="serve")


def _started_this_cluster() -> bool:
    """Whether this driver started the Ray cluster it runs on (`serve run` without an address to join)."""
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _run(config: Path, drain_timeout_s: float | None, serve_args: list[str]) -> int:
    """The parent: `serve run` in a child of its own session; signals become drain, stop, kill."""
    command = [sys.executable, "-m", "serve_app.cli", "_child", str(config), *serve_args]
    if drain_timeout_s is not None:
        command[5:5] = ["--drain-timeout-s", str(drain_timeout_s)]
    # preexec_fn is safe here: this process has started no thread.
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    signals_seen = 0

    def on_signal(signum, frame) -> None:
        nonlocal signals_seen
        signals_seen += 1
        try:
            if signals_seen == 1:
                print("llama-serve: draining (new requests get 503; a second Ctrl-C or SIGTERM stops at once)",
                      file=sys.stderr, flush=True)
                child.send_signal(signal.SIGUSR1)
            elif signals_seen == 2:
                print("llama-serve: stopping now", file=sys.stderr, flush=True)
                child.send_signal(signal.SIGTERM)
            else:
                os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity on old Pythons
            continue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-serve", description="Serve a config as `serve run` does, and drain on SIGTERM or Ctrl-C.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="run")
    for name, help_text in (("run", "serve run CONFIG, draining on SIGTERM and Ctrl-C"), ("_child", None)):
        command = commands.add_parser(name, **({"help": help_text} if help_text else {}))
        command.add_argument("config", type=Path, help="a `serve run` config file (configs/*.yaml)")
        command.add_argument("--drain-timeout-s", type=float, default=None,
                             help="how long requests in flight may run after the first signal (default: the "
                                  "config's largest graceful_shutdown_timeout_s, else 300)")
    args, serve_args = parser.parse_known_args(argv)
    if args.command == "_child":
        _child(args.config, args.drain_timeout_s, serve_args)
        return 0
    if not args.config.is_file():
        parser.error(f"{args.config} is not a file: `llama-serve run` takes a serve run config")
    return _run(args.config, args.drain_timeout_s, serve_args)


if __name__ == "__main__":
    sys.exit(main())
