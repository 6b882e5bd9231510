"""`vitscope monosemanticity`: the MonoSemanticity Score (MS) of every feature of an SAE (Pach et
al. 2025, "Sparse Autoencoders Learn Monosemantic Features in Vision-Language Models"):

    MS_f = Σ_{n≠m} a_n a_m s_nm / Σ_{n≠m} a_n a_m

over the N evaluation images, where a_n = (r_n − min r) / (max r − min r) is the feature's image
activation r_n scaled to [0, 1] over the set, and s_nm = e_n · e_m the cosine similarity of the
images' unit-norm embeddings from an image encoder: the similarity of the images it fires on,
weighted by how strongly it fires on both. r_n is the feature's largest value over the image's
tokens (the analysis's "peak"; for a CLS-only SAE, its value on CLS).

Linear time per feature: with unit-norm e_n, Σ_{n≠m} a_n a_m s_nm = ||Σ a_n e_n||² − Σ a_n² and
Σ_{n≠m} a_n a_m = (Σ a_n)² − Σ a_n². The scale 1/(max − min) cancels in the ratio; the shift by
lo = min r expands into sums over the images that are kept per feature in one pass:

    Σ (r_n − lo) e_n = R − lo·Σ e_n          R = Σ r_n e_n   (F, E), float32
    Σ (r_n − lo)     = P − N·lo              P = Σ r_n       (F,), float64
    Σ (r_n − lo)²    = Q − 2·lo·P + N·lo²    Q = Σ r_n²      (F,), float64

plus the running min and Σ e_n (E,). A sparse SAE's feature is 0 on most images, so a chunk that
touches few features adds only their rows of R (index_add_ in blocks of FEATURE_BLOCK), one that
touches many adds to all of R in place (DENSE_FROM); either way R's F × E float32 is the pass's
bounded memory (201 MB at F = 65,536, E = 768; 268 MB at E = 1,024), with no (F, E) temporary.

The pass: the encoder embeds the cache's images, read back from their webdataset shards in
DataLoader workers (one shard each at a time); when all of a shard's rows are embedded, its
chunks are read (stage two's chunk reader), encoded by the SAE, pooled per image and folded in.
A feature whose weights Σ_{n≠m} a_n a_m are 0 (it fires on fewer than two images, or the same
on all) has no MS: NaN, stored as null.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitscope.analysis.analyze import first_images, layer_of
from vitscope.analysis.config import MonosemanticityConfig
from vitscope.analysis.files import (
    ANALYSIS_FOLDER,
    META_FILE,
    AnalysisError,
    MonosemanticityMeta,
    read_meta,
    write_monosemanticity,
)
from vitscope.analysis.images import ImageSourceError, shard_paths
from vitscope.analysis.label_files import remove_labels
from vitscope.analysis.text_labels import name_features, vocabulary
from vitscope.cache_spec.store import Cache, ChunkRef, open_cache
from vitscope.pipeline.dataset import ShardBatch, ShardImages, shard_loader
from vitscope.pipeline.model import ImageEncoder, load_image_encoder
from vitscope.saes.load import load_sae
from vitscope.saes.sae import SAE
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.outputs import check_output_path
from vitscope.support.progress import status
from vitscope.train.loader import read_chunks

FEATURE_BLOCK = 4096
"""Features whose rows of R are updated (and scored) at once: bounds the (block, E) buffers."""
DENSE_FROM = 1 / 16
"""A chunk touching at least this share of the features adds to all of R in one in-place matmul
(addmm_); fewer, only their rows (index_add_). With 56,792 of 65,536 touched per 16-image chunk,
the sums ran at 591 images/s with addmm_ against 345 with the row update (BENCHMARKS.md)."""


def image_activations(idx_CTK: Tensor, values_CTK: Tensor, n_features: int) -> Tensor:
    """(C, F) float32: each feature's largest value over each image's T tokens, in the dense
    code's terms (0 on a token where the feature is not kept), from the sparse codes (C, T, K)."""
    n_images, n_tokens, _ = idx_CTK.shape
    slot = torch.arange(n_images, device=idx_CTK.device).view(-1, 1, 1) * n_features + idx_CTK
    slot, values = slot.reshape(-1), values_CTK.reshape(-1).float()
    peak = torch.full((n_images * n_features,), float("-inf"), device=values.device)
    peak.scatter_reduce_(0, slot, values, "amax")
    kept_on = torch.bincount(slot, minlength=n_images * n_features)
    # Kept on fewer than all tokens: a 0 of the dense code takes part in the max.
    peak = torch.where(kept_on < n_tokens, peak.clamp(min=0), peak)
    return peak.view(n_images, n_features)


