"""Stage two's entry: check the cache and config, build or resume the SAEs, fit, report.

`train([cfg])` trains one SAE; `train(sweep_configs(path))` trains a sweep on one pass.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vitscope.cache_spec.layout import CacheAttrs
from vitscope.cache_spec.store import Cache, open_cache
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting, MissingInput, OutputExists
from vitscope.support.extras import has_module
from vitscope.support.launch import Launch, launch_from_environment
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.progress import status
from vitscope.support.run_log import drop_records_after
from vitscope.train.checkpoint import CHECKPOINTS, checkpoint_dirs, load_checkpoint
from vitscope.train.config import TrainConfig
from vitscope.train.data_parallel import DataParallel
from vitscope.train.loader import ActivationStream, Batch
from vitscope.train.trainer import Member, fit, new_member

RUN_FOLDER = holding(
    "a run with checkpoints (continue it with --resume)", f"{CHECKPOINTS}/tokens_*"
)
"""The only existing run folder training may write into: one it saved checkpoints in."""

INIT_SAMPLE_TOKENS = 65536
"""Tokens used to set the input scale and b_pre (geometric median) of a new SAE."""


def train(configs: list[TrainConfig]) -> list[Path]:
    """Train the SAEs of `configs` (one, or a sweep sharing every batch); returns run folders.
    Under torchrun the ranks train them data-parallel (train/data_parallel.py): each streams its
    part of the cache, `batch_size` is the global batch, and rank 0 logs and saves."""
    base = configs[0]
    for cfg in configs:
        check_output_path(cfg.run_dir, "--out", overwrite=cfg.overwrite, own=RUN_FOLDER)
    cache = open_cache(base.cache, layer=base.layer)
    _check_ready(cache, base)
    launch = launch_from_environment()
    device = torch.device(resolve_device(base.device))
    stream = training_stream(base, cache, device, launch)
    parallel = DataParallel(launch, device)
    try:
        status(f"reading {base.eval_images} held-out images of {cache.path}")
        heldout_NTD, _ = stream.heldout_images(base.eval_images)
        if base.resume:
            members = [
                resume_member(cfg, cache.attrs, on, launch)
                for cfg, on in zip(configs, member_devices(base, len(configs), device), strict=True)
            ]
            positions = {m.state.tokens for m in members}
            if len(positions) > 1:
                raise BadSetting(
                    f"the sweep's newest checkpoints are at different tokens: {positions}"
                )
            batches = stream.batches(positions.pop() // launch.world)
        else:
            for cfg in configs:
                if checkpoint_dirs(cfg.run_dir):
                    raise OutputExists(
                        f"{cfg.run_dir} already has checkpoints; pass --resume to continue it, "
                        "or choose a new --out"
                    )
            batches = stream.batches(0)
            status(
                f"initialising {len(configs)} SAE(s) on the first {INIT_SAMPLE_TOKENS:,} tokens "
                "(input scale, b_pre at their geometric median)"
            )
            share = min(INIT_SAMPLE_TOKENS // launch.world, stream.epoch_tokens)
            first = _first_batches(batches, share)
            sample = parallel.gather(torch.cat([batch.acts_BD for batch in first]).float())
            members = [
                new_member(cfg, cache.attrs.d_model, sample, device, cache.attrs) for cfg in configs
            ]
            for member in members:
                parallel.broadcast(member.sae)
            batches = itertools.chain(first, batches)
        fit(
            members,
            batches,
            heldout_NTD,
            stream.token_slice,
            parallel,
        )
    finally:
        parallel.close()
    run_dirs = [member.run_dir for member in members]
    if launch.is_main:
        _draw_reports(run_dirs, cache.attrs.token_layout)
    return run_dirs


def member_devices(
    cfg: TrainConfig, n_members: int, device: torch.device, gpus: int | None = None
) -> list[torch.device]:
    """Where each SAE of a sweep trains: all on `device`, or with `distribute_saes` on the
    node's `gpus` in turn (without GPUs, on `device`)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if not cfg.distribute_saes or device.type != "cuda" or gpus < 2:
        return [device] * n_members
    if launch_from_environment().distributed:
        raise BadSetting(
            "--distribute-saes places a sweep's SAEs on one node's GPUs from one process; "
            "run it without torchrun (or train each SAE data-parallel without the flag)"
        )
    return [torch.device("cuda", i % gpus) for i in range(n_members)]


