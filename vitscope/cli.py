"""The `vitscope` command: each subcommand builds its config and calls one library function."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from vitscope.analysis.config import AnalyzeConfig, MonosemanticityConfig
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.options import add_config_command
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.support.errors import UserError
from vitscope.support.extras import require
from vitscope.support.memory import return_large_buffers
from vitscope.support.records import check_output_path
from vitscope.train.config import TrainConfig

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cache ViT activations once into Zarr; train TopK SAEs on them.",
    rich_markup_mode=None,  # help texts hold literal [brackets]: "[default: 500]"
)


@app.callback()
def _every_command() -> None:
    """Before any command: large buffers as mmaps, so streaming passes keep a flat footprint."""
    return_large_buffers()


F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS = (UserError, ValueError, FileNotFoundError)
"""Errors caused by input or environment: printed as one line, exit status 1, no traceback."""


def one_line_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@one_line_errors
def run_download(config: DownloadConfig) -> None:
    from vitscope.pipeline.download import download

    out = download(config)
    print(f"shards in {out}: {len(list(out.glob('*.tar')))}")


@one_line_errors
def run_cache(config: CacheConfig) -> None:
    from vitscope.pipeline.run import cache

    summary = cache(config)
    print("\n".join(summary.lines()))
    if summary.failed:
        raise typer.Exit(1)


add_config_command(
    app,
    "download",
    DownloadConfig,
    run_download,
    help="Download a URL list into webdataset shards with img2dataset.",
)
add_config_command(
    app,
    "cache",
    CacheConfig,
    run_cache,
    help="Run the vision tower once over shards; write chosen layers into a Zarr cache.",
)


@one_line_errors
def run_train(config: TrainConfig) -> None:
    from vitscope.train.run import train

    for run_dir in train([config]):
        print(f"SAE in {run_dir} (cfg.json, sae.safetensors, log.jsonl, report.png)")


add_config_command(
    app,
    "train",
    TrainConfig,
    run_train,
    help="Train a TopK SAE on one layer of a cache (defaults: CLIP-Scope's sizes with vitscope's "
    "measured recipe; --preset clip-scope: CLIP-Scope's own recipe).",
)


@one_line_errors
def run_analyze(config: AnalyzeConfig) -> None:
    from vitscope.analysis.analyze import analyze
    from vitscope.analysis.plots import plot_analysis

    out = analyze(config)
    print(f"analysis in {out} (features.parquet, top_images.parquet, heatmaps.zarr)")
    shards = Path(config.shards) if config.shards else None
    for picture in plot_analysis(out, shards, config.grids):
        print(f"picture: {picture}")


add_config_command(
    app,
    "analyze",
    AnalyzeConfig,
    run_analyze,
    help="One pass of an SAE over its cache: feature statistics, top images, pictures.",
    arguments=("run",),
)


@one_line_errors
def run_monosemanticity(config: MonosemanticityConfig) -> None:
    import numpy as np

    from vitscope.analysis.files import MS_FILE
    from vitscope.analysis.monosemanticity import monosemanticity
    from vitscope.analysis.plots import plot_monosemanticity

    out, meta, ms_F = monosemanticity(config)
    scored = ms_F[~np.isnan(ms_F)]
    mean = f", mean {scored.mean():.4f}, median {np.median(scored):.4f}" if len(scored) else ""
    print(
        f"MS of {len(scored):,} of {meta.n_features:,} features over {meta.n_images:,} images "
        f"({meta.encoder} embeddings){mean}: {out / MS_FILE}"
    )
    print(f"picture: {plot_monosemanticity(out)}")


add_config_command(
    app,
    "monosemanticity",
    MonosemanticityConfig,
    run_monosemanticity,
    help="MonoSemanticity Score of every feature: activation-weighted mean cosine similarity of "
    "the images it fires on, under an image encoder (default: the cache's own model).",
    arguments=("run",),
)


@one_line_errors
def run_sorteval(config: SortEvalConfig) -> None:
    from vitscope.analysis.sorteval_run import scoring_command, sort_eval, write_game

    if config.judge == "human" and not config.answers:
        page = write_game(config)
        print(f"sort-eval game: {page}; open it, answer, save answers.jsonl, then run")
        print(f"  {scoring_command(config)}")
        return
    result = sort_eval(config)
    print(
        f"sort eval ({config.judge} judge, {config.token} tokens): {result.summary()}; "
        f"answers in {config.out_dir}"
    )


add_config_command(
    app,
    "sorteval",
    SortEvalConfig,
    run_sorteval,
    help="Sort eval: can a judge tell which of two features' top images a new image belongs to?",
    arguments=("run",),
)


@app.command("compare")
@one_line_errors
def compare_layers(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, one per layer of one cache.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.md, .csv and .png.")] = Path(
        "runs/compare"
    ),
    judge: Annotated[
        Literal["clip", "http", "human"],
        typer.Option(help="Whose sort-eval score the table shows (RUN/sorteval-JUDGE-TOKEN)."),
    ] = "clip",
    token: Annotated[
        Literal["all", "cls"], typer.Option(help="The token set of that sort-eval score.")
    ] = "all",
) -> None:
    """SAEs on different layers side by side: explained variance, dead fraction, median feature
    frequency, splice cosine, sort-eval accuracy; links the layers' browsers."""
    from vitscope.analysis.compare import compare

    written = compare(runs, out, judge, token)
    print(written[0].read_text(), end="")
    print("\n".join(f"written: {path}" for path in written))


