"""A checkpoint in another dtype than the served one is converted once per node into memory-mappable safetensors
(`models/converted_checkpoint.py`), so that a tensor-parallel rank's only private copy is its shard."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serve_app.models import converted_checkpoint
from serve_app.models.converted_checkpoint import memory_mappable_checkpoint, write_safetensors


def build(folder: Path, dtype: torch.dtype, safetensors: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(config).to(dtype)
    if safetensors:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def load(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_the_converted_copy_is_the_model_cast_on_load(tmp_path, safetensors):
    source = build(tmp_path / "fp32", torch.float32, safetensors)
    copy = memory_mappable_checkpoint(source, torch.bfloat16, tmp_path / "cache")
    assert copy != source.resolve() and copy.parent == tmp_path / "cache"
    assert (copy / "config.json").is_file()
    cast_on_load, converted = load(source, torch.bfloat16), load(copy, torch.bfloat16)
    expected = cast_on_load.state_dict()
    for name, tensor in converted.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name]), name
    tokens = torch.tensor([[1, 5, 77, 299]])
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, cast_on_load(tokens).logits)


def test_a_legacy_pickle_is_converted_even_in_the_served_dtype(tmp_path):
    """torch cannot memory-map a pre-1.6 pickle: read in place, every rank would hold the whole model."""
    source = build(tmp_path / "legacy", torch.float32, False)
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    torch.save(state, source / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    copy = memory_mappable_checkpoint(source, torch.float32, tmp_path / "cache")
    assert copy != source.resolve()
    converted = load(copy, torch.float32).state_dict()
    for name, tensor in load(source, torch.float32).state_dict().items():
        assert torch.equal(converted[name], tensor), name


def test_a_failed_conversion_loads_with_a_cast_and_says_so(tmp_path, monkeypatch, caplog):
    source = build(tmp_path / "fp32", torch.float32, True)

    def full_disk(*args) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converted_checkpoint, "_convert", full_disk)
    with caplog.at_level(logging.WARNING, logger=converted_checkpoint.__name__):
        assert memory_mappable_checkpoint(source, torch.bfloat16, tmp_path / "cache") == source.resolve()
    assert "No space left" in caplog.text
    assert [path.name for path in (tmp_path / "cache").iterdir() if path.is_dir()] == []  # no half copy


def test_a_checkpoint_already_in_the_served_dtype_is_used_in_place(tmp_path):
    source = build(tmp_path / "bf16", torch.bfloat16, True)
    assert memory_mappable_checkpoint(source, torch.bfloat16, tmp_path / "cache") == source.resolve()
    assert not (tmp_path / "cache").exists()


def test_the_copy_is_made_once_and_again_when_the_source_changes(tmp_path):
    source = build(tmp_path / "fp32", torch.float32, True)
    first = memory_mappable_checkpoint(source, torch.float16, tmp_path / "cache")
    written = {path.name: path.stat().st_mtime_ns for path in first.iterdir()}
    assert memory_mappable_checkpoint(source, torch.float16, tmp_path / "cache") == first
    assert {path.name: path.stat().st_mtime_ns for path in first.iterdir()} == written
    (source / "model.safetensors").unlink()
    build(tmp_path / "fp32", torch.float32, True)  # new weights in the same folder
    assert memory_mappable_checkpoint(source, torch.float16, tmp_path / "cache") != first


def _someone_waits_on(lock_file: Path) -> bool:
    """Whether a process is blocked taking the file lock on `lock_file` (a `->` line of /proc/locks)."""
    inode = f":{lock_file.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def _convert_in_child(source: str, cache: str, start, conversions, results) -> None:
    convert = converted_checkpoint._convert

    def convert_once_the_other_rank_arrived(*args) -> None:
        conversions.append(os.getpid())
        # The race is real only if the other rank tries while this one converts: hold the conversion until it
        # is seen blocked on the lock, or (without a lock) converting too.
        lock_file = next(Path(cache).glob("*.lock"))
        deadline = time.monotonic() + 120
        while not _someone_waits_on(lock_file) and len(conversions) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        convert(*args)

    converted_checkpoint._convert = convert_once_the_other_rank_arrived
    start.wait()
    results.append(str(memory_mappable_checkpoint(source, torch.bfloat16, Path(cache))))


def test_ranks_converting_at_once_share_one_complete_copy(tmp_path):
    source = build(tmp_path / "fp32", torch.float32, True)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start, conversions, results = manager.Barrier(2), manager.list(), manager.list()
        ranks = [context.Process(target=_convert_in_child,
                                 args=(str(source), str(tmp_path / "cache"), start, conversions, results))
                 for _ in range(2)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=300)
        assert [process.exitcode for process in ranks] == [0, 0]
        paths, converted_by = set(results), list(conversions)
    assert len(paths) == 1
    assert len(converted_by) == 1  # the other waited for its copy
    folders = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert [str(folder) for folder in folders] == list(paths)  # no staging folder left behind
    index = json.loads((folders[0] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load(source, torch.float32).state_dict())


def test_without_room_for_a_copy_it_casts_on_load_and_says_so(tmp_path, monkeypatch, caplog):
    source = build(tmp_path / "fp32", torch.float32, True)
    monkeypatch.setattr(converted_checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with caplog.at_level(logging.WARNING, logger=converted_checkpoint.__name__):
        assert memory_mappable_checkpoint(source, torch.bfloat16, tmp_path / "cache") == source.resolve()
    assert "private copy" in caplog.text


def test_streamed_file_reads_back_with_the_safetensors_library(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(converted_checkpoint, "CHUNK_BYTES", 64)  # many slices per tensor
    tensors = {"weight": torch.randn(33, 7), "positions": torch.arange(10), "scalar": torch.tensor(3.5),
               "empty": torch.empty(0, 4)}
    write_safetensors(tmp_path / "out.safetensors", iter(tensors.items()), torch.float16)
    read = load_file(tmp_path / "out.safetensors")
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
