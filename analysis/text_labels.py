"""Features named in words by a CLIP model's text tower, and features found by text.

The MonoSemanticity pass sums per feature its activation-weighted image embedding; normalised,
it is the direction of the embedding space the feature's images share, and text embeddings live
in the same space. So a label whose prompts embed near it names the feature:

    score(f, l) = cos(w_f, t_l)        w_f = Σ (r_n − min r) e_n

w_f is MS's Σ a_n e_n (the scale 1/(max r − min r) drops out on normalising) with MS's shift by
min r subtracted: for a sparse feature min r = 0 and w_f = Σ r_n e_n; for one that is never 0
(no ReLU, or firing on every image) the shift keeps the images it fires on least out of the sum,
as MS does, instead of adding every image's embedding in (`MSAccumulator.feature_embeddings`).
t_l is built as open_clip's zero-shot classifier builds a class's weights: the label in each of
open_clip's simple ImageNet templates ("itap of a {}.", "a origami {}.", ...), each text
embedding unit-norm, averaged, normalised again. The same cosines read the other way rank the
features for a label (the browser's search box, over the vocabulary) or for any text (`vitscope
search`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from vitscope.analysis.files import MonosemanticityMeta
from vitscope.analysis.label_files import LabelsMeta, write_labels
from vitscope.pipeline.model import TextTower, has_text_tower, import_open_clip, load_text_tower
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.progress import status

MATCH_BLOCK = 1 << 24
"""Scores held at once by `best_matches` (64 MB of float32): 256 labels against 65,536 features."""
IMAGENET = "ImageNet's class names"
"""The default vocabulary, as labels.json records it."""


def templates() -> tuple[str, ...]:
    """open_clip's simple ImageNet prompt templates, "{}" where the label goes: 7 texts a label
    (its 80 OpenAI templates would cost 11 times the text passes for the same ranking use)."""
    return tuple(template("{}") for template in import_open_clip().SIMPLE_IMAGENET_TEMPLATES)


def vocabulary(path: str) -> tuple[str, list[str]]:
    """(what it is, its labels): a file of labels one a line, or ImageNet's class names for "".
    Blank lines and repeats are dropped (ImageNet lists "sunglasses" and "missile" twice)."""
    if not path:
        return IMAGENET, list(dict.fromkeys(import_open_clip().IMAGENET_CLASSNAMES))
    if not Path(path).is_file():
        raise MissingInput("expected a file of labels, one a line; found none", path=path)
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not labels:
        raise BadSetting(
            "expected labels, one a line, found none", path=path, fix="list at least one"
        )
    return path, list(dict.fromkeys(labels))


@torch.inference_mode()
def embed_texts(tower: TextTower, texts: Sequence[str]) -> Tensor:
    """(L, E) float32 unit-norm embeddings of the texts, each averaged over `templates()` as
    open_clip's zero-shot classifier averages a class's prompts."""
    classifier_EL = import_open_clip().build_zero_shot_classifier(
        tower.clip,
        tower.tokenizer,
        list(texts),
        templates(),
        num_classes_per_batch=32,
        device=tower.device,
        use_tqdm=len(texts) > 32,
    )
    return torch.nn.functional.normalize(classifier_EL.T.float(), dim=-1)


def best_matches(queries_QE: Tensor, keys_KE: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For each query the `n` keys of largest dot product (the cosine, for unit rows), best
    first: scores (Q, n') float32 and key indices (Q, n') int64, n' = min(n, K). Queries go in
    blocks, so at most MATCH_BLOCK scores are held at once."""
    n = min(n, len(keys_KE))
    keys_KE = keys_KE.float()
    block = max(1, MATCH_BLOCK // max(len(keys_KE), 1))
    scores, indices = [torch.empty(0, n)], [torch.empty(0, n, dtype=torch.int64)]
    for part_BE in queries_QE.split(block):
        top = (part_BE.to(keys_KE.device, torch.float32) @ keys_KE.T).topk(n, dim=1)
        scores.append(top.values.cpu())
        indices.append(top.indices.cpu())
    return torch.cat(scores), torch.cat(indices)


def named(features_FE: Tensor) -> Tensor:
    """The features that have an embedding (a non-zero row): those that fired on some image
    more than on their weakest one."""
    return features_FE.ne(0).any(dim=1).nonzero().squeeze(1).cpu()


def top_labels(features_FE: Tensor, texts_LE: Tensor, labels: Sequence[str], k: int) -> pa.Table:
    """labels.parquet's rows: each feature that has an embedding, its `k` labels of largest
    cosine, best first (feature, rank, label, score)."""
    features_M = named(features_FE)
    scores_MK, idx_MK = best_matches(features_FE[features_M.to(features_FE.device)], texts_LE, k)
    n_kept = idx_MK.shape[1]
    return pa.table(
        {
            "feature": np.repeat(features_M.numpy(), n_kept).astype(np.int32),
            "rank": np.tile(np.arange(n_kept, dtype=np.int16), len(features_M)),
            "label": pa.array(np.asarray(labels, dtype=object)[idx_MK.reshape(-1).numpy()]),
            "score": scores_MK.reshape(-1).numpy(),
        }
    )


def ranked_features(texts_QE: Tensor, features_FE: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For each text, the `n` features (of those with an embedding) of largest cosine, best
    first: scores (Q, n') and feature ids (Q, n')."""
    features_M = named(features_FE)
    scores_QN, idx_QN = best_matches(texts_QE, features_FE[features_M.to(features_FE.device)], n)
    return scores_QN, features_M[idx_QN]


def name_features(
    folder: Path,
    features_FE: Tensor,
    ms: MonosemanticityMeta,
    words: tuple[str, list[str]],
    k: int,
    device: str,
) -> LabelsMeta | None:
    """Name the features with the text tower of the model whose image embeddings were weighted
    and write the label files; None, said in one line, for a model without a text tower."""
    if not has_text_tower(ms.encoder):
        status(f"{ms.encoder} has no text tower: the features are not named in words")
        return None
    source, labels = words
    status(f"naming the features: {len(labels):,} labels in {len(templates())} prompts each")
    tower = load_text_tower(ms.encoder, ms.encoder_weights, device)
    texts_LE = embed_texts(tower, labels)
    table = top_labels(features_FE, texts_LE, labels, k)
    meta = LabelsMeta(
        vocabulary=source,
        n_labels=len(labels),
        templates=templates(),
        top_labels=min(k, len(labels)),
        encoder=ms.encoder,
        encoder_weights=ms.encoder_weights,
        n_features=len(features_FE),
        n_named=len(named(features_FE)),
    )
    write_labels(folder, meta, table, labels, texts_LE.cpu().numpy(), features_FE.cpu().numpy())
    return meta
