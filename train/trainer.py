"""Train one or several TopK SAEs on one stream of batches; every batch is shared by all of them.

`fit(members, batches, heldout)` is one loop: batch -> each SAE's step -> every `log_every` tokens
and at every checkpoint a log line with a held-out evaluation (MSE by token position included)
-> every `checkpoint_every` tokens a checkpoint. The data is
any iterator of `Batch`: the cache loader in real runs, tensors in tests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vitscope.cache_spec.layout import CacheAttrs
from vitscope.saes.architectures import build_sae
from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.saes.sae import SAE, losses
from vitscope.support.configs import config_dict
from vitscope.support.records import absolute
from vitscope.support.run_log import LogRecord, append_record
from vitscope.train.checkpoint import TrainState, save_checkpoint
from vitscope.train.config import TrainConfig
from vitscope.train.data_parallel import DataParallel
from vitscope.train.loader import Batch, distinct_images
from vitscope.train.metrics import WindowStats, heldout_metrics
from vitscope.train.outliers import TokenNorms
from vitscope.train.tensorboard import TensorBoardLog


@dataclass
class Member:
    """One SAE of a run or sweep, with its optimizer, its state and its run folder."""

    cfg: TrainConfig
    sae: SAE
    optimizer: torch.optim.Optimizer
    state: TrainState
    stats: WindowStats = field(default_factory=WindowStats)
    board: TensorBoardLog | None = None
    """Live curves when cfg.tensorboard; fit opens it before the first step and closes it."""
    norms: TokenNorms | None = None
    """The run's token-norm thresholds (outliers), set by fit from the held-out images."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def open_board(self) -> None:
        """Before any step, so a missing tensorboard package fails before training, not at the
        first log line."""
        if self.cfg.tensorboard:
            self.board = TensorBoardLog(self.run_dir / "tensorboard", resumed_at=self.state.tokens)

    def log(self, record: LogRecord) -> None:
        append_record(self.run_dir, record)
        if self.board is not None:
            self.board.write(record)

    def card(self) -> SAECard:
        """The SAE's card as of now: its input scale and the tokens trained so far."""
        training = self.sae.card.training
        if training is not None and self.norms is not None:
            training = {**training, **self.norms.record()}
        return dataclasses.replace(
            self.sae.card,
            input_scale=float(self.sae.input_scale),
            tokens_trained=self.state.tokens,
            training=training,
        )