@app.command("grid")
@one_line_errors
def grid(
    analysis: Annotated[Path, typer.Argument(help="An analysis folder (RUN/analysis).")],
    feature: Annotated[int, typer.Option(min=0, help="The feature (latent index).")],
    out: Annotated[Path | None, typer.Option(help="PNG to write; default grids/ inside.")] = None,
    shards: Annotated[
        Path | None, typer.Option(help="Folder of the cache's shards, if they moved.")
    ] = None,
) -> None:
    """Draw one feature's top images with its patch activations overlaid, captions under them."""
    from vitscope.analysis.files import load_analysis
    from vitscope.analysis.plots import plot_feature_grid

    path = out or analysis / "grids" / f"feature_{feature:05d}.png"
    check_output_path(path, "--out", folder=False)
    loaded = load_analysis(analysis)
    if feature >= loaded.meta.n_features:
        raise ValueError(f"feature must be below {loaded.meta.n_features}, not {feature}")
    print(f"picture: {plot_feature_grid(loaded, feature, path, shards)}")


@app.command("sweep")
@one_line_errors
def sweep(
    path: Annotated[Path, typer.Argument(help="Sweep TOML: shared settings, one [[sae]] each.")],
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoints.")] = False,
    distribute_saes: Annotated[
        bool, typer.Option(help="Place the SAEs on the node's GPUs in turn (one read of the data).")
    ] = False,
) -> None:
    """Train several SAEs (k, width, lr, seed) on one pass over the cache, sharing every batch."""
    from vitscope.train.config import sweep_configs
    from vitscope.train.run import train

    overrides = {"resume": resume or None, "distribute_saes": distribute_saes or None}
    for run_dir in train(sweep_configs(path, **overrides)):
        print(f"SAE in {run_dir}")


@app.command("cache-info")
@one_line_errors
def cache_info(
    path: Annotated[str, typer.Argument(help="The cache folder, or its URL (s3://...).")],
    plot: Annotated[
        Path | None, typer.Option(help="Also draw activation norms by token position (PNG).")
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Read every committed chunk of every layer; name the damaged.")
    ] = False,
) -> None:
    """Print what a cache holds, how complete it is and its size on disk."""
    from vitscope.cache_spec.info import summary_lines
    from vitscope.cache_spec.store import open_cache
    from vitscope.cache_spec.verify import verify_chunks

    cache = open_cache(path)
    print("\n".join(summary_lines(cache)))
    if verify:
        print(verify_chunks(cache, report=print))
    if plot is not None:
        require("matplotlib", "plots", "cache-info --plot")
        from vitscope.cache_plot import plot_cache

        print(f"picture: {plot_cache(cache, plot)}")


@app.command("demo")
@one_line_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the demo's shards and cache.")] = Path(
        "data/demo"
    ),
    model: Annotated[str, typer.Option(help="open_clip model for the demo.")] = "ViT-B-32",
) -> None:
    """Offline end to end: photos on 127.0.0.1 -> img2dataset -> cache -> SAE and its report."""
    from vitscope.demo import run_demo

    run_demo(workdir, model)


