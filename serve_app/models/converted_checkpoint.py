"""A checkpoint in the served dtype, as safetensors on this node's disk, so that every rank can memory-map it.

Why: a tensor-parallel rank needs only its shard, and it costs only that when the weights it slices are
file-backed — safetensors memory-mapped in their own dtype, whose pages every rank of a node shares through
the page cache. A checkpoint in another dtype than the served one (an fp32 or bf16 upload served in fp16)
is cast on load instead, and every rank then holds a private copy of the whole model while DeepSpeed cuts
its shard: eight full copies per node for a 70B model at tp=8.

In: a local checkpoint folder and the served dtype. Out: the folder to load from — the checkpoint itself when
its weights are already in that dtype, otherwise a converted copy under `$LLAMA_SERVE_CACHE/converted/`
(default `~/.cache/llama-serve/converted/`), made once per node and reused while the source files are
unchanged. One process converts while the node's others wait on a file lock; the copy is written to a
staging folder and renamed into place, so a reader never sees half of one. Tensors are cast and written a
slice of rows at a time, so converting costs a process a few MiB of memory, not a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from serve_app.tiny_llama import cache_root

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.float64: "F64"}
FROM_SAFETENSORS_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# Rows are cast and written in pieces of about this size: the converting process's whole working set.
CHUNK_BYTES = 32 * 2**20
# Below this share of the weights' bytes, a cast on load costs less than converting the checkpoint.
CONVERT_ABOVE_SHARE = 0.01


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, as `from_pretrained` would pick them: safetensors first, else .bin."""
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(path for path in folder.glob(pattern) if not path.name.startswith("training_args"))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")


def _open_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a weight file, without reading it: views of the memory-mapped file, whose pages are read
    (into the shared page cache, not this process's memory) only as a slice is cast."""
    if path.suffix != ".safetensors":
        # A legacy (non-zip) pickle cannot be mapped: it is read whole, once, by the one process converting it.
        yield from torch.load(path, map_location="cpu", mmap=_mappable(path), weights_only=True).items()
        return
    # safetensors' own reader copies each tensor it returns into memory; these are views of the mapping.
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    header_size = int.from_bytes(mapping[:8], "little")
    header = json.loads(mapping[8:8 + header_size])
    header.pop("__metadata__", None)
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = FROM_SAFETENSORS_DTYPES[entry["dtype"]]
        if end == begin:
            flat = torch.empty(0, dtype=dtype)
        else:
            with warnings.catch_warnings():  # read-only mapping: these views are only ever read
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mapping, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                        offset=8 + header_size + begin)
        yield name, flat.view(entry["shape"])


def _mappable(path: Path) -> bool:
    """Whether torch can memory-map the file: safetensors, or a pickle in torch.save's zip format (the default
    since torch 1.6; older checkpoints are legacy pickles, which every rank would read into its own memory)."""
    return path.suffix == ".safetensors" or zipfile.is_zipfile(path)


def _needs_cast(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    return tensor.is_floating_point() and tensor.dtype != dtype


def needs_conversion(folder: Path, dtype: torch.dtype) -> bool:
    """Whether loading `folder` in `dtype` would cast (and so privately copy) a meaningful share of it, or read
    a file that cannot be memory-mapped."""
    files = weight_files(folder)
    if not all(_mappable(path) for path in files):
        return True
    total = cast = 0
    for path in files:
        for _, tensor in _open_tensors(path):
            size = tensor.numel() * tensor.element_size()
            total += size
            cast += size if _needs_cast(tensor, dtype) else 0
    return total > 0 and cast > CONVERT_ABOVE_SHARE * total


def memory_mappable_checkpoint(folder: str | Path, dtype: torch.dtype, cache: Path | None = None) -> Path:
    """`folder` itself if its weights are in `dtype`, else its converted copy (made now if missing).

    Falls back to `folder` (a cast on load, as before) with a warning where the cache's disk lacks room or
    the conversion fails.
    """
    folder = Path(folder).resolve()
    if not needs_conversion(folder, dtype):
        return folder
    sources = weight_files(folder)
    root = cache or cache_root() / "converted"
    target = root / _cache_key(folder, sources, dtype)
    root.mkdir(parents=True, exist_ok=True)
    with _node_lock(target.with_name(target.name + ".lock")):
        if (target / "model.safetensors.index.json").is_file():
            return target
        needed = sum(_converted_bytes(path, dtype) for path in sources)
        free = shutil.disk_usage(root).free
        if free < needed * 1.05:
            logger.warning("converting %s to %s needs %.1f GiB and %s has %.1f GiB free: loading it with a cast, "
                           "which costs every rank a private copy of the model", folder, dtype, needed / 2**30,
                           root, free / 2**30)
            return folder
        logger.info("converting %s to %s once for this node, into %s", folder, dtype, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=root))
        try:
            _convert(folder, sources, dtype, staging)
            staging.rename(target)
        except OSError as error:  # a full or failing disk: the load still works, at the old cost
            logger.warning("could not convert %s into %s (%s): loading it with a cast, which costs every rank a "
                           "private copy of the model", folder, target, error)
            return folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _cache_key(folder: Path, sources: list[Path], dtype: torch.dtype) -> str:
    """Names the source (path, and each weight file's size and modification time) and the dtype: a changed
    source gets a new copy rather than a stale one."""
    digest = hashlib.sha256(str(folder).encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{folder.name}-{SAFETENSORS_DTYPES[dtype].lower()}-{digest.hexdigest()[:16]}"


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _converted_bytes(path: Path, dtype: torch.dtype) -> int:
    return sum(tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
               for _, tensor in _open_tensors(path))


def _convert(folder: Path, sources: list[Path], dtype: torch.dtype, out: Path) -> None:
    for item in folder.iterdir():  # config, generation config, tokenizer: everything but the weights
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    weight_map = {}
    for index, source in enumerate(sources, start=1):
        name = f"model-{index:05d}-of-{len(sources):05d}.safetensors"
        for tensor_name in write_safetensors(out / name, _open_tensors(source), dtype):
            weight_map[tensor_name] = name
    # An index even for one file: it tells a reader the copy is complete (written last).
    index_file = {"metadata": {"converted_from": str(folder), "dtype": str(dtype).removeprefix("torch.")},
                  "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def write_safetensors(path: Path, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[str]:
    """Write `tensors` to a safetensors file, floating ones cast to `dtype`, streaming: the file's header is
    computed from the shapes alone, then each tensor is cast and written a slice of rows at a time.

    The safetensors library only writes a dict of tensors already in memory, which for a cast means the
    whole converted file at once; its format (a little-endian u64 header length, a JSON header of dtypes,
    shapes and byte ranges, then the raw bytes) is simple enough to stream.
    """
    entries = []
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        target = dtype if tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * target.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[target], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        entries.append((tensor, target))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the format asks
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for tensor, target in entries:
            flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)
            step = max(1, CHUNK_BYTES // max(1, target.itemsize))
            for start in range(0, flat.numel(), step):
                piece = flat[start:start + step].to(target, copy=True)
                file.write(piece.view(torch.uint8).numpy())
    return [name for name in header if name != "__metadata__"]
