"""The files that name the features in words (`vitscope monosemanticity` with a CLIP model's text
tower), beside monosemanticity.parquet in the analysis folder; analysis/ANALYSIS.md is their prose.

    labels.parquet          one row per (feature, rank): its best labels and their cosines
    vocabulary.parquet      the labels with their text embeddings: `vitscope browse` ranks the
                            features of every label from them, with no model loaded
    feature_embeddings.npy  (F, E) float16 unit-norm activation-weighted image embeddings, which
                            `vitscope search` compares any text with
    labels.json             how they were made (written last: the four files are complete)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitscope.analysis.files import (
    ANALYSIS_VERSION,
    AnalysisError,
    read_monosemanticity,
)
from vitscope.pipeline.model import has_text_tower
from vitscope.support.errors import MissingInput
from vitscope.support.records import parse_record, read_json, write_atomically

LABELS_FILE = "labels.parquet"
VOCABULARY_FILE = "vocabulary.parquet"
FEATURE_EMBEDDINGS_FILE = "feature_embeddings.npy"
LABELS_META_FILE = "labels.json"

LABELS_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("rank", pa.int16()),
        ("label", pa.string()),
        ("score", pa.float32()),
    ]
)
"""labels.parquet: one row per (feature, rank) of a feature that has an embedding; rank 0 is its
best label."""

VOCABULARY_SCHEMA = pa.schema([("label", pa.string()), ("embedding", pa.list_(pa.float32()))])
"""vocabulary.parquet: one row per label, in the vocabulary's order."""


@dataclass(frozen=True)
class LabelsMeta:
    """labels.json: how the features were named."""

    vocabulary: str
    """The labels' source: "ImageNet's class names" or the --labels file."""
    n_labels: int
    """Labels L (blank lines and repeats dropped)."""
    templates: tuple[str, ...]
    """The prompts each label was embedded in ("{}" marks the label), averaged."""
    top_labels: int
    """Labels kept per feature K."""
    encoder: str
    """The open_clip model whose image embeddings were weighted and whose text tower read the
    labels (monosemanticity.json's encoder)."""
    encoder_weights: str
    """Its weights (tag, file, or 'none:seed=S')."""
    n_features: int
    """Latents F."""
    n_named: int
    """Features with an embedding, each with K labels."""
    analysis_version: str = ANALYSIS_VERSION
    """major.minor of ANALYSIS.md."""

    @property
    def about(self) -> str:
        """What named the features, in a clause for the terminal and the browser; with random
        weights (the tests', the offline demo's) it says the words mean little."""
        caveat = "; random weights: the words mean little" if self.random_weights else ""
        return (
            f"{self.n_labels:,} labels ({self.vocabulary}) through the text tower of "
            f"{self.encoder} ({self.encoder_weights}){caveat}"
        )

    @property
    def random_weights(self) -> bool:
        return self.encoder_weights.startswith("none")


def remove_labels(folder: Path) -> None:
    """Drop an earlier run's labels (meta first): a new MS pass replaces or skips them."""
    for name in (LABELS_META_FILE, LABELS_FILE, VOCABULARY_FILE, FEATURE_EMBEDDINGS_FILE):
        (folder / name).unlink(missing_ok=True)


def write_labels(
    folder: Path,
    meta: LabelsMeta,
    labels: pa.Table,
    vocabulary: list[str],
    texts_LE: np.ndarray,
    features_FE: np.ndarray,
) -> None:
    """The four files, labels.json last."""
    pq.write_table(labels.cast(LABELS_SCHEMA), folder / LABELS_FILE)
    embeddings = pa.array(list(texts_LE.astype(np.float32)), type=pa.list_(pa.float32()))
    vocab = pa.table({"label": vocabulary, "embedding": embeddings}, schema=VOCABULARY_SCHEMA)
    pq.write_table(vocab, folder / VOCABULARY_FILE)
    np.save(folder / FEATURE_EMBEDDINGS_FILE, features_FE.astype(np.float16))
    write_atomically(folder / LABELS_META_FILE, json.dumps(asdict(meta), indent=2).encode())


def read_labels_meta(folder: Path) -> LabelsMeta | None:
    """The folder's labels.json, or None if its features are not named."""
    path = folder / LABELS_META_FILE
    if not path.is_file():
        return None
    meta = parse_record(LabelsMeta, read_json(path, AnalysisError), path, "labels", AnalysisError)
    if meta.analysis_version.split(".")[0] != ANALYSIS_VERSION.split(".")[0]:
        raise AnalysisError(path, f"analysis version {ANALYSIS_VERSION}", meta.analysis_version)
    return meta


def need_labels(folder: Path, command: str) -> LabelsMeta:
    """labels.json, else a `MissingInput` that says why there is none and what to run."""
    meta = read_labels_meta(folder)
    if meta is None:
        raise MissingInput(f"{command} needs named features: {why_unnamed(folder)}")
    return meta


def why_unnamed(folder: Path) -> str:
    """Why the folder holds no labels, and the fix, in a clause (for an error or the browser)."""
    ms = read_monosemanticity(folder)
    if ms is None:
        return f"{folder} has no {LABELS_META_FILE}; run `vitscope monosemanticity RUN` first"
    if not has_text_tower(ms[0].encoder):
        return (
            f"{folder}'s features were scored with {ms[0].encoder}'s image embeddings, and it has "
            "no text tower; name them with a CLIP model: `vitscope monosemanticity RUN --encoder "
            "MODEL --encoder-weights TAG`"
        )
    return (
        f"{folder}'s MS pass named no features (--top-labels 0); run `vitscope monosemanticity "
        "RUN` again"
    )


def read_vocabulary(folder: Path) -> tuple[list[str], np.ndarray]:
    """The labels and their (L, E) float32 text embeddings."""
    table = pq.read_table(folder / VOCABULARY_FILE)
    embeddings = np.array(table["embedding"].combine_chunks().flatten(), dtype=np.float32)
    return table["label"].to_pylist(), embeddings.reshape(table.num_rows, -1)


def read_feature_embeddings(folder: Path) -> np.ndarray:
    """(F, E) float16, memory-mapped."""
    return np.load(folder / FEATURE_EMBEDDINGS_FILE, mmap_mode="r")
