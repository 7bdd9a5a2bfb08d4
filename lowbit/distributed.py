"""Compiling across processes on torch.distributed: ``torchrun --nproc-per-node N -m lowbit compile ...`` (and
multi-node with torchrun's usual flags) starts N copies of the compile; torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, the rendezvous) says which copy this is. GPTQ splits its calibration samples across the
ranks, sums each Hessian over them (all-reduce) and solves the layers that share one Hessian on different ranks,
each result broadcast to all; rank 0 alone prints progress and writes the artifact. gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the compile's processes; ``Ranks()`` is the one-process compile."""
    rank: int = 0
    world: int = 1
    joined: bool = False          # this compile started the process group (and leaves it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the first ranks take one more when n % world != 0)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def owner(self, i: int) -> int:
        """The rank that computes item ``i`` of a set every rank needs."""
        return i % self.world

    def sum(self, tensor):
        """``tensor`` summed over the ranks, in place (every rank gets the sum)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj, src: int):
        """``obj`` as rank ``src`` has it, on every rank (pickled between the compile's own processes)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise LowbitError(f"WORLD_SIZE={text!r} is not a positive integer; start distributed compiles with torchrun")
    return int(text)


def join(device: str) -> Ranks:
    """This process's Ranks, joining torchrun's process group (gloo for a CPU ``device``, NCCL for CUDA) when
    more than one process was started; ``Ranks()`` otherwise."""
    world = world_size()
    if world == 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise LowbitError("this torch build has no torch.distributed; run the compile in one process")
    joined = not dist.is_initialized()
    if joined:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), joined)


def leave(ranks: Ranks) -> None:
    """Leave the process group if ``join`` started it (a caller's own group stays)."""
    if ranks.joined:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def local_device(device: str) -> str:
    """``auto``/``cuda`` under torchrun: this process's own GPU (``LOCAL_RANK``)."""
    if world_size() > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
