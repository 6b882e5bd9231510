"""The `vitscope` command: each subcommand builds its config and calls one library function."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from vitscope.analysis.config import (
    AnalyzeConfig,
    BrowseConfig,
    CompareConfig,
    ConsistencyConfig,
    GridConfig,
    MonosemanticityConfig,
    SearchConfig,
    SpliceConfig,
)
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.cache_spec.info import CacheInfoConfig
from vitscope.demo import DemoConfig
from vitscope.options import add_config_command
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.saes.config import ExportConfig, PullConfig, PushConfig
from vitscope.support.errors import BadSetting, UserError
from vitscope.support.extras import require
from vitscope.support.memory import set_allocator_for
from vitscope.support.outputs import check_output_path
from vitscope.train.config import SweepConfig, TrainConfig

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Cache ViT activations once into Zarr; train TopK SAEs on them.",
    rich_markup_mode=None,  # help texts hold literal [brackets]: "[default: 500]"
)


@app.callback()
def _every_command(ctx: typer.Context) -> None:
    """Before any command: the allocator for its work (support/memory.py)."""
    set_allocator_for(ctx.invoked_subcommand)


F = TypeVar("F", bound=Callable[..., Any])

USER_ERRORS = UserError
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
    from vitscope.pipeline.download import download, download_stats

    out = download(config)
    print(download_stats(out).line(out))


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
    from vitscope.analysis.label_files import LABELS_FILE, read_labels_meta
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
    named = read_labels_meta(out)
    if named is not None:
        print(
            f"named {named.n_named:,} features with their {named.top_labels} best of "
            f"{named.about}: {out / LABELS_FILE}"
        )


add_config_command(
    app,
    "monosemanticity",
    MonosemanticityConfig,
    run_monosemanticity,
    help="MonoSemanticity Score of every feature: activation-weighted mean cosine similarity of "
    "the images it fires on, under an image encoder (default: the cache's own model); with a "
    "CLIP model, each feature named by the labels its text tower puts nearest its images.",
    arguments=("run",),
)


@one_line_errors
def run_search(config: SearchConfig) -> None:
    from vitscope.analysis.search import search, search_lines

    meta, hits = search(config)
    print("\n".join(search_lines(config.text, meta, hits)))


add_config_command(
    app,
    "search",
    SearchConfig,
    run_search,
    help='The features nearest a text ("a red car") under the text tower that named them '
    "(`vitscope monosemanticity` with a CLIP model): cosine, MS and best label of each.",
    arguments=("run", "text"),
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


@one_line_errors
def run_compare(config: CompareConfig) -> None:
    from vitscope.analysis.compare import compare

    runs = [Path(run) for run in config.runs]
    written = compare(runs, Path(config.out), config.judge, config.token, config.overwrite)
    print(written[0].read_text(), end="")
    print("\n".join(f"written: {path}" for path in written))


add_config_command(
    app,
    "compare",
    CompareConfig,
    run_compare,
    help="SAEs on different layers side by side: explained variance, dead fraction, median "
    "feature frequency, splice cosine, sort-eval accuracy; links the layers' browsers.",
    arguments=("runs",),
)


@one_line_errors
def run_consistency(config: ConsistencyConfig) -> None:
    from vitscope.analysis.consistency import consistency

    result, out = consistency(config)
    print(f"{config.run_a} ~ {config.run_b}: {result.summary()}")
    print(f"written: {out} (consistency.json, .md, .png, matches.parquet)")


add_config_command(
    app,
    "consistency",
    ConsistencyConfig,
    run_consistency,
    help="Two SAEs of one layer and width (e.g. two seeds) matched latent to latent by decoder "
    "cosine: PW-MCC, the share matched above 0.9, and that share by firing frequency.",
    arguments=("run_a", "run_b"),
)


@one_line_errors
def run_grid(config: GridConfig) -> None:
    from vitscope.analysis.files import load_analysis
    from vitscope.analysis.plots import FEATURE_GRID, plot_feature_grid

    path = config.out_path
    check_output_path(path, "--out", folder=False, overwrite=config.overwrite, own=FEATURE_GRID)
    loaded = load_analysis(Path(config.analysis))
    if config.feature >= loaded.meta.n_features:
        raise BadSetting(f"feature must be below {loaded.meta.n_features}, not {config.feature}")
    shards = Path(config.shards) if config.shards else None
    print(f"picture: {plot_feature_grid(loaded, config.feature, path, shards)}")


add_config_command(
    app,
    "grid",
    GridConfig,
    run_grid,
    help="Draw one feature's top images with its patch activations overlaid, captions under them.",
    arguments=("analysis",),
)


@one_line_errors
def run_sweep(config: SweepConfig) -> None:
    from vitscope.analysis.consistency import pair_line, seed_pairs
    from vitscope.support.devices import resolve_device
    from vitscope.support.launch import launch_from_environment
    from vitscope.train.config import RunOptions, sweep_configs
    from vitscope.train.run import train

    overrides = {f.name: getattr(config, f.name) or None for f in dataclasses.fields(RunOptions)}
    configs = sweep_configs(config.path, **overrides)
    run_dirs = train(configs)
    for run_dir in run_dirs:
        print(f"SAE in {run_dir}")
    if launch_from_environment().is_main:  # rank 0 saved the SAEs; the others stop here
        for run_a, run_b in seed_pairs(configs, run_dirs):  # differing only in seed: PW-MCC
            print(f"seeds: {pair_line(run_a, run_b, resolve_device(configs[0].device))}")


add_config_command(
    app,
    "sweep",
    SweepConfig,
    run_sweep,
    help="Train several SAEs (k, width, lr, seed) on one pass over the cache, sharing every batch.",
    arguments=("path",),
)


@one_line_errors
def run_cache_info(config: CacheInfoConfig) -> None:
    from vitscope.cache_spec.info import summary_lines
    from vitscope.cache_spec.outliers import layer_norms, norm_lines
    from vitscope.cache_spec.store import open_cache
    from vitscope.cache_spec.verify import verify_chunks

    if config.plot:
        require("matplotlib", "plots", "cache-info --plot")
        from vitscope.cache_plot import CACHE_PLOT

        check_output_path(
            config.plot, "--plot", folder=False, overwrite=config.overwrite, own=CACHE_PLOT
        )
        if not config.sample_chunks:
            raise BadSetting(
                "--plot draws the sampled token norms, but --sample-chunks is 0; pass at least 1"
            )
    cache = open_cache(config.path)
    print("\n".join(summary_lines(cache)))
    verified = verify_chunks(cache, report=print) if config.verify else ""  # names every damaged
    sampled = cache.n_rows and config.sample_chunks
    norms = list(layer_norms(cache, config.sample_chunks)) if sampled else []
    if norms:
        print("\n".join(norm_lines(cache, norms, config.sample_chunks)))
    if verified:
        print(verified)
    if config.plot:
        from vitscope.cache_plot import plot_cache

        print(f"picture: {plot_cache(cache, norms, Path(config.plot))}")


add_config_command(
    app,
    "cache-info",
    CacheInfoConfig,
    run_cache_info,
    help="Print what a cache holds, how complete it is, its size on disk, and its token norms "
    "by layer (gamma = |mean| / |std|, outlier tokens and their positions).",
    arguments=("path",),
)


@one_line_errors
def run_demo_command(config: DemoConfig) -> None:
    from vitscope.demo import run_demo

    run_demo(config)


add_config_command(
    app,
    "demo",
    DemoConfig,
    run_demo_command,
    help="Offline end to end: photos on 127.0.0.1 -> img2dataset -> cache -> SAE and its report.",
)


@one_line_errors
def run_push(config: PushConfig) -> None:
    from vitscope.saes.hub import push

    url = push(Path(config.run), config.repo, private=config.private)
    print(f"pushed {config.run} to {config.repo}: {url}")


add_config_command(
    app,
    "push",
    PushConfig,
    run_push,
    help="Publish an SAE to the Hugging Face hub: weights, card, log, plots, model card; one "
    "commit. The token comes from HF_TOKEN or `hf auth login`, never from a flag.",
    arguments=("run",),
)


@one_line_errors
def run_pull(config: PullConfig) -> None:
    from vitscope.saes.hub import PULLED_FOLDER, fetch
    from vitscope.saes.load import load_sae

    out = Path(config.out) if config.out else None
    if out is not None:
        check_output_path(out, "--out", overwrite=config.overwrite, own=PULLED_FOLDER)
    folder = fetch(config.ref, config.revision or None, local_dir=out)
    sae = load_sae(folder)
    print(f"{config.ref} -> {folder}: {sae.describe()}")


add_config_command(
    app,
    "pull",
    PullConfig,
    run_pull,
    help="Fetch an SAE from the Hugging Face hub and check that it loads.",
    arguments=("ref",),
)


@one_line_errors
def run_to_saelens(config: ExportConfig) -> None:
    from vitscope.saes.load import load_sae
    from vitscope.saes.saelens import SAELENS_EXPORT, export_saelens

    out = Path(config.out)
    check_output_path(out, "OUT", overwrite=config.overwrite, own=SAELENS_EXPORT)
    print(f"SAELens folder: {export_saelens(load_sae(config.run), out)}")


add_config_command(
    app,
    "to-saelens",
    ExportConfig,
    run_to_saelens,
    help="Export an SAE in SAELens' layout (load it with sae_lens.SAE.load_from_disk).",
    arguments=("run", "out"),
)


@one_line_errors
def run_browse(config: BrowseConfig) -> None:
    from vitscope.analysis.browser import BROWSER_SITE, RUN_SITE, size_per_feature, write_browser
    from vitscope.analysis.browser import serve as serve_site
    from vitscope.analysis.files import load_analysis

    run = Path(config.run)
    site = Path(config.out) if config.out else run / RUN_SITE
    check_output_path(site, "--out", overwrite=config.overwrite, own=BROWSER_SITE)
    loaded = load_analysis(Path(config.analysis) if config.analysis else run / "analysis")
    shards = Path(config.shards) if config.shards else None
    index = write_browser(loaded, site, shards, run=run, overwrite=config.overwrite)
    per_feature = size_per_feature(index.parent, loaded.meta.n_features)
    print(f"feature browser: {index} ({per_feature:,.0f} bytes per feature)")
    if config.serve:
        serve_site(index.parent, config.port)


add_config_command(
    app,
    "browse",
    BrowseConfig,
    run_browse,
    help="Write the static feature browser of an analysis (opens from file://, no server needed).",
    arguments=("run",),
)


@one_line_errors
def run_splice(config: SpliceConfig) -> None:
    from vitscope.analysis.splice import splice_run

    result, path = splice_run(config)
    print("\n".join([*result.lines(), f"result: {path}"]))


add_config_command(
    app,
    "splice",
    SpliceConfig,
    run_splice,
    help="Splice the SAE's reconstruction into its layer; score it against clean and ablated runs.",
    arguments=("run",),
)
