"""The feature browser: a static site over an analysis folder, opened from file:// or `--serve`.

    SITE/
      index.html feature.html app.js style.css   copied from browser_assets/
      data/index.js          VS.index: site meta and features.parquet as columns (sort, search),
                             with the MS column when the analysis has one
      data/block_NNNNN.js    VS.blocks[n]: 1024 features' top images as [row, peak, [values of
                             the prefix tokens: CLS, registers]], their patch maps (uint8 per
                             feature, rows x cols, base64) and the images' captions
      data/labels.js         VS.labels: each feature's best labels and, for the search box, the
                             features nearest each label (or why there are none)
      data/layers.js         VS.layers: links to the other layers' browsers (`vitscope compare`),
                             kept when the site is written again
      data/games.js          VS.games: links to the run's sort-eval game pages, rewritten by
                             `vitscope sorteval RUN --judge human` when it writes one later
      images/ROW.jpg         each top image once: a square thumbnail of the model's centre crop

Data files are scripts assigning into the global VS because file:// pages cannot fetch(); a
feature page inserts the script of its block only, so the site is a few files at any width.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vitscope.analysis.browser_labels import labels_data
from vitscope.analysis.files import Analysis
from vitscope.analysis.images import iter_images
from vitscope.cache_spec.store import Cache, open_cache
from vitscope.cache_spec.tokens import CLS
from vitscope.support.errors import BadSetting
from vitscope.support.outputs import check_output_path, holding

ASSETS = Path(__file__).parent / "browser_assets"
SITE_ASSETS = ("index.html", "feature.html", "app.js", "style.css")
"""The browser's pages; the sort-eval game (sortgame.*) lives beside them, written elsewhere."""
BLOCK_FEATURES = 1024
"""Features per block file: one script of a few MB at ViT-L/14's 16x16 grid."""
RUN_SITE = "browser"
"""The site's folder inside a run by default (`vitscope browse RUN`): compare and sorteval find
it there."""
INDEX_FILE = "data/index.js"
LAYERS_FILE = "data/layers.js"
"""VS.layers: links to the browsers of the same cache's other layers (`vitscope compare`)."""
LABELS_DATA = "data/labels.js"
"""VS.labels: the features' words and, per label, the features nearest it (browser_labels.py)."""
GAMES_FILE = "data/games.js"
"""VS.games: links to the run's sort-eval game pages, whichever of browse and sorteval ran last."""
GAME_PAGES = "*/game/sortgame.html"
"""Sort-eval game pages inside a run (RUN/sorteval-human-TOKEN/game/ by default)."""


BROWSER_SITE = holding("a feature browser", INDEX_FILE)
"""What `vitscope browse` replaces without --overwrite: a site it wrote."""