@app.command("push")
@one_line_errors
def push(
    run: Annotated[Path, typer.Argument(help="A run or SAE folder (cfg.json + sae.safetensors).")],
    repo: Annotated[str, typer.Option(help="Hub repo to create or update, owner/name.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Publish an SAE to the Hugging Face hub: weights, card, log, plots, model card; one commit.

    The token comes from HF_TOKEN or `hf auth login`, never from a flag.
    """
    from vitscope.saes.hub import push as push_run

    print(f"pushed {run} to {repo}: {push_run(run, repo, private=private)}")


@app.command("pull")
@one_line_errors
def pull(
    ref: Annotated[str, typer.Argument(help="owner/name, or owner/name/path for one SAE in it.")],
    out: Annotated[
        Path | None, typer.Option(help="Copy the SAE folder here (default: the hub cache).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
) -> None:
    """Fetch an SAE from the Hugging Face hub and check that it loads."""
    from vitscope.saes.hub import fetch
    from vitscope.saes.load import load_sae

    if out is not None:
        check_output_path(out, "--out")
    folder = fetch(ref, revision, local_dir=out)
    sae = load_sae(folder)
    print(f"{ref} -> {folder}: {sae.describe()}")


@app.command("to-saelens")
@one_line_errors
def to_saelens(
    run: Annotated[Path, typer.Argument(help="An SAE: run folder, CLIP-Scope .pt or hub id.")],
    out: Annotated[Path, typer.Argument(help="Folder to write SAELens' cfg.json + weights into.")],
) -> None:
    """Export an SAE in SAELens' layout (load it with sae_lens.SAE.load_from_disk)."""
    from vitscope.saes.load import load_sae
    from vitscope.saes.saelens import export_saelens

    check_output_path(out, "OUT")
    print(f"SAELens folder: {export_saelens(load_sae(str(run)), out)}")


@app.command("browse")
@one_line_errors
def browse(
    run: Annotated[Path, typer.Argument(help="The run folder that was analysed.")],
    analysis: Annotated[
        Path | None, typer.Option(help="Analysis folder (default RUN/analysis).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Site folder (default RUN/browser).")] = None,
    shards: Annotated[
        Path | None, typer.Option(help="Folder of the cache's shards, if they moved.")
    ] = None,
    serve: Annotated[bool, typer.Option(help="Then serve the site on 127.0.0.1.")] = False,
    port: Annotated[int, typer.Option(min=0, help="Port for --serve; 0 = a free one.")] = 0,
) -> None:
    """Write the static feature browser of an analysis (opens from file://, no server needed)."""
    from vitscope.analysis.browser import RUN_SITE, size_per_feature, write_browser
    from vitscope.analysis.browser import serve as serve_site
    from vitscope.analysis.files import load_analysis

    loaded = load_analysis(analysis or run / "analysis")
    index = write_browser(loaded, out or run / RUN_SITE, shards, run=run)
    per_feature = size_per_feature(index.parent, loaded.meta.n_features)
    print(f"feature browser: {index} ({per_feature:,.0f} bytes per feature)")
    if serve:
        serve_site(index.parent, port)


@app.command("splice")
@one_line_errors
def splice(
    run: Annotated[str, typer.Argument(help="The SAE: run folder, CLIP-Scope .pt or hub id.")],
    cache: Annotated[
        str, typer.Option(help="Cache whose images to use (default: the SAE's training cache).")
    ] = "",
    shards: Annotated[
        Path | None, typer.Option(help="Folder of the cache's shards, if they moved.")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="The first N committed rows' images.")] = 256,
    labels: Annotated[
        Path | None, typer.Option(help="Zero-shot labels, one a line (default: ImageNet's).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="JSON to write (RUN/splice.json).")] = None,
    device: Annotated[str, typer.Option(help="Torch device: auto = cuda when present.")] = "auto",
) -> None:
    """Splice the SAE's reconstruction into its layer; score it against clean and ablated runs."""
    from vitscope.analysis.splice import splice_run

    result, path = splice_run(run, cache, shards, images, labels, out, device)
    print("\n".join([*result.lines(), f"result: {path}"]))
