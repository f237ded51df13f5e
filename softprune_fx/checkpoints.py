"""Training checkpoints: written atomically after every epoch by rank 0, read back (and
broadcast) for an exact resume; the RNG state travels with them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from softprune_fx.passes.errors import SoftpruneError

CHECKPOINT = "checkpoint.pt"
Log = Optional[Callable[[str], None]]


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1




def save_checkpoint(out_dir: Optional[str], state: dict) -> None:
    """Write ``out_dir/checkpoint.pt`` atomically (temp file + rename); rank 0 only."""
    if out_dir is None or world()[0] != 0:
        return
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def load_checkpoint(out_dir: Optional[str], config: dict, log: Log = None) -> Optional[dict]:
    """Rank 0's ``out_dir/checkpoint.pt`` (sent to every rank), or None if there is none;
    raises if it was written with another ``config`` (ratio, epochs, seed): no exact resume."""
    rank, size = world()
    path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    state = None
    if rank == 0 and path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    if size > 1:
        box = [state]
        dist.broadcast_object_list(box, 0)
        state = box[0]
    if state is None:
        if log and rank == 0:
            log(f"no checkpoint at {path}; starting from scratch")
        return None
    if state.get("config") != config:
        raise SoftpruneError(f"cannot resume from {path}: it was written with {state.get('config')}, "
                             f"this run asks for {config}")
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
