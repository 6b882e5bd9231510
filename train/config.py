"""Every knob of stage two in one typed config; a sweep is a base config plus per-SAE overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_type_hints

import tomllib
import torch

from vitscope.cache_spec.tokens import TokenSet
from vitscope.saes.architectures import ARCHITECTURES, Architecture
from vitscope.saes.architectures.batchtopk import BatchRank
from vitscope.saes.card import Activation, InputNorm, Options
from vitscope.saes.kernels import SelectionPrecision
from vitscope.support.configs import Above, AtLeast, check_bounds, load_config, parse_field
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.shared_options import Device, Overwrite, Resume

SWEEPABLE = ("architecture", "k", "n_latents", "k_aux", "lr", "seed")
"""Settings that may differ between the SAEs of one sweep; all others are shared, because every
batch is shared: the data (cache, layer, token set, batch, order) and the schedule."""


DEAD_TOKENS_AT_MOST = 10_000_000
"""Gao et al.'s dead-latent window, the automatic one's ceiling."""

LR_AT_16K_LATENTS = 2.5e-3
"""The automatic learning rate at 2^14 latents and batches of 4,096: near TopK's best on
bench/planted.py's five worlds; Matryoshka's rarest planted directions 99-100% at it, 97-98% at
0.6x it (three seeds; BENCHMARKS.md, issue 23)."""
LOWER_LR_AT_16K_LATENTS = {"batchtopk": 1.5e-3}
"""Architectures whose automatic rate is lower: BatchTopK's held-out FVU on planted features was
below TopK's at 1.5e-3 (three seeds, five worlds) and only level with it at 2.5e-3."""

CLIP_SCOPE = {
    "tokens": 1_200_000_000,
    "k": 32,
    "n_latents": 65536,
    "batch_size": 4096,
    "token_set": "all",
    "lr": 3e-4,
    "adam_eps": 1e-8,
    "warmup_fraction": 0.0,
    "decay_fraction": 0.0,
    "aux_coefficient": 0.0,
    "dead_tokens": 1_000_000,
    "activation": "none",
    "input_norm": "standardize",
    "unit_decoder": False,
    "encoder_init_scale": 1.0,
}
"""CLIP-Scope's training recipe as its code published it (Lewington-pitsos/sache,
scripts/train_sae.py and sache/model.py): TopK without ReLU, inputs standardised per batch,
constant Adam lr 3e-4 (default eps), free decoder norms, no AuxK (latents unseen for 1 M tokens
are only counted dead). Not reproduced: its latents have no encoder bias (ours starts at 0)."""


@dataclass(frozen=True, kw_only=True)
class RunOptions(Resume, Overwrite):
    """How `vitscope train` and `vitscope sweep` treat their run folders and GPUs."""

    distribute_saes: bool = False
    """A sweep's SAEs on the node's GPUs in turn (SAE i on GPU i mod N), one read of the data
    for all of them: each batch is copied once to each GPU."""


