"""`vitscope compare RUN...`: SAEs on different layers of one cache side by side, one row each.

Per run: held-out explained variance (the standard one and CLIP-Scope's, train/
explained_variance.py) and dead fraction (the last log line), median firing
frequency of the live features over images (the analysis), splice cosine (splice.json),
sort-eval accuracy with its 95% interval (one judge and token set's score.json, in the folder
`vitscope sorteval` writes by default), the mean MonoSemanticity Score of the scored features
(the analysis's monosemanticity.parquet) and the mean Moran's I of the features that have one
(the analysis's spatial coherence); a number a run does not have yet is left blank. Runs
analysed over different caches are refused: their numbers are not over the same images. Written
as compare.md, compare.csv and compare.png; each run's browser gets links to the others'.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from vitscope.analysis.browser import LAYERS_FILE, RUN_SITE
from vitscope.analysis.files import (
    META_FILE,
    MORANS_COLUMN,
    MS_COLUMN,
    load_analysis,
    read_meta,
)
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.saes.folder import load_sae_folder
from vitscope.support.errors import BadSetting
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.run_log import read_log

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class LayerRow:
    run: str
    layer: int | None
    explained_variance: float | None
    clipscope_ev: float | None
    """sache's explained variance, the one CLIP-Scope's model card reports (None in older logs)."""
    dead_fraction: float | None
    median_frequency: float | None
    """Median over the live features of the fraction of images they fire on."""
    splice_cosine: float | None
    sort_eval: str
    """Whose sort-eval score the row reads, e.g. "clip judge, all tokens"."""
    sort_accuracy: float | None
    sort_low: float | None
    sort_high: float | None
    mean_ms: float | None
    """Mean MS over the features that have one (`vitscope monosemanticity`)."""
    ms_encoder: str | None
    """The image encoder of those MS: runs compare only under the same one."""
    mean_morans_i: float | None
    """Mean Moran's I over the features that have one (spatial coherence, ANALYSIS.md)."""


def layer_row(run: Path, judge: str = "clip", token: str = "all") -> LayerRow:
    """What one run folder has measured about itself; the sort eval of `judge` over `token`."""
    card = load_sae_folder(run).card
    log = read_log(run)
    median = mean_ms = ms_encoder = mean_morans = None
    if (run / "analysis" / "meta.json").is_file():
        analysis = load_analysis(run / "analysis")
        frequencies = analysis.features["freq_images"].to_numpy()
        live = frequencies[frequencies > 0]
        median = float(np.median(live)) if len(live) else 0.0
        mean_morans = _mean_defined(analysis.features, MORANS_COLUMN)
        if analysis.monosemanticity is not None:
            mean_ms = _mean_defined(analysis.features, MS_COLUMN)
            ms_encoder = (
                f"{analysis.monosemanticity.encoder} ({analysis.monosemanticity.encoder_weights})"
            )
    splice = _json(run / "splice.json")
    sort = sort_score(run, judge, token)
    return LayerRow(
        run=str(run),
        layer=card.layer,
        explained_variance=log[-1].heldout.explained_variance if log else None,
        clipscope_ev=log[-1].heldout.clipscope_ev if log else None,
        dead_fraction=log[-1].dead_fraction if log else None,
        median_frequency=median,
        splice_cosine=splice.get("sae", {}).get("cosine"),
        sort_eval=sort_label(judge, token),
        sort_accuracy=sort.get("accuracy"),
        sort_low=sort.get("low"),
        sort_high=sort.get("high"),
        mean_ms=mean_ms,
        ms_encoder=ms_encoder,
        mean_morans_i=mean_morans,
    )


def _mean_defined(features: pa.Table, column: str) -> float | None:
    """The column's mean over the features that have a value; None when none has (or an older
    analysis lacks the column)."""
    if column not in features.column_names:
        return None
    values = features[column].to_numpy(zero_copy_only=False).astype(np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else None


def sort_score(run: Path, judge: str, token: str) -> dict:
    """score.json of the sort eval `vitscope sorteval RUN --judge J --token T` wrote; {} when
    there is none or it has no accuracy (no usable answer), so the cells stay blank."""
    folder = SortEvalConfig(run=str(run), judge=judge, token=token).out_dir  # type: ignore[arg-type]
    score = _json(folder / "score.json")
    accuracy = score.get("accuracy")
    return {} if accuracy is None or math.isnan(accuracy) else score


def sort_label(judge: str, token: str) -> str:
    """The sort eval a table or figure shows: scores of other judges or tokens do not mix."""
    return f"{judge} judge, {token} tokens"


def check_distinct(runs: list[Path]) -> None:
    """One row per run: refuse a run folder named twice (in any spelling: `runs/a`, `./runs/a`,
    an absolute path or a link to it), which would show as duplicate rows."""
    seen: dict[Path, Path] = {}
    for run in runs:
        resolved = run.resolve()
        if resolved in seen:
            raise BadSetting(
                f"expected each run folder once, found {seen[resolved]} and {run}, one folder",
                path=resolved,
                fix="name each run once",
            )
        seen[resolved] = run


def check_one_cache(runs: list[Path]) -> None:
    """Layers compare over the same images only: refuse runs analysed over different caches."""
    analysed = [run for run in runs if (run / "analysis" / META_FILE).is_file()]
    caches = {run: read_meta(run / "analysis").cache for run in analysed}
    for run in analysed[1:]:
        if caches[run] != caches[analysed[0]]:
            raise BadSetting(
                f"{analysed[0]} was analysed over {caches[analysed[0]]} but {run} over "
                f"{caches[run]}; compare runs of one cache (or re-run `vitscope analyze RUN "
                "--cache CACHE` over the same one)"
            )


COMPARISON = holding("a layer comparison", "compare.md")


def compare(
    runs: list[Path], out: Path, judge: str = "clip", token: str = "all", overwrite: bool = False
) -> list[Path]:
    """The table (markdown, CSV), the figure, and layer links in every run's browser; the
    sort-eval columns are those of `judge` over `token`."""
    from vitscope.analysis.plots import save_figure

    check_output_path(out, "--out", overwrite=overwrite, own=COMPARISON)
    check_distinct(runs)
    check_one_cache(runs)
    rows = sorted(
        (layer_row(run, judge, token) for run in runs), key=lambda r: (r.layer is None, r.layer)
    )
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(LayerRow)]
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    label = sort_label(judge, token)
    (out / "compare.md").write_text(_markdown(rows, label) + _consistency(runs))
    _link_browsers(rows)
    figure = save_figure(layer_figure(rows, label), out / "compare.png")
    return [out / "compare.md", out / "compare.csv", figure]


