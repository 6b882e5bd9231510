"""SynthSAEBench, a ground truth nobody here wrote: vitscope's three architectures and SAELens'
matching trainers on one scaled-down SynthSAEBench model (SAELens' `sae_lens.synthetic`), the
same samples in the same order, scored by SAELens' own evaluation beside its published
SynthSAEBench-16k table.

The model keeps SynthSAEBench-16k's recipe (docs/synth_sae_bench.md of SAELens: Zipf firing
0.4 .. 5e-4 with exponent 0.5, a forest of mutually exclusive hierarchies of branching 4 and
depth 3 whose children scale with their parent, low-rank correlations of rank 25, magnitudes
5 .. 4 with folded-normal spread, bias 0.5) at a size this CPU trains in minutes: a quarter of
the features (and of the hierarchy's roots), a third of the width, the SAE a quarter of the
features wide as there, k the true L0 of that many most frequent features as there (25 of 4,096
there). Its orthogonalisation is left out by default (`--orthogonalize-steps`): 100 steps cost
minutes here and lower the features' overlap loss by a few per cent. Generating samples costs
~0.5 ms each on one core, so a pool is drawn once and trained on for `--epochs` epochs.

SAELens trains as SynthSAEBench's runner does (its SAETrainerConfig, constant learning rate,
default initialisation) and is scored as the inference SAE it saves (JumpReLU for the batch
rules); vitscope's `fit` trains at its defaults apart from sizes; every trainer gets every
learning rate of `--lrs` (auto: vitscope's rule for each architecture, width and batch). All
are scored by `eval_sae_on_synthetic_data` on the same held-out samples (vitscope's SAE
through its inference `encode`, as dense codes).

    .venv/bin/python bench/synthsaebench.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import command_line, log, md_table, publish, timed
from planted import first_batches, saelens_sae, vitscope_cfg

from vitscope.saes.sae import SparseCodes

# vitscope's side, in one block: its modules move (train/ -> saes/), nothing else names them.
from vitscope.train.loader import tensor_batches
from vitscope.train.trainer import fit, new_member

os.environ.setdefault("WANDB_MODE", "disabled")
import sae_lens  # after planted, which makes transformers importable on CPU torch
from sae_lens import SAE, LoggingConfig, SAETrainer
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig,
    HierarchyConfig,
    LinearMagnitudeConfig,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    SyntheticSAERunnerConfig,
    ZipfianFiringProbabilityConfig,
    eval_sae_on_synthetic_data,
)

D_IN = 256
"""The width of bench/planted.py's worlds (its helpers, used here, read args.d_in)."""
TRAINERS = ("topk", "batchtopk", "matryoshka")
PUBLISHED = {
    "batchtopk": ("0.7316", "0.7574", "0.9837", "0.7923"),
    "matryoshka": ("0.8793", "0.7927", "0.9987", "0.7792"),
}
"""SynthSAEBench-16k at L0 = 25 (F1, MCC, uniqueness, explained variance; SAELens'
docs/synth_sae_bench.md): 16,384 features in 768 dimensions, 4,096 latents, k 25, 200 M
samples, batch 1,024, lr 3e-4, means of several seeds."""


def synthetic_model(args) -> SyntheticModel:
    """SynthSAEBench-16k's configuration at `args.features` features in `args.d_in` dims."""
    orthogonalization = None
    if args.orthogonalize_steps:
        orthogonalization = OrthogonalizationConfig(
            num_steps=args.orthogonalize_steps, lr=3e-4, chunk_size=args.features
        )
    cfg = SyntheticModelConfig(
        num_features=args.features,
        hidden_dim=args.d_in,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=args.features * 128 // 16_384,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=orthogonalization,
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=args.seed,
    )
    return SyntheticModel(cfg)