@dataclass
class MSAccumulator:
    """The sums MS is made of, over the images seen so far (see the module docstring)."""

    weighted_FE: Tensor
    """R = Σ r_n e_n, float32."""
    act_sum_F: Tensor
    """P = Σ r_n, float64."""
    act_sq_F: Tensor
    """Q = Σ r_n², float64."""
    act_min_F: Tensor
    """min r_n (+inf before any image), float32."""
    emb_sum_E: Tensor
    """Σ e_n, float64."""
    n_images: int = 0

    @classmethod
    def empty(
        cls, n_features: int, embed_dim: int, device: str | torch.device = "cpu"
    ) -> MSAccumulator:
        return cls(
            weighted_FE=torch.zeros(n_features, embed_dim, device=device),
            act_sum_F=torch.zeros(n_features, dtype=torch.float64, device=device),
            act_sq_F=torch.zeros(n_features, dtype=torch.float64, device=device),
            act_min_F=torch.full((n_features,), float("inf"), device=device),
            emb_sum_E=torch.zeros(embed_dim, dtype=torch.float64, device=device),
        )

    def add(self, acts_CF: Tensor, emb_CE: Tensor) -> None:
        """Fold in C images: their activations r (C, F) and unit-norm embeddings e (C, E)."""
        acts_CF = acts_CF.to(self.weighted_FE.device, torch.float32)
        emb_CE = emb_CE.to(self.weighted_FE.device, torch.float32)
        self.act_sum_F += acts_CF.sum(dim=0, dtype=torch.float64)
        self.act_sq_F += acts_CF.double().square().sum(dim=0)  # exact: P² = Q for one image
        self.act_min_F = torch.minimum(self.act_min_F, acts_CF.amin(dim=0))
        self.emb_sum_E += emb_CE.sum(dim=0, dtype=torch.float64)
        self.n_images += len(acts_CF)
        touched_F = acts_CF.ne(0).any(dim=0)
        if touched_F.sum() >= DENSE_FROM * len(touched_F):
            self.weighted_FE.addmm_(acts_CF.T, emb_CE)  # in place: no (F, E) temporary
            return
        acts_FC = acts_CF.T.contiguous()
        for block in touched_F.nonzero().squeeze(1).split(FEATURE_BLOCK):
            self.weighted_FE.index_add_(0, block, acts_FC.index_select(0, block) @ emb_CE)

    def scores(self) -> Tensor:
        """(F,) float64 MS of every feature, NaN where undefined, in [-1, 1]."""
        n, lo = self.n_images, self._lowest()
        shifted_sum = self.act_sum_F - n * lo  # Σ (r − lo)
        shifted_sq = self.act_sq_F - 2 * lo * self.act_sum_F + n * lo.square()  # Σ (r − lo)²
        norm_sq = torch.empty_like(shifted_sum)  # ||Σ (r − lo) e||²
        for first in range(0, len(norm_sq), FEATURE_BLOCK):
            part = slice(first, first + FEATURE_BLOCK)
            norm_sq[part] = self._shifted_weighted(part, lo).square().sum(dim=1)
        weights = shifted_sum.square() - shifted_sq  # Σ_{n≠m} (r_n − lo)(r_m − lo)
        defined = weights > 1e-9 * shifted_sum.square()
        ms = (norm_sq - shifted_sq) / torch.where(defined, weights, 1.0)
        return torch.where(defined, ms.clamp(-1, 1), float("nan"))

    def feature_embeddings(self) -> Tensor:
        """(F, E) float16: each feature's activation-weighted image embedding Σ (r − lo) e, unit
        norm (analysis/text_labels.py says why the shift); a zero row where Σ (r − lo) is 0 (no
        image, or the same value on every one: exactly 0, P and N·lo being sums of float32
        values in float64)."""
        lo = self._lowest()
        spread_F = self.act_sum_F - self.n_images * lo > 0
        out_FE = torch.zeros(self.weighted_FE.shape, dtype=torch.float16, device=lo.device)
        for first in range(0, len(out_FE), FEATURE_BLOCK):
            part = slice(first, first + FEATURE_BLOCK)
            unit = torch.nn.functional.normalize(self._shifted_weighted(part, lo), dim=1)
            out_FE[part] = torch.where(spread_F[part, None], unit, 0.0).half()
        return out_FE

    def _lowest(self) -> Tensor:
        """(F,) float64 lo = min r (0 before any image)."""
        lo = self.act_min_F.double()
        return torch.where(torch.isfinite(lo), lo, 0.0)

    def _shifted_weighted(self, part: slice, lo: Tensor) -> Tensor:
        """(len(part), E) float64 Σ (r − lo) e of the features in `part`."""
        return self.weighted_FE[part].double() - lo[part, None] * self.emb_sum_E


