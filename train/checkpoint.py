"""Checkpoints a killed run resumes from exactly: SAE, Adam state, dead-latent counters, position.

A checkpoint is a folder `checkpoints/tokens_NNNNNNNNNNNN/` with the SAE in its usual form
(cfg.json + sae.safetensors), the optimizer's tensors, dead-latent counters and the CPU random
generator's state (optimizer.safetensors), and state.json (step, tokens = the loader's position,
optimizer scalars). The loader needs nothing more: its order is a function of seed and position.
A checkpoint is written into a hidden folder and renamed into place, so one on disk is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.saes.sae import SAE

CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    """Where a run is: everything besides the weights that an exact resume needs."""

    since_fired_F: torch.Tensor
    """Tokens since each latent last fired (dead when above dead_tokens)."""
    step: int = 0
    tokens: int = 0
    """Tokens trained on; also the loader's stream position."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Whole checkpoints of a run, oldest first."""
    folder = run_dir / CHECKPOINTS
    return sorted(folder.glob("tokens_*")) if folder.exists() else []


def save_checkpoint(
    run_dir: Path,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    card: SAECard,
    keep: int,
) -> Path:
    final = run_dir / CHECKPOINTS / f"tokens_{state.tokens:012d}"
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_sae_folder(staging, sae, card)
    tensors, scalars = _optimizer_parts(optimizer)
    tensors["since_fired"] = state.since_fired_F.cpu()
    tensors["cpu_rng_state"] = torch.get_rng_state()
    save_file(tensors, staging / "optimizer.safetensors")
    (staging / "state.json").write_text(
        json.dumps({"step": state.step, "tokens": state.tokens, "optimizer": scalars}, indent=2)
    )
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    folder: Path, sae: SAE, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainState:
    """Restore weights and optimizer in place; return the run's state."""
    sae.load_state_dict(load_file(folder / "sae.safetensors", device=str(device)))
    tensors = load_file(folder / "optimizer.safetensors", device=str(device))
    meta = json.loads((folder / "state.json").read_text())
    since_fired = tensors.pop("since_fired")
    torch.set_rng_state(tensors.pop("cpu_rng_state").cpu())
    params = list(sae.parameters())
    for i, param in enumerate(params):
        slot = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith(f"{i}.")}
        slot.update(meta["optimizer"][str(i)])
        if "step" in slot:
            slot["step"] = torch.tensor(float(slot["step"]))
        optimizer.state[param] = slot
    return TrainState(step=meta["step"], tokens=meta["tokens"], since_fired_F=since_fired)


def _optimizer_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Adam's per-parameter tensors (exp_avg, exp_avg_sq) and scalars (step), keyed by position."""
    tensors, scalars = {}, {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        scalars[str(i)] = {}
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                tensors[f"{i}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[str(i)][name] = float(value)
    return tensors, scalars
