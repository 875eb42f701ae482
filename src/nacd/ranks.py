"""The processes of a torchrun / ``accelerate launch`` job, as the small interface the stages that split
work between them need: which items fall to this process, gathering per-item results, summing
gradients, waiting for each other. One process (no launcher) is the same interface with ``world`` 1,
so a stage has one code path.

The process group is accelerate's (``PartialState``: NCCL on GPUs, gloo on the CPU), as the training
loop and LESS's features use it.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """Indices ``i`` of ``n`` items that fall to this process: ``i % world == rank`` (round robin, so
        the split does not depend on anything but ``n`` and the world size)."""
        return [i for i in range(n) if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensors: Sequence[Any]) -> None:
        """Sum ``tensors`` over the processes, in place, on every process."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def from_main(self, obj: Any) -> Any:
        """The main process's ``obj`` (picklable), on every process. A stage decides from the run folder
        (skip, resume or start) this way, so that every process takes the same path even when the main
        process has already written what another is about to read."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@functools.cache
def release_at_exit() -> None:
    """Destroy the process group when the interpreter exits (registered once per process). A process
    that ends with a gloo group alive can abort in interpreter finalisation (``terminate called without
    an active exception``, SIGABRT, exit -6, seen in CI on 2026-11-29 after every rank had finished):
    gloo's worker threads still hold objects whose release needs the interpreter. Every place that
    creates the group calls this."""
    atexit.register(destroy_group)


def destroy_group() -> None:
    """Destroy the process group if there is one (at exit, or before a launched process ends itself)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current(cpu: bool | None = None) -> Ranks:
    """This process's place in the launch (``Ranks()`` without a launcher); ``cpu``: the processes work on
    the CPU (gloo) even where CUDA is present (default: only where it is not)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)
    release_at_exit()
    return Ranks(state.process_index, state.num_processes)