def monosemanticity_scores(acts_NF: Tensor, emb_NE: Tensor) -> Tensor:
    """MS of every feature from image activations (N, F) and embeddings (N, E) in memory (the
    embeddings are normalised here): for notebooks and tests."""
    acc = MSAccumulator.empty(acts_NF.shape[1], emb_NE.shape[1], acts_NF.device)
    acc.add(acts_NF, torch.nn.functional.normalize(emb_NE.float(), dim=-1))
    return acc.scores()


def monosemanticity(
    config: MonosemanticityConfig,
) -> tuple[Path, MonosemanticityMeta, np.ndarray]:
    """Score every feature over the evaluation images; write monosemanticity.parquet and .json
    into the analysis folder, then name the features with the encoder's text tower if it has one
    (analysis/text_labels.py); returns the folder, the meta and MS per feature (NaN: none)."""
    out = config.out_dir
    check_output_path(out, "--out", overwrite=config.overwrite, own=ANALYSIS_FOLDER)
    words = vocabulary(config.labels) if config.top_labels else None  # a bad file: before work
    device = resolve_device(config.device)
    sae = load_sae(config.run, device=device)
    layer = layer_of(config, sae)
    _check_analysis(out, sae, layer)
    cache = open_cache(sae.card.cache_or(config.cache, config.run), layer=layer)
    chunks = cache.chunks()
    if config.max_images:
        chunks = first_images(chunks, config.max_images)
    if not chunks:
        raise MissingInput(f"{cache.path}: no committed rows to score the features on")
    encoder = _encoder(config, cache, device)
    acc = MSAccumulator.empty(sae.n_latents, encoder.embed_dim, device)
    remove_labels(out)  # an earlier run's words would name this run's features
    _accumulate(acc, config, cache, layer, sae, encoder, chunks)
    meta = MonosemanticityMeta(
        sae=str(config.run),
        cache=str(cache.path),
        layer=layer,
        token_set=sae.card.token_set,
        n_features=sae.n_latents,
        n_images=acc.n_images,
        encoder=encoder.model,
        encoder_weights=encoder.pretrained,
        embed_dim=encoder.embed_dim,
    )
    ms_F = acc.scores().cpu().numpy()
    write_monosemanticity(out, meta, ms_F)
    if words is not None:
        name_features(out, acc.feature_embeddings(), meta, words, config.top_labels, device)
    return out, meta, ms_F


def _check_analysis(out: Path, sae: SAE, layer: int) -> None:
    """MS goes beside an analysis of the same SAE, if the folder holds one."""
    if not (out / META_FILE).is_file():
        return
    analysed = read_meta(out)
    if (analysed.n_features, analysed.layer) != (sae.n_latents, layer):
        raise AnalysisError(
            out / META_FILE,
            f"an analysis of this SAE ({sae.n_latents} features, layer {layer})",
            f"one of {analysed.n_features} features at layer {analysed.layer}",
            "pass --out",
        )


def _encoder(config: MonosemanticityConfig, cache: Cache, device: str) -> ImageEncoder:
    model = config.encoder or cache.attrs.model
    weights = config.encoder_weights if config.encoder else cache.attrs.pretrained
    status(f"loading the MS image encoder {model} ({weights})")
    try:
        return load_image_encoder(model, weights, device)
    except ValueError as err:
        if config.encoder:
            raise
        raise BadSetting(
            f"the MS encoder defaults to the cache's model, but {err}; pass --encoder MODEL "
            "--encoder-weights TAG"
        ) from None