def draw(model: SyntheticModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (hidden activations, feature activations), drawn 4,096 at a time from a seed."""
    torch.manual_seed(seed)
    parts = [model.sample_with_features(min(4096, n - i)) for i in range(0, n, 4096)]
    return torch.cat([h for h, _ in parts]), torch.cat([f for _, f in parts])


class Replay:
    """The held-out feature activations, handed to SAELens' evaluation in order, so that every
    SAE is scored on the same samples (it asks an activation generator for fresh ones)."""

    def __init__(self, features_NF: torch.Tensor) -> None:
        self.features_NF, self.at = features_NF, 0

    def sample(self, n: int) -> torch.Tensor:
        self.at += n
        return self.features_NF[self.at - n : self.at]


class DenseCodes(torch.nn.Module):
    """vitscope's SAE as SAELens' evaluation reads one: `encode` gives dense codes by vitscope's
    inference rule, `decode` takes them back, `W_dec` its decoder rows."""

    def __init__(self, sae) -> None:
        super().__init__()
        self.sae = sae.eval()
        self.W_dec = sae.w_dec

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x_BD).dense()

    def decode(self, z_BF: torch.Tensor) -> torch.Tensor:
        most = max(int((z_BF != 0).sum(dim=1).max()), 1)
        idx_BK = z_BF.abs().topk(most, dim=1).indices.sort(dim=1).values
        return self.sae.decode(SparseCodes(idx_BK, z_BF.gather(1, idx_BK), z_BF.shape[1]))


def train_vitscope(args, train_ND, heldout_ND, work: Path, architecture: str, lr: float):
    """vitscope's `fit` at its defaults (sizes and `lr` set), initialised as `train` does."""
    cfg = vitscope_cfg(
        args, cache="(tensors)", out=str(work / "fit"), architecture=architecture, lr=lr
    )
    sample_ND = torch.cat([b.acts_BD for b in first_batches(train_ND, args)])
    member = new_member(cfg, args.d_in, sample_ND, cpu())
    stream = tensor_batches(train_ND, args.batch, seed=args.seed)
    held = heldout_ND[:4096].view(16, 256, args.d_in)  # 16 "images" of 256 tokens for its log
    timing = timed(lambda: fit([member], stream, held, slice(None)))
    shutil.rmtree(cfg.run_dir)
    return DenseCodes(member.sae), timing


def train_saelens(args, train_ND, work: Path, architecture: str, lr: float):
    """SAELens' SAE at its defaults, trained by SAETrainer as SynthSAEBench's runner sets it up
    (constant lr) on the same batches; the inference SAE it saves."""
    torch.manual_seed(args.seed)  # SAELens initialises from the global generator
    sae = saelens_sae(args, architecture)
    runner = SyntheticSAERunnerConfig(
        synthetic_model="(the samples given)",
        sae=sae.cfg,
        training_samples=args.tokens,
        batch_size=args.batch,
        lr=lr,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    provider = (batch.acts_BD for batch in tensor_batches(train_ND, args.batch, seed=args.seed))
    timing = timed(SAETrainer(runner.to_sae_trainer_config(), sae, provider).fit)
    sae.save_inference_model(work / architecture)
    return SAE.load_from_disk(str(work / architecture)).eval(), timing


def cpu() -> torch.device:
    return torch.device("cpu")


def row(name: str, lr: float, sae, model, heldout_features) -> list[str]:
    """A table row's scores: SAELens' evaluation of `sae` on the held-out samples."""
    with torch.no_grad():
        result = eval_sae_on_synthetic_data(
            sae,
            model.feature_dict,
            Replay(heldout_features),  # type: ignore[arg-type]
            num_samples=len(heldout_features),
            batch_size=4096,
        )
    return [
        name,
        f"{lr:.2g}",
        f"{result.mcc:.4f}",
        f"{result.classification.f1_score:.4f}",
        f"{result.uniqueness:.4f}",
        f"{result.explained_variance:.4f}",
        f"{result.sae_l0:.1f}",
        f"{result.dead_latents:,}",
    ]


def others(timing) -> str:
    """Other processes' CPU while a row trained, in cores (this host is shared)."""
    return f"{(timing.others or 0) / timing.wall:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=0, help="0: a quarter of the features")
    parser.add_argument("--k", type=int, default=0, help="0: true L0 of the top `latents`")
    parser.add_argument("--pool", type=int, default=196_608, help="training samples drawn")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the pool")
    parser.add_argument("--heldout", type=int, default=16_384)
    parser.add_argument("--batch", type=int, default=1024, help="SynthSAEBench's batch")
    parser.add_argument("--lrs", default="auto,1.5e-3", help="auto: vitscope's rule")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="of topk,batchtopk,...")
    parser.add_argument("--orthogonalize-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42, help="SynthSAEBench-16k's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/synthsaebench.md"))
    args = parser.parse_args()
    args.d_in = D_IN
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = synthetic_model(args)
    args.latents = args.latents or args.features // 4
    train_ND, _ = draw(model, args.pool, args.seed + 1)
    heldout_ND, heldout_features = draw(model, args.heldout, args.seed + 2)
    true_l0 = float((heldout_features > 0).sum(dim=1).float().mean())
    top_l0 = float((heldout_features[:, : args.latents] > 0).sum(dim=1).float().mean())
    args.k = args.k or round(top_l0)
    args.tokens = args.pool * args.epochs
    drawn = time.perf_counter() - started
    log(f"{args.pool + args.heldout:,} samples in {drawn:.0f} s; L0 {true_l0:.1f}, k {args.k}")
    peer = f"SAELens {sae_lens.__version__}"
    work = Path(tempfile.mkdtemp(prefix="synthsaebench-"))
    trainers = {
        "vitscope": lambda name, lr: train_vitscope(args, train_ND, heldout_ND, work, name, lr),
        peer: lambda name, lr: train_saelens(args, train_ND, work, name, lr),
    }
    rows = []
    try:
        for architecture in args.trainers.split(","):
            auto = vitscope_cfg(args, cache="(tensors)", architecture=architecture).peak_lr
            for lr in [auto if text == "auto" else float(text) for text in args.lrs.split(",")]:
                for who, train in trainers.items():
                    sae, timing = train(architecture, lr)
                    cells = row(f"{who} {architecture}", lr, sae, model, heldout_features)
                    rows.append([*cells, f"{args.tokens / timing.wall:,.0f}", others(timing)])
                    log(" | ".join(rows[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows += [
        [f"published: SynthSAEBench-16k {name}", "3e-4", mcc, f1, unique, ev, "25", "", "", ""]
        for name, (f1, mcc, unique, ev) in PUBLISHED.items()
    ]
    header = (
        "trainer | lr | MCC | F1 | uniqueness | explained variance | L0 | dead latents | "
        "tokens/s | others' cores"
    )
    body = [
        f"SynthSAEBench model (SAELens {sae_lens.__version__}, seed {args.seed}): "
        f"{args.features:,} features in d_in = {args.d_in} (SynthSAEBench-16k: 16,384 in 768), "
        f"{model.cfg.hierarchy.total_root_nodes} hierarchy roots (128), orthogonalisation "
        f"steps {args.orthogonalize_steps} (100); true L0 {true_l0:.1f} (~34), "
        f"{top_l0:.1f} over the {args.latents:,} most frequent features (~25 over 4,096). "
        f"SAEs: {args.latents:,} latents (4,096), k = {args.k} (25), batch {args.batch} "
        f"(1,024), {args.tokens:,} training samples ({args.epochs} passes over a pool of "
        f"{args.pool:,}; 200 M fresh ones there), scored on {args.heldout:,} held-out samples "
        f"(SAELens' eval_sae_on_synthetic_data; L0 at inference: threshold/JumpReLU for the "
        f"batch rules), torch threads {torch.get_num_threads()}. Drawing the samples took "
        f"{drawn:,.0f} s; the whole run {time.perf_counter() - started:,.0f} s.",
        "",
        *md_table(header, (" | ".join(cells) for cells in rows)),
    ]
    publish(args.out, cpu(), command_line(), body)


if __name__ == "__main__":
    main()
