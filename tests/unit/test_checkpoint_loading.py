"""Loading a checkpoint in an engine's own process leaves nothing behind on the machine when that process is
stopped without a clean exit (as Ray and the replica stop it)."""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path

from serve_app.config import ModelConfig


def _load_and_report_named_semaphores(pipe: Connection, checkpoint: str) -> None:
    """In a spawned process, as the engine's: load the checkpoint, send the names of the POSIX semaphores that
    `multiprocessing` created meanwhile (unnamed ones are unlinked at once and cannot leak), then die by
    SIGKILL, so that no exit handler removes anything."""
    from multiprocessing import synchronize

    created: list[str] = []
    original = synchronize.SemLock.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self._semlock.name is not None:
            created.append(self._semlock.name)

    synchronize.SemLock.__init__ = recording
    from serve_app.models.checkpoint import load_checkpoint

    load_checkpoint(ModelConfig(source=checkpoint, served_model_id="tiny", dtype="float32"))
    pipe.send(created)
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_engine_process_killed_after_loading_leaves_no_semaphore_in_dev_shm(tiny_checkpoint: Path):
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_load_and_report_named_semaphores, args=(theirs, str(tiny_checkpoint)))
    process.start()
    assert ours.poll(300), "the loading process sent nothing"
    created = ours.recv()
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    leaked = [name for name in created if Path("/dev/shm", "sem." + name.lstrip("/")).exists()]
    assert created == [], f"loading created named semaphores {created}; left in /dev/shm: {leaked}"