def _accumulate(
    acc: MSAccumulator,
    config: MonosemanticityConfig,
    cache: Cache,
    layer: int,
    sae: SAE,
    encoder: ImageEncoder,
    chunks: list[ChunkRef],
) -> None:
    """Embed the chunks' images shard by shard; fold each shard in once its rows are embedded."""
    from tqdm import tqdm

    refs_of: dict[int, list[ChunkRef]] = defaultdict(list)
    for ref in chunks:
        refs_of[ref.shard_index].append(ref)
    paths = shard_paths(cache, Path(config.shards) if config.shards else None)
    committed = cache.committed
    todo = [(index, paths[committed[index].shard]) for index in refs_of]
    for _, path in todo:
        if not path.is_file():
            raise ImageSourceError(
                f"{path}: shard not found; pass --shards DIR where the cache's shards are now"
            )
    row_of = _rows_by_key(cache)
    tokens = cache.attrs.token_layout.token_set(sae.card.token_set)  # type: ignore[arg-type]
    dataset = ShardImages(todo, encoder.preprocess, config.batch_size, encoder.image_size)
    loader = shard_loader(dataset, config.num_workers, encoder.device.type == "cuda")
    # Rows still to embed per shard: its chunks are one run of rows (a prefix with --max-images),
    # so a shard is folded in at its last batch or as soon as that run is all embedded.
    missing = {index: sum(r.n_rows for r in refs) for index, refs in refs_of.items()}
    embedded: dict[int, tuple[list[int], list[Tensor]]] = {}
    bar = tqdm(total=sum(r.n_rows for r in chunks), unit="img", desc="monosemanticity")
    with bar as progress:  # closed before an error is printed: the error is the last line
        for batch in loader:
            if batch.shard_index not in missing:
                continue  # folded in already: the rest of the shard is past --max-images
            if batch.error is not None:
                raise ImageSourceError(batch.error)
            refs = refs_of[batch.shard_index]
            first, end = refs[0].first_row, refs[-1].first_row + refs[-1].n_rows
            rows, embeddings = embedded.setdefault(batch.shard_index, ([], []))
            new_rows = _batch_rows(batch, row_of[batch.shard.name])
            rows.extend(new_rows)
            missing[batch.shard_index] -= sum(first <= r < end for r in new_rows)
            if batch.n_images:
                embeddings.append(encoder.embed(batch.images_BCHW))
            if batch.last or missing[batch.shard_index] == 0:
                rows_N, emb_NE = torch.tensor(rows), torch.cat(embeddings or [_none(encoder)])
                for ref, acts_CTD in read_chunks(cache, layer, refs, config.read_threads):
                    with torch.no_grad():
                        codes = sae.encode(acts_CTD[:, tokens])
                    acts_CF = image_activations(codes.indices, codes.values, sae.n_latents)
                    acc.add(acts_CF, emb_NE[_positions(rows_N, ref, batch.shard)])
                    progress.update(ref.n_rows)
                del embedded[batch.shard_index], missing[batch.shard_index]
                if not missing:
                    break


def _rows_by_key(cache: Cache) -> dict[str, dict[str, int]]:
    """shard file name -> {webdataset key: cache row} of every committed row."""
    table = cache.rows_table().to_pydict()
    rows: dict[str, dict[str, int]] = defaultdict(dict)
    for row, shard, key in zip(table["row"], table["shard"], table["key"], strict=True):
        if row is not None:
            rows[shard][key] = row
    return rows


def _batch_rows(batch: ShardBatch, row_of: dict[str, int]) -> list[int]:
    """The cache row of each image of the batch (-1: a sample the cache skipped)."""
    return [row_of.get(r.key, -1) for r in batch.records if r.error is None]


def _positions(rows_N: Tensor, ref: ChunkRef, shard: Path) -> Tensor:
    """Where the chunk's rows are among the shard's embedded images."""
    wanted = torch.arange(ref.first_row, ref.first_row + ref.n_rows)
    order = rows_N.argsort()
    found = torch.searchsorted(rows_N[order], wanted).clamp(max=max(len(rows_N) - 1, 0))
    missing = wanted[rows_N[order][found] != wanted] if len(rows_N) else wanted
    if len(missing):
        raise ImageSourceError(
            f"{shard}: no image for cache row {int(missing[0])} (a sample that did not decode, "
            "or is not there); the shard is not the one the cache was made from: pass --shards "
            "DIR with the original"
        )
    return order[found]


def _none(encoder: ImageEncoder) -> Tensor:
    return torch.empty(0, encoder.embed_dim, device=encoder.device)