def new_adam(parameters: Iterable[torch.nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Adam in one fused kernel per step: PyTorch's default (foreach) update of two 65,536 x 1,024
    matrices took 1.2 s per step on a 2-core CPU against 0.055 s fused, and 2.7 ms of an H200
    step's 12.8 (BENCHMARKS.md)."""
    return torch.optim.Adam(parameters, lr=lr, eps=eps, fused=True)


def new_member(
    cfg: TrainConfig,
    d_in: int,
    sample_ND: torch.Tensor,
    device: torch.device,
    cache: CacheAttrs | None = None,
) -> Member:
    """A fresh SAE initialised on a sample of the training data (input scale, b_pre), outliers
    left out when the run excludes them (by the sample's own median); `cache` names the model
    and weights the SAE's card records."""
    card = SAECard(
        d_in=d_in,
        n_latents=cfg.n_latents,
        options=cfg.sae_options(),
        input_norm=cfg.input_norm,
        model=cache.model if cache else None,
        pretrained=cache.pretrained if cache else None,
        layer=cfg.layer,
        token_set=cfg.token_set,
        cache_spec_version=cache.spec_version if cache else None,
        training={**config_dict(cfg), "cache": absolute(cfg.cache)},
    )
    sae = build_sae(card, seed=cfg.seed, selection=cfg.selection_on(device))
    with torch.no_grad():
        sae.w_enc.mul_(cfg.encoder_init_scale)
    sae.initialise_from(TokenNorms.of_tokens(sample_ND, cfg.exclude_outlier_tokens).kept(sample_ND))
    sae.to(device)
    optimizer = new_adam(sae.parameters(), cfg.peak_lr, cfg.adam_eps)
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
    return Member(cfg, sae, optimizer, TrainState(since_fired_F=since_fired))


def train_step(
    member: Member,
    x_BD: torch.Tensor,
    parallel: DataParallel | None = None,
    consumed: int | None = None,
) -> None:
    """One optimizer step of the recipe on a batch of training inputs (`training_inputs`): this
    process's share of the global batch when `parallel` spans several ranks. `consumed`: the
    stream tokens the batch stands for, when outliers were left out of it (default: its size),
    so that tokens trained stays the stream position a resume seeks to."""
    cfg, sae, state = member.cfg, member.sae, member.state
    world = parallel.world if parallel else 1
    consumed = len(x_BD) if consumed is None else consumed
    dead_F = state.since_fired_F > cfg.dead_window
    out = sae.autoencode(x_BD, dead_F if cfg.aux_coefficient else None, cfg.k_aux_for(sae.d_in))
    terms = losses(sae, out, x_BD, cfg.aux_coefficient)
    member.optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if parallel:
        parallel.average_gradients(sae)
    if cfg.unit_decoder:
        sae.remove_parallel_decoder_grad()
    for group in member.optimizer.param_groups:
        group["lr"] = cfg.lr_at(state.tokens)
    member.optimizer.step()
    if parallel:
        parallel.average_buffers(sae, sae.running_buffers)
    if cfg.unit_decoder:
        sae.normalize_decoder()
    with torch.no_grad():
        fired_F = torch.zeros_like(dead_F)
        fired_F[out.fired_latents()] = True
        if parallel:
            fired_F = parallel.fired_anywhere(fired_F)
        state.since_fired_F += consumed * world
        state.since_fired_F[fired_F] = 0
    state.step += 1
    state.tokens += consumed * world
    member.stats.add(terms, out, dead_F)


def fit(
    members: list[Member],
    batches: Iterator[Batch],
    heldout_NTD: torch.Tensor,
    token_slice: slice,
    parallel: DataParallel | None = None,
) -> None:
    """Train every member to its cfg.tokens on the same batches; with `parallel`, each rank's
    batches are its share of the global batch, and only the main rank logs and saves."""
    main = parallel is None or parallel.is_main
    world = parallel.world if parallel else 1
    cfg = members[0].cfg
    devices = list(dict.fromkeys(member.sae.b_pre.device for member in members))
    tokens = members[0].state.tokens
    norms = TokenNorms.of(heldout_NTD, token_slice, cfg.exclude_outlier_tokens)
    for member in members:
        member.norms = norms
    if main:
        for member in members:
            member.open_board()
    progress = tqdm(
        total=cfg.tokens,
        initial=tokens,
        unit="tok",
        unit_scale=True,
        desc="train",
        disable=not main,
    )
    window = _Clock()
    while tokens < cfg.tokens:
        waited = time.perf_counter()
        batch = next(batches)
        window.wait += time.perf_counter() - waited
        on_device = _on_devices(batch.acts_BD, devices, norms)
        for member in members:
            x_BD = on_device[member.sae.b_pre.device]
            train_step(member, member.sae.training_inputs(x_BD), parallel, len(batch.acts_BD))
        step_tokens = len(batch.acts_BD) * world
        tokens += step_tokens
        window.tokens += step_tokens
        window.distinct.append(distinct_images(batch))
        progress.update(step_tokens)
        done = tokens >= cfg.tokens
        if not main:
            continue
        logged = (cfg.log_every, cfg.checkpoint_every)  # a window per checkpoint, at least
        if done or any(_crossed(tokens, step_tokens, every) for every in logged):
            for member in members:
                record = _log_record(member, heldout_NTD, token_slice, window, norms)
                member.log(record)
            progress.set_postfix_str(_postfix(record))
            window = _Clock()
        if not done and _crossed(tokens, step_tokens, cfg.checkpoint_every):
            for member in members:
                save_checkpoint(
                    member.run_dir,
                    member.sae,
                    member.optimizer,
                    member.state,
                    member.card(),
                    member.cfg.keep_checkpoints,
                )
    progress.close()
    if not main:
        return
    for member in members:
        save_sae_folder(member.run_dir, member.sae, member.card())
        if member.board is not None:
            member.board.close()


def _on_devices(
    acts_BD: torch.Tensor, devices: list[torch.device], norms: TokenNorms
) -> dict[torch.device, torch.Tensor]:
    """The batch as float32 on every device that trains an SAE, outliers left out if asked: one
    copy per device, converted there (the batch arrives float16, so half the bytes cross each
    link)."""
    return {device: norms.kept(acts_BD.to(device, non_blocking=True).float()) for device in devices}


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    tokens: int = 0
    distinct: list[int] = field(default_factory=list)


def _crossed(tokens: int, step: int, every: int) -> bool:
    return tokens // every != (tokens - step) // every


def _log_record(
    member: Member,
    heldout_NTD: torch.Tensor,
    token_slice: slice,
    window: _Clock,
    norms: TokenNorms,
) -> LogRecord:
    elapsed = time.perf_counter() - window.start
    record = LogRecord(
        tokens=member.state.tokens,
        step=member.state.step,
        lr=member.cfg.lr_at(member.state.tokens),
        **member.stats.summary(),
        tokens_per_s=window.tokens / elapsed,
        loader_wait_fraction=window.wait / elapsed,
        distinct_images_per_batch=sum(window.distinct) / len(window.distinct),
        distinct_images_per_batch_min=min(window.distinct),
        heldout=heldout_metrics(member.sae, heldout_NTD, token_slice, member.cfg.batch_size, norms),
    )
    member.stats = WindowStats()
    return record


def _postfix(record: LogRecord) -> str:
    return (
        f"fvu {record.heldout.fvu:.3f} L0 {record.l0:.1f} "
        f"dead {record.dead_fraction:.1%} wait {record.loader_wait_fraction:.0%}"
    )
