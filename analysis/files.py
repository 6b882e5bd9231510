"""The analysis folder (analysis/ANALYSIS.md is its prose): what `vitscope analyze` writes and
the pictures, the browser and notebooks read.

    ANALYSIS/
      meta.json          what was analysed and how far the pass got
      features.parquet   one row per feature: firing counts and frequencies, mean and max,
                         spatial coherence (Moran's I)
      top_images.parquet one row per (feature, rank): the image's row, shard, key, caption, value
      heatmaps.zarr      (F, N, T) float16: each top image's activation on every token
      state.safetensors  only while the pass is incomplete: the accumulators, for --resume
      monosemanticity.parquet, monosemanticity.json   `vitscope monosemanticity`: MS per feature
      labels.parquet, vocabulary.parquet, feature_embeddings.npy, labels.json   and, with a CLIP
                         model, the features named in words (analysis/label_files.py)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from vitscope.cache_spec.tokens import CLS, TokenLayout
from vitscope.support.outputs import holding
from vitscope.support.records import FileFormatError, parse_record, read_json, write_atomically

ANALYSIS_VERSION = "1.3"
META_FILE = "meta.json"
FEATURES_FILE = "features.parquet"
TOP_IMAGES_FILE = "top_images.parquet"
HEATMAPS_ARRAY = "heatmaps.zarr"
STATE_FILE = "state.safetensors"
MS_FILE = "monosemanticity.parquet"
MS_META_FILE = "monosemanticity.json"
MORANS_COLUMN = "morans_i"
"""features.parquet's spatial coherence (version 1.2 on; an older folder has none)."""
MS_COLUMN = "ms"
"""The column `load_analysis` adds to `features` when the folder holds an MS result."""
ANALYSIS_FOLDER = holding("an analysis folder", META_FILE, MS_META_FILE)
"""What analyze and monosemanticity write into again: their own folder (of one or both)."""


class AnalysisError(FileFormatError):
    """An analysis folder is missing, incomplete or of another version: names the file."""


@dataclass(frozen=True)
class AnalysisMeta:
    """meta.json: what was analysed, with which settings, and how far the pass got."""

    sae: str
    """The SAE (run folder or reference) that was analysed."""
    cache: str
    """The cache whose committed rows were encoded."""
    layer: int
    """Cached layer read (the SAE's layer)."""
    token_set: str
    """Tokens encoded per image: all, cls or patches (the SAE's)."""
    n_features: int
    """Latents F."""
    top_n: int
    """Top images kept per feature N."""
    n_tokens: int
    """Tokens per image T in heatmaps.zarr: the cache's tokens of the token set (`layout`)."""
    patch_grid: int | tuple[int, ...]
    """The cache's patch grid [rows, cols] (1.3); before, the side of a square grid (16 for
    ViT-L/14, 7 for ViT-B/32)."""
    chunks_total: int
    """Chunks of committed rows in the cache when the pass started."""
    chunks_done: int
    """Chunks encoded so far, in the cache's sequential order."""
    images_seen: int
    """Images encoded so far."""
    tokens_seen: int
    """Tokens encoded so far."""
    complete: bool
    """True once every chunk is in: only then are the parquet files and heatmaps written."""
    prefix_tokens: tuple[str, ...] | None = None
    """The cache's tokens before the patches: 'cls', 'reg0', ... (1.3). Absent: ('cls',)."""
    analysis_version: str = ANALYSIS_VERSION
    """major.minor of ANALYSIS.md; readers refuse another major."""

    @property
    def cache_layout(self) -> TokenLayout:
        """The cache's token layout; a folder before 1.3 had CLIP's CLS + square grid."""
        if isinstance(self.patch_grid, int):
            return TokenLayout((CLS,), (self.patch_grid, self.patch_grid))
        rows, cols = self.patch_grid
        return TokenLayout(self.prefix_tokens or (), (rows, cols))

    @property
    def layout(self) -> TokenLayout | None:
        """The layout of the heatmaps' T tokens (the token set's part of the cache's); None
        when they are the CLS token alone."""
        return self.cache_layout.subset(self.token_set)  # type: ignore[arg-type]


def write_meta(folder: Path, meta: AnalysisMeta) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / META_FILE, json.dumps(asdict(meta), indent=2).encode())


