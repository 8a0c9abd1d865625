"""The one reader of torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): this process's place
in a run of several, or a single process in a plain run."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["World"]


class World:
    """This process's rank among ``world`` processes. Process groups are set up by :meth:`setup`
    and taken down by :meth:`close` (nothing to do in a plain run)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def setup(self, backend: str = "gloo") -> None:
        if self.world > 1:
            dist.init_process_group(backend)

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()

    def __enter__(self) -> "World":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def indices(self, n: int, batch_size: int) -> range:
        """Positions in an input list of ``n`` of this process's block: whole batches of a plain
        run (their counts differ by at most 1), so every image meets the same batch neighbours
        and gets the same numbers as in a plain run."""
        batches = -(-n // batch_size)
        first, last = (min(n, r * batches // self.world * batch_size)
                       for r in (self.rank, self.rank + 1))
        return range(first, last)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (``[obj]`` in a plain run), over the process
        group (CPU objects: gloo whatever device the model runs on)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """``flag`` of any process: all of them stop at the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
