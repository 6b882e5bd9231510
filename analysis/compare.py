"""`vitscope compare RUN...`: SAEs on different layers of one cache side by side, one row each.

Per run: held-out explained variance and dead fraction (the last log line), median firing
frequency of the live features over images (the analysis), splice cosine (splice.json),
sort-eval accuracy with its 95% interval (sorteval-*/score.json) and the mean MonoSemanticity
Score of the scored features (the analysis's monosemanticity.parquet); a number a run does not
have yet is left blank. Written as compare.md, compare.csv and compare.png; each run's browser gets
links to the others'.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from vitscope.analysis.browser import LAYERS_FILE
from vitscope.analysis.files import MS_COLUMN, load_analysis
from vitscope.support.records import check_output_path
from vitscope.train.report import read_log
from vitscope.train.sae_folder import load_sae_folder


@dataclass(frozen=True)
class LayerRow:
    run: str
    layer: int | None
    explained_variance: float | None
    dead_fraction: float | None
    median_frequency: float | None
    """Median over the live features of the fraction of images they fire on."""
    splice_cosine: float | None
    sort_accuracy: float | None
    sort_low: float | None
    sort_high: float | None
    mean_ms: float | None
    """Mean MS over the features that have one (`vitscope monosemanticity`)."""
    ms_encoder: str | None
    """The image encoder of those MS: runs compare only under the same one."""


def layer_row(run: Path) -> LayerRow:
    """What one run folder has measured about itself."""
    card = load_sae_folder(run).card
    last = read_log(run)[-1] if (run / "log.jsonl").is_file() else {}
    median = mean_ms = ms_encoder = None
    if (run / "analysis" / "meta.json").is_file():
        analysis = load_analysis(run / "analysis")
        frequencies = analysis.features["freq_images"].to_numpy()
        live = frequencies[frequencies > 0]
        median = float(np.median(live)) if len(live) else 0.0
        if analysis.monosemanticity is not None:
            ms = analysis.features[MS_COLUMN].to_numpy(zero_copy_only=False)
            scored = ms[~np.isnan(ms)]
            mean_ms = float(scored.mean()) if len(scored) else None
            ms_encoder = (
                f"{analysis.monosemanticity.encoder} ({analysis.monosemanticity.encoder_weights})"
            )
    splice = _json(run / "splice.json")
    scores = sorted(run.glob("sorteval-*/score.json"))
    sort = _json(scores[0]) if scores else {}
    return LayerRow(
        run=str(run),
        layer=card.layer,
        explained_variance=last.get("heldout", {}).get("explained_variance"),
        dead_fraction=last.get("dead_fraction"),
        median_frequency=median,
        splice_cosine=splice.get("sae", {}).get("cosine"),
        sort_accuracy=sort.get("accuracy"),
        sort_low=sort.get("low"),
        sort_high=sort.get("high"),
        mean_ms=mean_ms,
        ms_encoder=ms_encoder,
    )


def compare(runs: list[Path], out: Path) -> list[Path]:
    """The table (markdown, CSV), the figure, and layer links in every run's browser."""
    check_output_path(out, "--out")
    rows = sorted((layer_row(run) for run in runs), key=lambda r: (r.layer is None, r.layer))
    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(LayerRow)]
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    (out / "compare.md").write_text(_markdown(rows))
    _link_browsers(rows)
    return [out / "compare.md", out / "compare.csv", _figure(rows, out / "compare.png")]


def _markdown(rows: list[LayerRow]) -> str:
    lines = [
        "| layer | explained variance | dead | median frequency (images) | splice cosine | "
        "sort eval (95% CI) | mean MS | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sort = (
            ""
            if r.sort_accuracy is None
            else f"{r.sort_accuracy:.3f} [{r.sort_low:.3f}, {r.sort_high:.3f}]"
        )
        lines.append(
            f"| {r.layer} | {_num(r.explained_variance)} | {_num(r.dead_fraction)} | "
            f"{_num(r.median_frequency)} | {_num(r.splice_cosine)} | {sort} | {_num(r.mean_ms)} "
            f"| {r.run} |"
        )
    encoders = sorted({r.ms_encoder for r in rows if r.ms_encoder})
    if encoders:
        unlike = "; not comparable across encoders" if len(encoders) > 1 else ""
        lines += ["", f"MS with the embeddings of {' and '.join(encoders)}{unlike}."]
    return "\n".join(lines) + "\n"


def _figure(rows: list[LayerRow], path: Path) -> Path:
    from vitscope.analysis.plots import plt, save_figure

    panels = [
        ("explained_variance", "held-out explained variance"),
        ("dead_fraction", "dead fraction"),
        ("median_frequency", "median frequency (images)"),
        ("splice_cosine", "splice cosine"),
        ("sort_accuracy", "sort-eval accuracy (95% CI)"),
        ("mean_ms", "mean MonoSemanticity Score"),
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
    return save_figure(fig, path)


def _link_browsers(rows: list[LayerRow]) -> None:
    """data/layers.js in every run's browser (LAYERS_FILE): the index links the other layers."""
    sites = [(r.layer, Path(r.run) / "browser") for r in rows if (Path(r.run) / "browser").is_dir()]
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


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
