"""Process-group helpers for decisions every rank must take together (with or without accelerate).

Under ``torch.distributed`` (accelerate initialises it too) a skip or stop decided on one rank
alone deadlocks the others in the next collective (DDP's gradient all-reduce), so flags are
all-reduced: ``all_ranks(ok)`` is True iff ``ok`` holds on every rank. Without a process group
(or with one rank) every helper is a no-op.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["process_group", "is_main_process", "barrier", "all_ranks", "broadcast_hex"]


def process_group() -> Any:
    """``torch.distributed`` when a process group of more than one rank is running, else None."""
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


def is_main_process(accelerator: Any = None) -> bool:
    if accelerator is not None:
        return accelerator.is_main_process
    d = process_group()
    return d is None or d.get_rank() == 0


def barrier(accelerator: Any = None) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif process_group() is not None:
        process_group().barrier()


def all_ranks(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True iff ``ok`` holds on every rank: one all-reduce (sum) of a 0/1 flag on ``device``
    (the GPU under NCCL)."""
    d = process_group()
    if d is None:
        return ok
    bad = torch.tensor([0.0 if ok else 1.0], device=device)
    d.all_reduce(bad, op=d.ReduceOp.SUM)
    return float(bad) == 0.0


def broadcast_hex(value: str, device: torch.device | str = "cpu") -> str:
    """Rank 0's hex string (fixed length on every rank, e.g. a run id) on every rank."""
    d = process_group()
    if d is None:
        return value
    buf = torch.tensor(list(bytes.fromhex(value)), dtype=torch.uint8, device=device)
    d.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).hex()
