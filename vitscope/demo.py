"""The embedded default: real photos served on 127.0.0.1, fetched by img2dataset, then cached.

The photos are the sample images scikit-image ships, so `make demo` needs no internet. With
internet the same commands run on LAION URL lists (see README.md). Tests use the same photos and
server, so the demo is what the tests exercise.
"""

from __future__ import annotations

import csv
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path

from vitscope.support.extras import require
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.shared_options import Overwrite

PHOTO_CAPTIONS = {
    "astronaut.png": "an astronaut in a spacesuit holding a helmet",
    "brick.png": "a grey brick wall",
    "camera.png": "a man with a camera on a tripod",
    "cell.png": "cells under a microscope",
    "chelsea.png": "a tabby cat",
    "clock_motion.png": "a wall clock blurred by motion",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "old coins on a table",
    "color.png": "a colour wheel",
    "grass.png": "a patch of grass",
    "gravel.png": "gravel on the ground",
    "horse.png": "the silhouette of a horse",
    "hubble_deep_field.jpg": "galaxies in the Hubble deep field",
    "ihc.png": "a stained tissue sample",
    "logo.png": "the scikit-image logo",
    "microaneurysms.png": "a retina scan with microaneurysms",
    "moon.png": "the surface of the moon",
    "motorcycle_left.png": "a motorcycle in a workshop",
    "motorcycle_right.png": "a motorcycle seen from the right",
    "page.png": "a page of printed text",
    "phantom.png": "a Shepp-Logan phantom",
    "retina.jpg": "a photograph of a human retina",
    "rocket.jpg": "a rocket on a launch pad",
    "text.png": "handwritten text on paper",
}
"""scikit-image's bundled sample images with a caption each: the demo's and the tests' photos."""


def photo_dir() -> Path:
    """The folder of scikit-image's bundled sample data (installed with the package)."""
    return Path(str(files("skimage.data")))


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) while the block runs; yields the URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_list(path: Path, base_url: str, names: list[str], extra: dict[str, str]) -> Path:
    """A CSV URL list (url, caption) in the shape of LAION's metadata, for img2dataset."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for name in names:
            writer.writerow([f"{base_url}/{name}", PHOTO_CAPTIONS.get(name, name)])
        for name, caption in extra.items():
            writer.writerow([f"{base_url}/{name}", caption])
    return path


def demo_weights(model: str, tag: str) -> str:
    """`tag` if its weights are already in the local hub cache, else 'none' (random weights)."""
    from huggingface_hub import try_to_load_from_cache

    from vitscope.pipeline.model import import_open_clip

    hub = import_open_clip().get_pretrained_cfg(model, tag).get("hf_hub", "").rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if hub and isinstance(try_to_load_from_cache(hub, filename), str):
            return tag
    return "none"


DELIBERATE_MISS = "missing.png"
"""A URL the demo's server does not have, so its download step shows a failure counted and
skipped."""

DEMO_SAE_LAYERS = (5, 8)
"""The demo trains one SAE on each of these cached layers, then compares them."""

DEMO_PRETRAINED = {"ViT-B-32": "laion2b_s34b_b79k", "ViT-L-14": "laion2b_s32b_b82k"}


DEMO_MARKER = ".vitscope-demo"
"""The file that marks a folder as the demo's workdir, which a re-run empties and refills."""

DEMO_FOLDER = holding("the demo's folder", DEMO_MARKER, "sae-layer08/sae.safetensors")
"""The demo's workdir: marked, or (written before the marker) holding its layer-8 SAE."""


@dataclass(frozen=True)
class DemoConfig(Overwrite):
    """The offline end-to-end demo."""

    workdir: str = "data/demo"
    """Folder for the demo's shards, cache and runs; a re-run empties the demo's own folder
    first (--overwrite: any folder)."""
    model: str = "ViT-B-32"
    """open_clip model for the demo."""


