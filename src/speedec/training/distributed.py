"""Process layout of a run: one process, or data parallel under ``torchrun``.

``torchrun`` describes each process through environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, and the rendezvous address); without them the run is
a single process and nothing here touches torch.distributed. CPU ranks talk
over gloo, CUDA ranks over nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError


@dataclass(frozen=True)
class Distributed:
    # This process's index among world_size processes (0 is the main one).
    rank: int
    world_size: int
    # Index of this process on its machine (picks its GPU).
    local_rank: int
    # Device this process computes on.
    device: torch.device
    # Whether this object started the process group (and so must end it).
    owns_group: bool

    @property
    def is_main(self) -> bool:
        """The process that writes checkpoints, metrics and progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place (identity for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def autocast(device: torch.device):
    """bf16 matmuls on CUDA (losses are still taken in float32); CPU computes in float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for but no CUDA device is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def launched_rank() -> int:
    """This process's rank as ``torchrun`` set it (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device_preference: str) -> Distributed:
    """Join the ``torchrun`` process group if launched by it; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size == 1:
        return Distributed(rank=0, world_size=1, local_rank=0, device=device, owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       owns_group=owns_group)
