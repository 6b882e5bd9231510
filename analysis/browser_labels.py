"""The feature browser's words: data/labels.js, from the analysis folder's label files.

A static page has no text encoder, so `vitscope browse` ranks here, once, the features nearest
every label of the vocabulary (the search box matches what is typed against the labels and
lists those); each feature's best labels come from labels.parquet. Without labels the script
says why, and the pages show that instead of the column and the box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vitscope.analysis.label_files import (
    LABELS_FILE,
    read_feature_embeddings,
    read_labels_meta,
    read_vocabulary,
    why_unnamed,
)
from vitscope.analysis.text_labels import ranked_features

SEARCH_FEATURES = 24
"""Features listed per label in the search box, nearest first."""


def labels_data(folder: Path) -> dict:
    """VS.labels: {about, random, vocabulary, top, search}, or {missing: why} when the folder's
    features are not named. top[f] is feature f's best labels as [label index, score, ...];
    search[l] the features nearest label l as [feature, score, ...]."""
    meta = read_labels_meta(folder)
    if meta is None:
        return {"missing": why_unnamed(folder)}
    vocabulary, texts_LE = read_vocabulary(folder)
    features_FE = torch.from_numpy(read_feature_embeddings(folder).astype(np.float32))
    texts = torch.from_numpy(texts_LE)
    scores_LN, features_LN = ranked_features(texts, features_FE, SEARCH_FEATURES)
    labels = pq.read_table(folder / LABELS_FILE)  # by feature, then rank
    index = {label: i for i, label in enumerate(vocabulary)}
    top: list[list[float]] = [[] for _ in range(meta.n_features)]
    columns = (labels[c].to_pylist() for c in ("feature", "label", "score"))
    for feature, label, score in zip(*columns, strict=True):
        top[feature] += [index[label], round(score, 4)]
    return {
        "about": meta.about,
        "random": meta.random_weights,
        "vocabulary": vocabulary,
        "top": top,
        "search": [_pairs(f, s) for f, s in zip(features_LN, scores_LN, strict=True)],
    }


def _pairs(features_N: torch.Tensor, scores_N: torch.Tensor) -> list[float]:
    """[feature, score, feature, score, ...] (scores to 4 decimals: cosines, shown to 3)."""
    pairs = zip(features_N.tolist(), scores_N.tolist(), strict=True)
    return [value for feature, score in pairs for value in (feature, round(score, 4))]
