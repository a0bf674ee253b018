"""Where a configured model source lives on disk: a folder, a hub id, or the built-in tiny Llama."""

from __future__ import annotations

from pathlib import Path

from serve_app.config import TINY_MODEL_SOURCE


def resolve_checkpoint(source: str) -> str:
    """A local folder or hub id for `from_pretrained`; builds the tiny default on first use."""
    if source == TINY_MODEL_SOURCE:
        from serve_app.tiny_llama import ensure_tiny_llama

        return str(ensure_tiny_llama())
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    return source