def read_meta(folder: Path) -> AnalysisMeta:
    path = folder / META_FILE
    if not path.is_file():
        raise AnalysisError(
            folder, "an analysis folder (meta.json)", "none", "run `vitscope analyze RUN` first"
        )
    meta = parse_record(
        AnalysisMeta, read_json(path, AnalysisError), path, "analysis", AnalysisError
    )
    if meta.analysis_version.split(".")[0] != ANALYSIS_VERSION.split(".")[0]:
        raise AnalysisError(path, f"analysis version {ANALYSIS_VERSION}", meta.analysis_version)
    return meta


FEATURES_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("fire_tokens", pa.int64()),
        ("fire_images", pa.int64()),
        ("freq_tokens", pa.float64()),
        ("freq_images", pa.float64()),
        ("mean_act", pa.float32()),
        ("max_act", pa.float32()),
        (MORANS_COLUMN, pa.float32()),
        ("morans_images", pa.int64()),
    ]
)
"""features.parquet: one row per feature, in feature order."""

TOP_IMAGES_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("rank", pa.int16()),
        ("row", pa.int64()),
        ("value", pa.float32()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("caption", pa.string()),
    ]
)
"""top_images.parquet: one row per (feature, rank) that holds an image; rank 0 is the best."""


MS_SCHEMA = pa.schema([("feature", pa.int32()), (MS_COLUMN, pa.float32())])
"""monosemanticity.parquet: one row per feature, in feature order; ms is null where undefined."""


@dataclass(frozen=True)
class MonosemanticityMeta:
    """monosemanticity.json: how the MS of monosemanticity.parquet was measured (written last)."""

    sae: str
    """The SAE whose features were scored."""
    cache: str
    """The cache whose committed rows were the evaluation images."""
    layer: int
    """Cached layer read (the SAE's layer)."""
    token_set: str
    """Tokens encoded per image: all, cls or patches (the SAE's)."""
    n_features: int
    """Latents F."""
    n_images: int
    """Evaluation images N."""
    encoder: str
    """open_clip model whose image embeddings gave the similarities."""
    encoder_weights: str
    """Its weights (pretrained tag, file, or 'none:seed=S')."""
    embed_dim: int
    """Width E of its embeddings."""
    pooling: str = "max"
    """An image's activation of a feature: its largest value over the image's tokens."""
    analysis_version: str = ANALYSIS_VERSION
    """major.minor of ANALYSIS.md."""


def write_monosemanticity(folder: Path, meta: MonosemanticityMeta, ms_F: np.ndarray) -> None:
    """MS per feature (NaN where undefined), then the meta that marks the result complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MS_META_FILE).unlink(missing_ok=True)
    ms = pa.array(ms_F.astype(np.float32), mask=np.isnan(ms_F))
    table = pa.table({"feature": np.arange(len(ms_F), dtype=np.int32), MS_COLUMN: ms})
    pq.write_table(table.cast(MS_SCHEMA), folder / MS_FILE)
    write_atomically(folder / MS_META_FILE, json.dumps(asdict(meta), indent=2).encode())


def read_monosemanticity(folder: Path) -> tuple[MonosemanticityMeta, pa.Table] | None:
    """The folder's MS result, or None if it has none (or only an interrupted one)."""
    path = folder / MS_META_FILE
    if not path.is_file():
        return None
    meta = parse_record(
        MonosemanticityMeta, read_json(path, AnalysisError), path, "MS result", AnalysisError
    )
    if meta.analysis_version.split(".")[0] != ANALYSIS_VERSION.split(".")[0]:
        raise AnalysisError(path, f"analysis version {ANALYSIS_VERSION}", meta.analysis_version)
    return meta, pq.read_table(folder / MS_FILE)


def write_results(
    folder: Path, features: pa.Table, top_images: pa.Table, heatmaps_FNT: np.ndarray
) -> None:
    """The result files of a complete pass (meta.json is written after them, marking it done)."""
    pq.write_table(features.cast(FEATURES_SCHEMA), folder / FEATURES_FILE)
    pq.write_table(top_images.cast(TOP_IMAGES_SCHEMA), folder / TOP_IMAGES_FILE)
    n_features, top_n, n_tokens = heatmaps_FNT.shape
    array = zarr.create_array(
        folder / HEATMAPS_ARRAY,
        shape=heatmaps_FNT.shape,
        chunks=(min(n_features, 1024), top_n, n_tokens),
        dtype="float16",
        overwrite=True,
        config={"write_empty_chunks": True},  # every chunk a file: a missing one is damage
    )
    array[:] = heatmaps_FNT.astype(np.float16)