def run_demo(config: DemoConfig) -> None:
    """Photos -> 127.0.0.1 -> img2dataset shards -> a cache of 4 layers -> SAEs on layers 5 and 8
    -> their analyses, MS, pictures, splice and sort evals, browsers, and a layer comparison."""
    import shutil

    workdir, model = Path(config.workdir), config.model
    check_output_path(workdir, "--workdir", overwrite=config.overwrite, own=DEMO_FOLDER)
    for module, extra in (("skimage", "demo"), ("img2dataset", "cache"), ("matplotlib", "plots")):
        require(module, extra, "vitscope demo")
    from vitscope.analysis.analyze import analyze
    from vitscope.analysis.browser import RUN_SITE, write_browser
    from vitscope.analysis.compare import compare
    from vitscope.analysis.config import AnalyzeConfig, MonosemanticityConfig, SpliceConfig
    from vitscope.analysis.files import load_analysis
    from vitscope.analysis.label_files import LABELS_FILE, read_labels_meta
    from vitscope.analysis.monosemanticity import monosemanticity
    from vitscope.analysis.plots import plot_analysis
    from vitscope.analysis.sorteval_config import SortEvalConfig
    from vitscope.analysis.sorteval_run import sort_eval
    from vitscope.analysis.splice import splice_run
    from vitscope.cache_plot import plot_cache
    from vitscope.cache_spec.info import summary_lines
    from vitscope.cache_spec.outliers import layer_norms, norm_lines
    from vitscope.cache_spec.store import open_cache
    from vitscope.pipeline.config import CacheConfig, DownloadConfig
    from vitscope.pipeline.download import download, download_stats
    from vitscope.pipeline.run import cache
    from vitscope.train.config import TrainConfig
    from vitscope.train.run import train

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / DEMO_MARKER).write_text("written by `vitscope demo`, which empties this folder\n")
    weights = demo_weights(model, DEMO_PRETRAINED.get(model, ""))
    print(f"demo: {len(PHOTO_CAPTIONS)} photos from scikit-image, {model} with weights '{weights}'")
    with serve_folder(photo_dir()) as base_url:
        urls = write_url_list(
            workdir / "urls.csv",
            base_url,
            sorted(PHOTO_CAPTIONS),
            extra={DELIBERATE_MISS: "a photo the server does not have"},
        )
        shards = download(
            DownloadConfig(
                url_list=str(urls), out=str(workdir / "shards"), samples_per_shard=16, threads=8
            )
        )
    stats = download_stats(shards)
    print(stats.line(shards))
    print(
        f"demo: {stats.failed} of {stats.count} images failed to download; {DELIBERATE_MISS} "
        "failed on purpose (the server does not have it), to show a failure counted and skipped"
    )
    summary = cache(
        CacheConfig(
            shards=str(shards),
            out=str(workdir / "cache"),
            layers=(2, 5, 8, 11),
            model=model,
            pretrained=weights,
            batch_size=8,
            num_workers=2,
            write_threads=2,
            chunk_images=8,
            rows_per_shard=16,
        )
    )
    print("\n".join(summary.lines()))
    cached = open_cache(summary.cache)
    norms = list(layer_norms(cached))
    print("\n".join([*summary_lines(cached), *norm_lines(cached, norms)]))
    picture = plot_cache(cached, norms, workdir / "cache.png")
    print(f"token norms by position, their distribution, outlier tokens: {picture}")
    width = open_cache(summary.cache).attrs.d_model
    labels = workdir / "labels.txt"
    labels.write_text("\n".join(PHOTO_CAPTIONS.values()) + "\n")
    runs = []
    for layer in DEMO_SAE_LAYERS:
        (run,) = train(
            [
                TrainConfig(
                    cache=str(summary.cache),
                    layer=layer,
                    out=str(workdir / f"sae-layer{layer:02d}"),
                    tokens=65_536,
                    batch_size=256,
                    n_latents=2 * width,
                    k=16,
                    k_aux=64,
                    lr=1e-3,
                    dead_tokens=8_192,
                    buffer_tokens=4_096,
                    heldout_fraction=0.3,
                    eval_images=8,
                    log_every=4_096,
                    checkpoint_every=32_768,
                )
            ]
        )
        print(f"SAE on layer {layer}: {run}/sae.safetensors; curves: {run}/report.png")
        analysis = analyze(AnalyzeConfig(run=str(run)))
        ms_config = MonosemanticityConfig(run=str(run), num_workers=2, labels=str(labels))
        folder, _, ms_F = monosemanticity(ms_config)
        defined = ms_F[ms_F == ms_F]  # NaN: no MS
        print(f"MonoSemanticity Score of {len(defined)} features: mean {defined.mean():.3f}")
        named = read_labels_meta(folder)
        if named is not None:  # the photos' captions as the words: 24 labels, seconds of text
            print(f"features named by {named.about}: {folder / LABELS_FILE}")
        for picture in plot_analysis(analysis):
            print(f"picture: {picture}")
        spliced, _ = splice_run(SpliceConfig(run=str(run), labels=str(labels)))
        print("\n".join(spliced.lines()))
        scored = sort_eval(SortEvalConfig(run=str(run), pairs=100))
        print(f"sort eval (clip judge): {scored.summary()}")
        index = write_browser(load_analysis(analysis), run / RUN_SITE)
        runs.append(run)
    for path in compare(runs, workdir / "compare"):
        print(f"layer comparison: {path}")
    print((workdir / "compare" / "compare.md").read_text(), end="")
    print(f"feature browser (open it in a browser; it links the layers): {index}")
