"""report.png of a run: the curves a researcher looks at, and where in the image the SAE fails."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vitscope.support.run_log import read_log


def plot_run(run_dir: Path) -> Path:
    """Four panels: held-out FVU and train MSE; L0 and dead latents; speed; MSE by token."""
    log = read_log(run_dir)
    tokens = [r.tokens for r in log]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    loss, sparsity, speed, positions = axes.flat

    loss.plot(tokens, [r.heldout.fvu for r in log], label="held-out FVU")
    loss.plot(tokens, [r.mse for r in log], label="train MSE (scaled)")
    loss.set(xlabel="tokens", yscale="log", title="reconstruction")
    loss.legend(loc="upper left")
    explained = loss.twinx()
    explained.plot(tokens, [r.heldout.explained_variance for r in log], color="tab:green", ls="--")
    clipscope = [(r.tokens, r.heldout.clipscope_ev) for r in log if r.heldout.clipscope_ev]
    if clipscope:
        explained.plot(*zip(*clipscope, strict=True), color="tab:olive", ls=":")
    explained.set_ylabel("held-out explained variance (dashed; CLIP-Scope's: dotted)")

    sparsity.plot(tokens, [r.l0 for r in log], label="L0")
    sparsity.set(xlabel="tokens", ylabel="L0", title="sparsity and dead latents")
    dead = sparsity.twinx()
    dead.plot(tokens, [100 * r.dead_fraction for r in log], color="tab:red", label="dead %")
    dead.set_ylabel("dead latents (%)")

    speed.plot(tokens, [r.tokens_per_s for r in log], label="tokens/s")
    speed.set(xlabel="tokens", ylabel="tokens/s", title="throughput")
    wait = speed.twinx()
    wait.plot(tokens, [100 * r.loader_wait_fraction for r in log], color="tab:red")
    wait.set_ylabel("waiting for data (%)")

    _plot_token_mse(positions, log[-1].heldout.mse_by_token)
    fig.suptitle(f"{run_dir}  (last: {log[-1].tokens:,} tokens)")
    fig.tight_layout()
    path = run_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_token_mse(ax: plt.Axes, mse_by_token: tuple[float, ...]) -> None:
    """CLS apart, patches on their grid when they form a square (they do for ViTs)."""
    patches = mse_by_token[1:]
    side = math.isqrt(len(patches))
    if side * side == len(patches) and side > 1:
        grid = [patches[row * side : (row + 1) * side] for row in range(side)]
        image = ax.imshow(grid, cmap="magma")
        plt.colorbar(image, ax=ax, label="held-out MSE")
        ax.set_title(f"MSE by patch position (CLS: {mse_by_token[0]:.3g})")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.bar(range(len(mse_by_token)), mse_by_token)
        ax.set(xlabel="token position (0 = CLS)", ylabel="held-out MSE", title="MSE by token")
