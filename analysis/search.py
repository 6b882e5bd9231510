"""`vitscope search RUN "text"`: the features whose activation-weighted image embedding is nearest
a text's, under the text tower that named them (analysis/text_labels.py). Reads the analysis
folder's feature_embeddings.npy; writes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vitscope.analysis.config import SearchConfig
from vitscope.analysis.files import MS_COLUMN, MS_FILE
from vitscope.analysis.label_files import (
    LABELS_FILE,
    LabelsMeta,
    need_labels,
    read_feature_embeddings,
)
from vitscope.analysis.text_labels import embed_texts, ranked_features
from vitscope.pipeline.model import load_text_tower
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.progress import status


@dataclass(frozen=True)
class SearchHit:
    feature: int
    score: float
    """Cosine of the text's embedding with the feature's."""
    label: str
    """The feature's best label (labels.parquet's rank 0)."""
    ms: float | None
    """Its MonoSemanticity Score (None: undefined)."""


def search(config: SearchConfig) -> tuple[LabelsMeta, list[SearchHit]]:
    """The `config.top` features nearest the text, nearest first, and how they were named."""
    if not config.text.strip():
        raise BadSetting('expected a text to search for, found an empty one; pass e.g. "a red car"')
    folder = config.folder
    if not folder.is_dir():
        raise MissingInput(
            f"expected the analysis folder of {config.run} at {folder}, found none",
            fix=f"run `vitscope monosemanticity {config.run}`, or pass --analysis",
        )
    meta = need_labels(folder, "vitscope search")
    features_FE = torch.from_numpy(read_feature_embeddings(folder).astype("float32"))
    status(f"embedding the text with {meta.encoder}'s text tower ({meta.encoder_weights})")
    tower = load_text_tower(meta.encoder, meta.encoder_weights, resolve_device(config.device))
    text_1E = embed_texts(tower, [config.text])
    scores, features = (t[0].tolist() for t in ranked_features(text_1E, features_FE, config.top))
    return meta, [
        SearchHit(f, s, label, ms)
        for f, s, label, ms in zip(features, scores, *_label_and_ms(folder, features), strict=True)
    ]


def search_lines(text: str, meta: LabelsMeta, hits: list[SearchHit]) -> list[str]:
    """A table for the terminal, under a line that says whose text tower ranked them."""
    lines = [
        f'features nearest "{text}" under {meta.about}',
        f"{'rank':>4} {'feature':>8} {'cosine':>7} {'MS':>6}  best label",
    ]
    for rank, hit in enumerate(hits, 1):
        ms = "-" if hit.ms is None else f"{hit.ms:.3f}"
        lines.append(f"{rank:>4} {hit.feature:>8} {hit.score:7.4f} {ms:>6}  {hit.label}")
    return lines


def _label_and_ms(folder: Path, features: list[int]) -> tuple[list[str], list[float | None]]:
    """Each feature's best label and MS, from labels.parquet and monosemanticity.parquet."""
    best = pq.read_table(folder / LABELS_FILE, filters=[("rank", "=", 0)])
    best = best.filter(pc.is_in(best["feature"], value_set=pa.array(features, pa.int32())))
    label_of = dict(zip(best["feature"].to_pylist(), best["label"].to_pylist(), strict=True))
    ms = pq.read_table(folder / MS_FILE)[MS_COLUMN].to_pylist()
    return [label_of[f] for f in features], [ms[f] for f in features]
