"""report.png of a run: the curves a researcher looks at, and where in the image the SAE fails."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vitscope.cache_spec.tokens import TokenLayout
from vitscope.support.run_log import read_log
from vitscope.train.token_picture import draw_tokens


def plot_run(run_dir: Path, layout: TokenLayout) -> Path:
    """report.png (see report_figure)."""
    fig = report_figure(run_dir, layout)
    path = run_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_figure(run_dir: Path, layout: TokenLayout) -> plt.Figure:
    """Four panels: held-out FVU and train MSE; L0 and dead latents; speed; MSE by token, at
    the tokens' places in the cache's `layout`."""
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

    _plot_token_mse(positions, log[-1].heldout.mse_by_token, layout)
    fig.suptitle(f"{run_dir}  (last: {log[-1].tokens:,} tokens)")
    fig.tight_layout()
    return fig


def _plot_token_mse(ax: plt.Axes, mse_by_token: tuple[float, ...], layout: TokenLayout) -> None:
    """The patches on their grid, CLS and the registers each a cell beside it."""
    image = draw_tokens(ax, np.asarray(mse_by_token), layout, "magma")
    plt.colorbar(image, ax=ax, label="held-out MSE", location="left")
    rows, cols = layout.grid
    ax.set_title(f"MSE by token position ({rows}x{cols} patches)")