def training_stream(
    cfg: TrainConfig, cache: Cache, device: torch.device, launch: Launch
) -> ActivationStream:
    """This process's stream of training batches: under torchrun, its rank's part of the
    cache in batches of batch_size / world tokens."""
    if cfg.batch_size % launch.world:
        raise BadSetting(
            f"batch_size {cfg.batch_size} must be a multiple of the {launch.world} ranks: it is "
            "the global batch, split evenly between them"
        )
    return ActivationStream(
        cache,
        cfg.layer,
        tokens=cfg.token_set,
        batch_size=cfg.batch_size // launch.world,
        buffer_tokens=cfg.buffer_tokens,
        seed=cfg.data_seed,
        heldout_fraction=cfg.heldout_fraction,
        readers=cfg.readers,
        pin_memory=device.type == "cuda",
        part=launch.rank,
        parts=launch.world,
    )


def _draw_reports(run_dirs: list[Path], layout: TokenLayout) -> None:
    """report.png per run; a missing matplotlib costs the picture, never the trained SAE."""
    if not has_module("matplotlib"):
        status("no report.png: matplotlib is not installed (pip install 'vitscope[plots]')")
        return
    from vitscope.train.report import plot_run

    for run_dir in run_dirs:
        plot_run(run_dir, layout)


def resume_member(
    cfg: TrainConfig, cache: CacheAttrs, device: torch.device, launch: Launch | None = None
) -> Member:
    """Rebuild a member from the newest checkpoint of its run folder (every rank reads it; the
    main rank trims the log)."""
    d_in = cache.d_model
    found = checkpoint_dirs(cfg.run_dir)
    if not found:
        raise MissingInput(f"{cfg.run_dir}: no checkpoint to resume from; start without --resume")
    saved = json.loads((found[-1] / "cfg.json").read_text())
    if saved["d_in"] != d_in:
        raise BadSetting(
            f"{found[-1]}: the SAE has d_in {saved['d_in']} but the cache's layer has {d_in}; "
            "resume it on the cache it was trained on"
        )
    member = new_member(cfg, d_in, torch.zeros(1, d_in), device, cache)
    member.state = load_checkpoint(found[-1], member.sae, member.optimizer, device)
    if launch is None or launch.is_main:
        drop_records_after(cfg.run_dir, member.state.tokens)
    return member


def _check_ready(cache: Cache, cfg: TrainConfig) -> None:
    missing = cache.uncommitted_shards()
    if missing and not cfg.allow_partial:
        raise BadSetting(
            f"{cache.path}: {len(missing)} of {len(cache.attrs.shards)} shards are not committed "
            "(still being written, or failed: see `vitscope cache-info`); wait for `vitscope "
            "cache` to finish, or pass --allow-partial to train on the committed rows"
        )
    if cfg.d_in and cfg.d_in != cache.attrs.d_model:
        raise BadSetting(
            f"{cache.path}: layer {cfg.layer} has d_model {cache.attrs.d_model}, but the config "
            f"says d_in = {cfg.d_in}; fix d_in or pick the cache it was meant for"
        )


def _first_batches(batches: Iterator[Batch], n_tokens: int) -> list[Batch]:
    """Enough of the stream's first batches to hold `n_tokens` tokens; training starts with them
    too, so they are read once."""
    taken: list[Batch] = []
    while sum(len(batch.acts_BD) for batch in taken) < n_tokens:
        taken.append(next(batches))
    return taken
