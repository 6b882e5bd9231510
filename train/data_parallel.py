"""One SAE trained by several processes: each rank streams its own part of the cache and gradients
are averaged by all-reduce after every backward, so every rank holds the same SAE after every step.

This equals one process training on the union of the ranks' batches (within float rounding): the
reconstruction loss is a mean over tokens and every rank's share of a global batch is equally
large, so the mean of the ranks' gradients is the global batch's gradient. Two terms are computed
per rank's share instead of per global batch, and differ slightly: AuxK's normalisation and
`input_norm = "standardize"` (each share is standardised by its own mean and std); so does the
batch rule of BatchTopK and Matryoshka SAEs (each rank keeps the top B·k of its own share), whose
threshold the ranks average after every step.

DistributedDataParallel hooks `forward()`; the trainer calls `autoencode` with its own autograd
functions, so the all-reduce here is explicit (one flattened bucket per step). Latents count as
fired when they fire on any rank, so every rank agrees on which are dead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from vitscope.support.launch import Launch


class DataParallel:
    """The collectives of data-parallel training; with one process, each is a no-op."""

    def __init__(self, launch: Launch, device: torch.device) -> None:
        self.launch = launch
        if launch.distributed and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def world(self) -> int:
        return self.launch.world

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def average_gradients(self, module: nn.Module) -> None:
        """Every parameter's gradient becomes the mean of the ranks' gradients."""
        if not self.launch.distributed:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def average_buffers(self, module: nn.Module, names: tuple[str, ...]) -> None:
        """The named buffers (statistics each rank updates on its own share, such as BatchTopK's
        threshold) become the mean of the ranks' values."""
        if not self.launch.distributed:
            return
        for name in names:
            buffer = module.get_buffer(name)
            dist.all_reduce(buffer)
            buffer /= self.world

    def fired_anywhere(self, fired_F: Tensor) -> Tensor:
        """Latents that fired on any rank's share of the batch."""
        if not self.launch.distributed:
            return fired_F
        counts = fired_F.to(torch.int32)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return counts.bool()

    def gather(self, sample_ND: Tensor) -> Tensor:
        """The ranks' samples concatenated in rank order (equal shapes on every rank)."""
        if not self.launch.distributed:
            return sample_ND
        parts = [torch.empty_like(sample_ND) for _ in range(self.world)]
        dist.all_gather(parts, sample_ND.contiguous())
        return torch.cat(parts)

    def broadcast(self, module: nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers (the input scale among them)."""
        if not self.launch.distributed:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def close(self) -> None:
        if self.launch.distributed and dist.is_initialized():
            dist.destroy_process_group()