@dataclass(frozen=True)
class TrainConfig(RunOptions, Device):
    """One TopK SAE on one layer of a cache: CLIP-Scope's sizes (k, width, tokens) trained by
    vitscope's recipe, measured against SAELens in bench/planted.py; `preset = "clip-scope"`
    (`--preset clip-scope`) trains CLIP-Scope's own recipe instead."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"vitscope": {}, "clip-scope": CLIP_SCOPE}

    cache: str
    """The activation cache written by `vitscope cache`."""
    preset: Literal["vitscope", "clip-scope"] = "vitscope"
    """Named recipe under the other settings (the CLI, TOML files and sweeps apply it; in Python,
    load_config(TrainConfig, preset=...)): vitscope, or clip-scope (CLIP-Scope's published one)."""
    layer: Annotated[int, AtLeast(0)] = 20
    """Cached layer to train on (residual stream after this block)."""
    out: str = ""
    """Run folder (SAE, checkpoints, log, report); empty = runs/layerLL."""
    token_set: TokenSet = "all"
    """Which tokens of each image: all (CLS, registers and patches, as CLIP-Scope), cls (refused
    for models without one, e.g. SigLIP), or patches; the cache's token layout says where."""
    tokens: Annotated[int, AtLeast(1)] = 1_200_000_000
    """Training tokens in all (CLIP-Scope: 1.2 billion)."""
    architecture: Architecture = "topk"
    """A registered architecture (saes/architectures/): topk: each token's k largest
    pre-activations (Gao et al.); batchtopk: the whole batch's B·k largest, at inference a
    threshold estimated in training; matryoshka: batchtopk whose nested prefixes
    (matryoshka_prefixes) each reconstruct too."""
    matryoshka_prefixes: tuple[float, ...] = (1 / 16, 1 / 4)
    """matryoshka: the inner prefixes' sizes as fractions of n_latents, ascending (all of it is
    the outermost); their reconstruction losses are summed with the full one."""
    prefix_weight: Annotated[float, AtLeast(0)] = 0.05
    """matryoshka: the weight of each inner prefix's reconstruction loss (SAELens: 1). At 1 the
    inner prefixes pull the dictionary toward a few broad latents: on planted features 0.1
    recovered 92% of the directions where 1 recovered 80%; with floor keys at TopK's rate, 0.05
    recovers the rarest quarter of the steepest Zipf world at 58.6-67.2% where 0.1 did at
    52.7-59.0% and TopK at 57.0-59.8% (three seeds), its first 128 of 2,048 latents alone still
    explaining 28% of the variance (0.1: 39%, TopK's: 5%; BENCHMARKS.md, issue 23)."""
    batch_rank: BatchRank = "floor"
    """batchtopk, matryoshka: what the batch rule ranks (and θ thresholds at inference): each
    pre-activation over its token's floor, the token's (2k)-th largest pre-activation; relative,
    over its centred norm; raw, the pre-activations themselves (Bussmann et al., SAELens). Raw
    ranking gives big tokens many latents and starves the rest: on planted features it recovered
    34% of the directions, relative 95%, floor 99% with held-out FVU below TopK's, the recipe
    otherwise the same (BENCHMARKS.md, issue 23)."""
    k: Annotated[int, AtLeast(1)] = 32
    """Active latents per token (batchtopk, matryoshka: on average over a batch)."""
    n_latents: Annotated[int, AtLeast(1)] = 65536
    """Dictionary size (16 x 1024 for ViT-L/14)."""
    k_aux: Annotated[int, AtLeast(0)] = 0
    """Dead latents used by the AuxK loss; 0 = automatic, Gao et al.'s power of two near d_in / 2
    (512 for ViT-L/14's 1,024)."""
    aux_coefficient: Annotated[float, AtLeast(0)] = 1 / 128
    """Weight of the AuxK loss (Gao et al.: 1/32); 0 trains no dead latent. At 1/32 with free
    decoder norms the revived latents fit noise: on planted features with 3x the noise, held-out
    FVU 0.2170 against 0.2065 at 1/128 (three seeds), recovery unchanged (BENCHMARKS.md)."""
    activation: Activation = "relu"
    """Applied to the k kept pre-activations: relu (Gao et al.) or none (CLIP-Scope)."""
    input_norm: InputNorm = "scale"
    """scale: one fixed factor, E|x|^2 = 1; standardize: each batch per feature (CLIP-Scope)."""
    unit_decoder: bool = False
    """Keep decoder rows at unit norm (Gao et al.), or leave their norms free (SAELens,
    CLIP-Scope). Free norms recovered more planted directions (crowded, as many directions as
    latents, three seeds: 74% -> 78%, the rarest quarter 33% -> 37%) at a held-out FVU 0.016
    higher at AuxK 1/32, 0.005 higher at 1/128 (BENCHMARKS.md, issue 23)."""
    encoder_init_scale: Annotated[float, Above(0)] = 0.1
    """Encoder rows start as the decoder rows times this. 0.1 (SAELens' decoder_init_norm, with
    its encoder the decoder's transpose) against Gao et al.'s 1: Adam's steps, the same size
    either way, then turn each encoder row ten times as far early on, and latents that would
    never have fired find features (planted features: 39% of latents unused -> 4%, rarest
    quarter recovered 57% -> 92%; BENCHMARKS.md, issue 23)."""
    batch_size: Annotated[int, AtLeast(1)] = 4096
    """Tokens per step."""
    lr: Annotated[float, AtLeast(0)] = 0.0
    """Peak Adam learning rate; 0 = automatic, c · sqrt(batch_size / 4096) / sqrt(n_latents /
    2^14): Gao et al.'s scaling with width, Adam's square-root scaling with the batch, c = 2.5e-3
    for topk and matryoshka (1.25e-3 at 65,536 latents) and 1.5e-3 for batchtopk, each near the
    best of a sweep on bench/planted.py's worlds at batches of 4,096; without the batch's factor,
    TopK at batches of 1,024 diverged on SynthSAEBench (BENCHMARKS.md, issue 23)."""
    adam_eps: Annotated[float, Above(0)] = 6.25e-10
    """Adam epsilon, as in Gao et al."""
    warmup_fraction: Annotated[float, AtLeast(0)] = 0.05
    """Share of training with a linear learning-rate warm-up from 0."""
    decay_fraction: Annotated[float, AtLeast(0)] = 0.2
    """Share of training, at the end, with a linear decay of the learning rate to 0."""
    dead_tokens: Annotated[int, AtLeast(0)] = 0
    """A latent that has not fired for this many tokens is dead (and trained by AuxK); 0 =
    automatic, a sixteenth of the run up to Gao et al.'s 10 M tokens (10 M for CLIP-Scope's
    1.2 billion; their 10 M never engaged AuxK in a run of a few million, BENCHMARKS.md)."""
    buffer_tokens: Annotated[int, AtLeast(1)] = 2**19
    """Tokens shuffled together (a window of whole chunks); 2^19 mixes ~2,000 images."""
    readers: Annotated[int, AtLeast(1)] = 4
    """Processes reading and decompressing chunks ahead of training."""
    heldout_fraction: Annotated[float, Above(0)] = 0.01
    """Share of chunks (whole images) held out for evaluation."""
    eval_images: Annotated[int, AtLeast(1)] = 64
    """Held-out images evaluated at every log (all their tokens)."""
    log_every: Annotated[int, AtLeast(1)] = 4_194_304
    """Tokens between log lines (and held-out evaluations)."""
    checkpoint_every: Annotated[int, AtLeast(1)] = 100_000_000
    """Tokens between checkpoints."""
    keep_checkpoints: Annotated[int, AtLeast(1)] = 2
    """Checkpoints kept on disk (the newest)."""
    seed: Annotated[int, AtLeast(0)] = 0
    """Seed of the SAE's initial weights."""
    data_seed: Annotated[int, AtLeast(0)] = 0
    """Seed of the held-out split and the token order."""
    selection: Literal["auto", "float32", "bfloat16"] = "auto"
    """The product that picks each token's top k (kept values are float32 either way): auto =
    bfloat16 on a GPU, where the planted-feature FVU did not move (BENCHMARKS.md), else float32."""
    exclude_outlier_tokens: Annotated[float, AtLeast(0)] = 0.0
    """Leave out of training and held-out evaluation every token whose norm is above this many
    times the median token norm of the held-out images (ViTs' high-norm "register" tokens; see
    `vitscope cache-info`); 0 = keep every token, else above 1. The card records the threshold."""
    d_in: Annotated[int, AtLeast(0)] = 0
    """Expected activation width; 0 = take it from the cache, else it must match."""
    allow_partial: bool = False
    """Train on the committed rows of a cache that is still being written."""
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN/tensorboard (needs the tensorboard extra)."""

    def __post_init__(self) -> None:
        check_bounds(self)
        options = self.sae_options()  # an unknown architecture is refused, naming the known ones
        if not 0 < self.k <= self.n_latents:
            raise BadSetting(f"k must be in 1..n_latents, not {self.k}")
        if self.tokens < self.batch_size:
            raise BadSetting(f"tokens ({self.tokens}) must be at least batch_size")
        if not 0 <= self.warmup_fraction + self.decay_fraction <= 1:
            raise BadSetting("warmup_fraction + decay_fraction must be within 0..1")
        if self.activation != "relu" and not hasattr(options, "activation"):
            raise BadSetting(
                f"architecture {self.architecture} keeps positive values only; pass "
                "--activation relu (the clip-scope preset sets none)"
            )
        if 0 < self.exclude_outlier_tokens <= 1:
            raise BadSetting(
                "exclude_outlier_tokens must be 0 (off) or above 1 (a multiple of the median token "
                f"norm), not {self.exclude_outlier_tokens}; cache-info's outliers are above 10"
            )
        widths = (0, *self.matryoshka_widths[:-1], self.n_latents)
        if self.architecture == "matryoshka" and not all(map(int.__lt__, widths, widths[1:])):
            raise BadSetting(
                f"matryoshka_prefixes must ascend within 0..1 and give distinct prefixes of the "
                f"{self.n_latents} latents, not {list(self.matryoshka_prefixes)}"
            )

    def sae_options(self) -> Options:
        """The architecture's options (its card fields) from the settings of the same names; one
        without a setting here (batchtopk's threshold_rate) keeps its default."""
        options = ARCHITECTURES.get_or_raise(self.architecture).Options
        names = [f.name for f in dataclasses.fields(options) if hasattr(self, f.name)]
        return options(**{name: getattr(self, name) for name in names})

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"layer{self.layer:02d}"

    def lr_at(self, tokens_done: int) -> float:
        """Linear warm-up, constant, then linear decay to zero."""
        progress = tokens_done / self.tokens
        scale = 1.0
        if self.warmup_fraction and progress < self.warmup_fraction:
            scale = progress / self.warmup_fraction
        if self.decay_fraction and progress > 1 - self.decay_fraction:
            scale = min(scale, (1 - progress) / self.decay_fraction)
        return self.peak_lr * max(scale, 0.0)

    def selection_on(self, device: torch.device) -> SelectionPrecision:
        """`selection` with auto resolved for the device that trains."""
        if self.selection != "auto":
            return self.selection
        return "bfloat16" if device.type == "cuda" else "float32"

    @property
    def dead_window(self) -> int:
        """`dead_tokens`, or when 0 a sixteenth of the run, at most 10 M tokens."""
        return self.dead_tokens or min(DEAD_TOKENS_AT_MOST, self.tokens // 16)

    def k_aux_for(self, d_in: int) -> int:
        """`k_aux`, or when 0 the power of two nearest d_in / 2."""
        return self.k_aux or 2 ** max(0, round(math.log2(d_in / 2)))

    @property
    def matryoshka_widths(self) -> tuple[int, ...]:
        """matryoshka: the prefix sizes in latents, the last n_latents; () otherwise."""
        if self.architecture != "matryoshka":
            return ()
        return (*(round(f * self.n_latents) for f in self.matryoshka_prefixes), self.n_latents)

    @property
    def peak_lr(self) -> float:
        """`lr`, or when 0 the architecture's rate scaled with the width and batch (see `lr`)."""
        at_16k = LOWER_LR_AT_16K_LATENTS.get(self.architecture, LR_AT_16K_LATENTS)
        return self.lr or at_16k * math.sqrt(self.batch_size / 4096 / (self.n_latents / 2**14))


@dataclass(frozen=True)
class SweepConfig(RunOptions):
    """Several SAEs trained on one pass over a cache: a sweep file and how to run it."""

    path: str
    """Sweep TOML: `vitscope train`'s shared settings at the top, one [[sae]] table per SAE
    (setting only architecture, k, n_latents, k_aux, lr or seed); the flags override the file."""


def sweep_configs(path: str | Path, **overrides: Any) -> list[TrainConfig]:
    """A sweep file: shared settings at the top, one [[sae]] table per SAE (SWEEPABLE keys only).

    Each SAE gets its own run folder inside `out`, named after what it changes.
    """
    if not Path(path).is_file():
        raise MissingInput(f"{path}: no such sweep file; pass a TOML file with one [[sae]] each")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise BadSetting(f"{path}: not valid TOML ({err}); fix the file") from None
    members = data.pop("sae", None)
    if not members:
        raise BadSetting(f"{path}: no [[sae]] tables; add one per SAE to train")
    for member in members:
        unknown = sorted(set(member) - set(SWEEPABLE))
        if unknown:
            raise BadSetting(
                f"{path}: [[sae]] may only set {', '.join(SWEEPABLE)}, not {', '.join(unknown)}"
                " (all SAEs of a sweep share every batch)"
            )
    base = load_config(TrainConfig, None, **{**data, **overrides})
    names = [member_name(member) or f"sae{i}" for i, member in enumerate(members)]
    if len(set(names)) != len(names):
        raise BadSetting(f"{path}: two [[sae]] tables are identical")
    hints = get_type_hints(TrainConfig)
    return [
        dataclasses.replace(
            base,
            **{key: parse_field(hints[key], value, key) for key, value in member.items()},
            out=str(base.run_dir / name),
        )
        for member, name in zip(members, names, strict=True)
    ]


def member_name(member: dict[str, Any]) -> str:
    return "_".join(f"{key}{member[key]}" for key in SWEEPABLE if key in member)
