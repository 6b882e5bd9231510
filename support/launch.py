"""Where this process stands in a torchrun job, from the environment torchrun sets.

Both stages run under `torchrun --nproc-per-node N -m vitscope ...` with no extra flags: stage one
takes its writer part from the rank (writers share a cache by construction, so it needs no process
group), stage two joins a process group to average gradients (train/data_parallel.py). Outside
torchrun the process is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    """Global rank: 0 .. world - 1 across all nodes."""
    world: int = 1
    """Processes in the job (torchrun's WORLD_SIZE)."""
    local_rank: int = 0
    """Rank on this node: which of its GPUs this process uses."""

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The one process that logs, checkpoints and writes shared results."""
        return self.rank == 0


def launch_from_environment() -> Launch:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; rank 0 of 1 when they are not set."""
    return Launch(
        rank=int(os.environ.get("RANK", 0)),
        world=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