def write_browser(
    analysis: Analysis,
    out: Path,
    shards: Path | None = None,
    thumb_px: int = 112,
    run: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the site into `out` (built beside it, then swapped in: what `out` held is gone);
    returns its index.html. The index links the sort-eval games inside `run` (default: the
    folder holding the analysis)."""
    check_output_path(out, "--out", overwrite=overwrite, own=BROWSER_SITE)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in SITE_ASSETS:
        shutil.copy(ASSETS / name, partial / name)
    (partial / "data").mkdir()
    _write_index(analysis, partial / INDEX_FILE)
    _write_script(partial / LABELS_DATA, "VS.labels", labels_data(analysis.folder))
    _write_script(partial / GAMES_FILE, "VS.games", game_links(run or analysis.folder.parent, out))
    _keep_layer_links(out, partial)
    rows = _write_blocks(analysis, partial / "data")
    _write_thumbnails(analysis, rows, partial / "images", shards, thumb_px)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out / "index.html"


def game_links(run: Path, out: Path) -> list[dict]:
    """[{name, href}] for each sort-eval game page in the run, relative to the site in `out`:
    the game is written by `vitscope sorteval`, not here, and may come before or after."""
    pages = sorted(run.glob(GAME_PAGES))
    return [{"name": page.parent.parent.name, "href": os.path.relpath(page, out)} for page in pages]


def link_games(run: Path, site: Path) -> None:
    """Rewrite the game links of the run's browser, if it has one: a game written after
    `vitscope browse` ran shows up without re-running it."""
    if (site / INDEX_FILE).is_file():
        _write_script(site / GAMES_FILE, "VS.games", game_links(run, site))


def _keep_layer_links(out: Path, partial: Path) -> None:
    """The layer links `vitscope compare` wrote into the old site survive a re-run of browse
    (which does not know the other layers); a new site starts with none."""
    if (out / LAYERS_FILE).is_file():
        shutil.copy(out / LAYERS_FILE, partial / LAYERS_FILE)
    else:
        _write_script(partial / LAYERS_FILE, "VS.layers", [])


def size_per_feature(site: Path, n_features: int) -> float:
    """Bytes of the whole site per feature (what README quotes for a 65,536-wide SAE)."""
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / n_features


def serve(out: Path, port: int = 0) -> None:
    """Serve the site on 127.0.0.1 (port 0 = a free one) until interrupted."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise BadSetting(
            f"--port {port}: expected a free port on 127.0.0.1, found it taken ({err.strerror}); "
            "pass another --port, or --port 0 for any free one"
        ) from None
    with server:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        print(f"serving the feature browser at {url} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def _write_index(analysis: Analysis, path: Path) -> None:
    meta, ms = analysis.meta, analysis.monosemanticity
    columns = {}
    for name in analysis.features.column_names:
        values = analysis.features[name].to_numpy(zero_copy_only=False)
        # float32's shortest round-trip text: the browser sorts exactly as the parquet does;
        # null where there is no value (a feature without Moran's I or MS).
        columns[name] = values.tolist() if values.dtype.kind in "iu" else _shortest(values)
    site_meta = {
        "sae": meta.sae,
        "cache": meta.cache,
        "layer": meta.layer,
        "n_features": meta.n_features,
        "top_n": meta.top_n,
        "images_seen": meta.images_seen,
        "tokens_seen": meta.tokens_seen,
        "prefix": list(_prefix(analysis)),
        "grid": list(meta.layout.grid) if meta.layout else None,
        "block": BLOCK_FEATURES,
        "ms": None
        if ms is None
        else f"{ms.n_images:,} images, {ms.encoder} ({ms.encoder_weights})",
    }
    _write_script(path, "VS.index", {"meta": site_meta, "features": columns})


def _write_blocks(analysis: Analysis, folder: Path) -> np.ndarray:
    """One script per BLOCK_FEATURES features; returns every top image's row (unique, sorted)."""
    meta = analysis.meta
    top = analysis.top_images.sort_by([("feature", "ascending"), ("rank", "ascending")])
    feature, rank, row, value = (top[c].to_numpy() for c in ("feature", "rank", "row", "value"))
    captions = top["caption"].to_pylist()
    starts = np.searchsorted(feature, np.arange(meta.n_features + 1))
    n_prefix = len(_prefix(analysis))
    for first in range(0, meta.n_features, BLOCK_FEATURES):
        heat_BNT = analysis.heatmap_block(first, first + BLOCK_FEATURES)
        prefix_BNQ, patches_BNP = heat_BNT[:, :, :n_prefix], heat_BNT[:, :, n_prefix:]
        scale_B = patches_BNP.max(axis=(1, 2), initial=0.0)
        levels_BNP = np.clip(patches_BNP / np.where(scale_B > 0, scale_B, 1)[:, None, None], 0, 1)
        levels_BNP = (levels_BNP * 255).round().astype(np.uint8)
        block: dict = {"first": first, "top": [], "heat": [], "captions": {}}
        for b in range(len(heat_BNT)):
            lo, hi = starts[first + b], starts[first + b + 1]
            rows, ranks = row[lo:hi].tolist(), rank[lo:hi]  # heat follows the top list's order
            peaks = _rounded(value[lo:hi])
            prefix = [_rounded(values) for values in prefix_BNQ[b, ranks]]
            block["top"].append([list(entry) for entry in zip(rows, peaks, prefix, strict=True)])
            block["heat"].append(base64.b64encode(levels_BNP[b, ranks].tobytes()).decode())
            pairs = zip(rows, captions[lo:hi], strict=True)
            block["captions"].update({r: c for r, c in pairs if c is not None})
        block["scale"] = _shortest(scale_B)
        number = first // BLOCK_FEATURES
        _write_script(folder / f"block_{number:05d}.js", f"VS.blocks[{number}]", block)
    return np.unique(row)


def _prefix(analysis: Analysis) -> tuple[str, ...]:
    """The heatmaps' tokens before the patch grid, by name: CLS and the registers (none for
    SigLIP or a patches-only SAE), or the CLS token alone for a CLS-only SAE."""
    layout = analysis.meta.layout
    return layout.prefix if layout else (CLS,)


def _write_thumbnails(
    analysis: Analysis, rows: np.ndarray, folder: Path, shards: Path | None, thumb_px: int
) -> None:
    write_thumbnails(open_cache(analysis.meta.cache), rows, folder, shards, thumb_px)


def write_thumbnails(
    cache: Cache, rows: np.ndarray, folder: Path, shards: Path | None, thumb_px: int
) -> None:
    """Each row's image once as ROW.jpg, cropped to the square the ViT saw (shorter side,
    centred); the feature browser and the sort-eval game both show these."""
    folder.mkdir(parents=True, exist_ok=True)
    for row, image in iter_images(cache, rows.tolist(), shards):
        thumb = ImageOps.fit(image, (thumb_px, thumb_px), Image.Resampling.BICUBIC)
        thumb.save(folder / f"{row}.jpg", quality=85)


def _shortest(values: np.ndarray) -> list[float | None]:
    """Each value's float32 shortest round-trip decimal (small files, exact float32 order);
    None for NaN."""
    return [None if np.isnan(v) else float(str(v)) for v in values.astype(np.float32)]


def _rounded(values: np.ndarray) -> list[float]:
    """Four significant digits: what a caption shows (three), in fewer bytes."""
    return [float(f"{v:.4g}") for v in values.tolist()]


def _write_script(path: Path, target: str, value: object) -> None:
    """A data file: `VS.index = {...};` or `VS.blocks[n] = {...};` (JSON on the right)."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    path.write_text(f"{target} = {text};\n")
