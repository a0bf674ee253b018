"""Host → device copies that do not stall the device: how every step's small host-built tensors reach it.

A copy from ordinary (pageable) host memory is a blocking one: PyTorch waits for the device's stream to
drain before it returns, so each `torch.tensor(values, device="cuda")` in a step is a host–device sync, and
the host cannot prepare anything while the device works. Staged in pinned memory and copied with
`non_blocking=True`, the copy is queued behind the work already on the stream and the host goes on at once.
PyTorch's pinned-memory cache keeps a staging block until the copies that read it have run, so a fresh one per
copy is safe. On CPU the host tensor is the device tensor: nothing is copied.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without waiting for the device."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python list as a tensor on `device`, without waiting for the device."""
    return to_device(torch.tensor(values, dtype=dtype), device)