def _markdown(rows: list[LayerRow], sort_eval: str) -> str:
    header = (
        "| layer | explained variance | CLIP-Scope's explained variance | dead | "
        "median frequency (images) | splice cosine | "
        f"sort eval ({sort_eval}; 95% CI) | mean MS | mean Moran's I | run |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        sort = (
            ""
            if r.sort_accuracy is None
            else f"{r.sort_accuracy:.3f} [{r.sort_low:.3f}, {r.sort_high:.3f}]"
        )
        lines.append(
            f"| {r.layer} | {_num(r.explained_variance)} | {_num(r.clipscope_ev)} | "
            f"{_num(r.dead_fraction)} | "
            f"{_num(r.median_frequency)} | {_num(r.splice_cosine)} | {sort} | {_num(r.mean_ms)} "
            f"| {_num(r.mean_morans_i)} | {r.run} |"
        )
    encoders = sorted({r.ms_encoder for r in rows if r.ms_encoder})
    if encoders:
        unlike = "; not comparable across encoders" if len(encoders) > 1 else ""
        lines += ["", f"MS with the embeddings of {' and '.join(encoders)}{unlike}."]
    return "\n".join(lines) + "\n"


def layer_figure(rows: list[LayerRow], sort_eval: str) -> Figure:
    """One panel per number against the layer; sort-eval accuracy with its interval as error
    bars (`sort_eval` names the judge and token set in its title)."""
    from vitscope.analysis.plots import plt

    panels = [
        ("explained_variance", "held-out explained variance"),
        ("clipscope_ev", "CLIP-Scope's explained variance"),
        ("dead_fraction", "dead fraction"),
        ("median_frequency", "median frequency (images)"),
        ("splice_cosine", "splice cosine"),
        ("sort_accuracy", f"sort-eval accuracy (95% CI)\n{sort_eval}"),
        ("mean_ms", "mean MonoSemanticity Score"),
        ("mean_morans_i", "mean Moran's I (spatial coherence)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), layout="constrained")
    layers = [r.layer for r in rows]
    for ax, (name, title) in zip(axes, panels, strict=True):
        values = [getattr(r, name) for r in rows]
        shown = [(x, v) for x, v in zip(layers, values, strict=True) if v is not None]
        if shown and name == "sort_accuracy":
            low = [v - r.sort_low for r, v in zip(rows, values, strict=True) if v is not None]
            high = [r.sort_high - v for r, v in zip(rows, values, strict=True) if v is not None]
            ax.errorbar(*zip(*shown, strict=True), yerr=[low, high], marker="o", capsize=3)
            ax.axhline(0.5, color="grey", ls=":", label="chance")
        elif shown:
            ax.plot(*zip(*shown, strict=True), marker="o")
        ax.set(title=title, xlabel="layer")
    fig.suptitle("SAEs by layer")
    return fig


def _link_browsers(rows: list[LayerRow]) -> None:
    """data/layers.js in every run's browser (LAYERS_FILE): the index links the other layers."""
    sites = [(r.layer, Path(r.run) / RUN_SITE) for r in rows if (Path(r.run) / RUN_SITE).is_dir()]
    for _, site in sites:
        links = [
            {
                "layer": layer,
                "href": os.path.relpath(other / "index.html", site),
                "here": other == site,
            }
            for layer, other in sites
        ]
        (site / LAYERS_FILE).write_text(f"VS.layers = {json.dumps(links)};\n")


def _consistency(runs: list[Path]) -> str:
    """A line per pair of runs of one layer and width (e.g. two seeds): how far they learned
    the same dictionary (analysis/consistency.py)."""
    from vitscope.analysis.consistency import pair_line, same_shape_pairs

    pairs = same_shape_pairs(runs)
    if not pairs:
        return ""
    lines = [f"- {pair_line(a, b)}" for a, b in pairs]
    return (
        "\nCross-seed consistency (latents matched by decoder cosine):\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
