"""Which torch device a job runs on."""

from __future__ import annotations

from vitscope.support.launch import launch_from_environment


def resolve_device(device: str) -> str:
    """'auto' means the GPU when there is one; under torchrun, a CUDA device is this process's
    own GPU (cuda:LOCAL_RANK), so N ranks on a node use its N GPUs."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    launch = launch_from_environment()
    if device == "cuda" and launch.distributed:
        return f"cuda:{launch.local_rank}"
    return device