@dataclass
class Analysis:
    """A complete analysis: `features` and `top_images` as pyarrow tables, heatmaps on demand;
    `features` has an `ms` column when the folder holds an MS result (`monosemanticity`)."""

    folder: Path
    meta: AnalysisMeta
    features: pa.Table
    top_images: pa.Table
    monosemanticity: MonosemanticityMeta | None = None

    def heatmaps(self, feature: int) -> np.ndarray:
        """(N, T) float32: the feature on every token of each of its top images."""
        return self.heatmap_block(feature, feature + 1)[0]

    def heatmap_block(self, first: int, stop: int) -> np.ndarray:
        """(stop - first, N, T) float32, features first..stop-1 (stop clipped to F). Zarr reads
        a missing chunk as zeros, a picture of nothing; so a chunk of features that fired must
        be a file that decodes, else an `AnalysisError` naming it."""
        stop = min(stop, self.meta.n_features)
        heatmaps = self.folder / HEATMAPS_ARRAY
        if not (heatmaps / "zarr.json").is_file():
            raise self._damaged_heatmaps(heatmaps / "zarr.json", first, stop, "no file")
        array = zarr.open_array(heatmaps, mode="r")
        per_chunk = array.chunks[0]
        fired_F = self.features["fire_images"].to_numpy() > 0
        parts = []
        for start in range(first - first % per_chunk, stop, per_chunk):
            lo, hi = max(start, first), min(start + per_chunk, stop)
            chunk = heatmaps / array.metadata.encode_chunk_key((start // per_chunk, 0, 0))
            if not chunk.is_file() and fired_F[start : start + per_chunk].any():
                raise self._damaged_heatmaps(chunk, start, start + per_chunk, "no file")
            try:
                parts.append(np.asarray(array[lo:hi], dtype=np.float32))
            except (RuntimeError, ValueError) as err:
                found = f"bytes that do not decode ({err})"
                raise self._damaged_heatmaps(chunk, start, start + per_chunk, found) from None
        return np.concatenate(parts) if parts else np.zeros((0, *array.shape[1:]), np.float32)

    def _damaged_heatmaps(self, path: Path, first: int, stop: int, found: str) -> AnalysisError:
        last = min(stop, self.meta.n_features) - 1
        return AnalysisError(
            path,
            f"the heatmaps of features {first}..{last} of the analysis in {self.folder}",
            found,
            f"analyse again: `vitscope analyze {self.meta.sae} --overwrite`",
        )

    def top_of(self, feature: int) -> list[dict]:
        """The feature's top images, best first, as row dicts of top_images.parquet."""
        mask = pc.equal(self.top_images["feature"], feature)
        rows = self.top_images.filter(mask).to_pylist()
        return sorted(rows, key=lambda r: r["rank"])


def load_analysis(folder: Path) -> Analysis:
    """A complete analysis folder; an incomplete one says how to finish it."""
    meta = read_meta(folder)
    if not meta.complete:
        raise AnalysisError(
            folder,
            "a complete analysis",
            f"{meta.chunks_done} of {meta.chunks_total} chunks done",
            "finish it with `vitscope analyze ... --resume`",
        )
    features = pq.read_table(folder / FEATURES_FILE)
    ms = read_monosemanticity(folder)
    if ms is not None:
        if ms[0].n_features != meta.n_features:
            raise AnalysisError(
                folder / MS_META_FILE,
                f"MS of the analysed SAE's {meta.n_features} features",
                f"{ms[0].n_features} features",
                "re-run `vitscope monosemanticity` for this SAE",
            )
        features = features.append_column(MS_COLUMN, ms[1][MS_COLUMN])
    top_images = pq.read_table(folder / TOP_IMAGES_FILE)
    return Analysis(folder, meta, features, top_images, None if ms is None else ms[0])
