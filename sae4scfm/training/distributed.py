"""torch.distributed for every stage: which rank this process is, collectives that are no-ops in
a single process, and the DistributedDataParallel wrapper of an SAE's loss.

A process started by ``torchrun`` (``WORLD_SIZE`` > 1 in its environment) joins the process
group on first use: gloo on CPU, nccl on CUDA (each rank on ``cuda:<LOCAL_RANK>``). Outside
torchrun every helper acts as the only rank of a world of one, so code paths are the same.

How the stages use it:

- extraction (``store.extract``): the shard plan (a seed-shared permutation of the cells in
  length-bucketed batches grouped into shards) is the same on every rank; rank r writes shards
  r, r + W, ... (its DataLoader workers split that rank's batches); rank 0 writes the one
  ``meta.json`` after a barrier.
- training (``training.trainer``): one SAE -> DistributedDataParallel at the same global batch
  (each rank takes its ``batch_size / W`` slice of every global batch; gradients are averaged, so
  the update equals a one-process step on the whole batch for per-token mean losses); a sweep of
  several SAEs -> members spread over ranks round robin, each rank training its members on whole
  batches from the same activation stream, no gradient exchange.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks(device: str = "cpu") -> Ranks:
    """This process's ranks; under torchrun joins the process group once (gloo for a CPU
    ``device``, nccl for CUDA, which also selects ``cuda:<LOCAL_RANK>``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def rank_device(device: str, r: Ranks) -> str:
    """``cuda`` -> ``cuda:<local_rank>`` under torchrun; any other device as given."""
    return f"cuda:{r.local_rank}" if r.world > 1 and device == "cuda" else device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable Python objects made by our own code only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) of ``t`` over ranks; ``t`` itself in one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class LossModule(torch.nn.Module):
    """An SAE whose ``forward`` is its training loss, so DistributedDataParallel (which hooks
    ``forward``) averages the gradients of ``sae.loss(x, dead)`` over ranks."""

    def __init__(self, sae: torch.nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.sae.loss(x, dead=dead)


def data_parallel(sae: torch.nn.Module) -> torch.nn.Module:
    """``LossModule(sae)`` under DistributedDataParallel (buffers are not broadcast: running
    statistics such as BatchTopK's threshold stay per rank and are recalibrated at the end)."""
    device_ids = [sae.b_dec.device.index] if sae.b_dec.is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(LossModule(sae), device_ids=device_ids,
                                                     broadcast_buffers=False)
