"""`scripts/gpu_check.py`, the one command a user runs on a new GPU, run here on the CPU: it passes on a
working engine and fails, naming the decode path, on one that answers wrongly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from serve_app.engine.cuda_graphs import DecodeGraphs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_passes_here_and_fails_on_a_wrong_decode_path(tmp_path, monkeypatch):
    gpu_check = _load()
    report = tmp_path / "check.json"
    argv = ["--device", "cpu", "--quick", "--max-new", "12", "--out", str(report)]
    assert gpu_check.main(argv) == 0
    passed = json.loads(report.read_text())
    assert passed["passed"] and all(passed["correctness"][path]["exact"] == 5 for path in gpu_check.DECODE_PATHS)

    run = DecodeGraphs.run
    # A graph path whose logits are shifted by one token id: what a bad capture or a stale buffer would do.
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, *args: torch.roll(run(self, *args), 1, dims=-1))
    assert gpu_check.main(argv) == 1
    failed = json.loads(report.read_text())
    assert not failed["passed"] and not failed["correctness"]["graphs_on_equals_off"]
    assert failed["correctness"]["paged+graphs"]["failures"]
    assert not failed["correctness"]["paged"]["failures"] and not failed["correctness"]["gather"]["failures"]
