"""`vitscope analyze`: one streaming pass of an SAE over its cache, in the cache's row order.

chunks (stage two's reader, threads ahead) -> the SAE's sparse encoder -> FeatureAccumulator. The
accumulators are saved every `checkpoint_every` chunks (state.safetensors beside meta.json), so
`--resume` continues after the last saved chunk; the result files are written once, at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save

from vitscope.analysis.config import AnalyzeConfig, MonosemanticityConfig
from vitscope.analysis.files import (
    ANALYSIS_FOLDER,
    MORANS_COLUMN,
    STATE_FILE,
    AnalysisError,
    AnalysisMeta,
    read_meta,
    write_meta,
    write_results,
)
from vitscope.analysis.images import ImageSourceError, row_sources, shard_paths
from vitscope.analysis.stats import FeatureAccumulator
from vitscope.cache_spec.store import Cache, open_cache
from vitscope.saes.load import load_sae
from vitscope.saes.sae import SAE
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting
from vitscope.support.outputs import check_output_path
from vitscope.support.progress import status
from vitscope.support.records import absolute, write_atomically
from vitscope.train.loader import read_chunks


def analyze(config: AnalyzeConfig) -> Path:
    """Run (or resume) the pass; returns the analysis folder."""
    out = config.out_dir
    check_output_path(out, "--out", overwrite=config.overwrite, own=ANALYSIS_FOLDER)
    if config.overwrite and not config.resume and out.exists():
        shutil.rmtree(out)  # --overwrite: a fresh pass, nothing of the old one left to mix in
    sae = load_sae(config.run, device=resolve_device(config.device))
    layer = layer_of(config, sae)
    cache = open_cache(sae.card.cache_or(config.cache, config.run), layer=layer)
    if config.grids:
        check_shards_folder(cache, Path(config.shards) if config.shards else None)
    chunks = cache.chunks()
    if config.max_images:
        chunks = first_images(chunks, config.max_images)
    tokens = cache.attrs.token_layout.token_set(sae.card.token_set)  # type: ignore[arg-type]
    n_tokens = len(range(cache.attrs.n_tokens)[tokens])
    meta, accumulator = _start(config, out, cache, layer, sae, chunks, n_tokens)
    grid = meta.layout.grid if meta.layout else None
    status(f"encoding {sum(c.n_rows for c in chunks[meta.chunks_done :]):,} images into {out}")
    from tqdm import tqdm

    bar = tqdm(
        total=sum(c.n_rows for c in chunks), initial=meta.images_seen, unit="img", desc="analyze"
    )
    todo = chunks[meta.chunks_done :]
    with bar as progress:  # closed before an error is printed: the error is the last line
        for done, (ref, acts_CTD) in enumerate(
            read_chunks(cache, layer, todo, config.read_threads), 1
        ):
            with torch.no_grad():
                codes = sae.encode(acts_CTD[:, tokens])
            # A ReLU SAE's kept latent fires when positive; CLIP-Scope's raw values whenever kept.
            relu = sae.activation == "relu"
            fired = codes.values > 0 if relu else torch.ones_like(codes.values, dtype=torch.bool)
            rows = torch.arange(ref.first_row, ref.first_row + ref.n_rows)
            accumulator.add(codes.indices.cpu(), codes.values.cpu(), fired.cpu(), rows, grid)
            meta = dataclasses.replace(
                meta,
                chunks_done=meta.chunks_done + 1,
                images_seen=meta.images_seen + ref.n_rows,
                tokens_seen=meta.tokens_seen + ref.n_rows * n_tokens,
            )
            progress.update(ref.n_rows)
            if done % config.checkpoint_every == 0 and meta.chunks_done < len(chunks):
                _save_state(out, meta, accumulator)
    _finish(out, meta, accumulator, cache)
    return out


def layer_of(config: AnalyzeConfig | MonosemanticityConfig, sae: SAE) -> int:
    """The cached layer a pass reads: the SAE's own; --layer only for an SAE that does not
    record one, or to say the same (another layer's activations mean nothing to the SAE)."""
    layer = sae.card.layer
    if layer is None and config.layer < 0:
        raise BadSetting("the SAE does not record its layer", path=config.run, fix="pass --layer L")
    if layer is not None and config.layer not in (-1, layer):
        raise BadSetting(
            f"--layer {config.layer}, but the SAE was trained on layer {layer} (its cfg.json "
            "says); its features read nothing meaningful from another layer",
            path=config.run,
            fix=f"leave out --layer (or pass --layer {layer}), or analyse an SAE of layer "
            f"{config.layer}",
        )
    return config.layer if layer is None else layer


def check_shards_folder(cache: Cache, shards: Path | None) -> None:
    """Fail before the pass, not after it, when the grids' images cannot be read back."""
    for folder in sorted({path.parent for path in shard_paths(cache, shards).values()}):
        if not folder.is_dir():
            raise ImageSourceError(
                f"{folder}: the cache's shard folder is not there; pass --shards DIR where its "
                "shards are now"
            )


def first_images(chunks: list, max_images: int) -> list:
    """The first whole chunks holding at least `max_images` images (all if fewer)."""
    kept, images = [], 0
    for ref in chunks:
        if images >= max_images:
            break
        kept.append(ref)
        images += ref.n_rows
    return kept


def _start(
    config: AnalyzeConfig,
    out: Path,
    cache: Cache,
    layer: int,
    sae: SAE,
    chunks: list,
    n_tokens: int,
) -> tuple[AnalysisMeta, FeatureAccumulator]:
    """A fresh pass, or the saved state of an interrupted one (--resume)."""
    fresh = AnalysisMeta(
        sae=absolute(config.run),
        cache=absolute(str(cache.path)),
        layer=layer,
        token_set=sae.card.token_set,
        n_features=sae.n_latents,
        top_n=config.top_n,
        n_tokens=n_tokens,
        patch_grid=cache.attrs.token_layout.grid,
        chunks_total=len(chunks),
        chunks_done=0,
        images_seen=0,
        tokens_seen=0,
        complete=False,
        prefix_tokens=cache.attrs.token_layout.prefix,
    )
    accumulator = FeatureAccumulator.empty(sae.n_latents, config.top_n, n_tokens)
    if not config.resume:
        if (out / "meta.json").exists():
            raise AnalysisError(
                out,
                "a new analysis folder",
                "an analysis already there",
                "pass --resume to continue it, --overwrite to start again, or another --out",
            )
        return fresh, accumulator
    saved = read_meta(out)
    progress = {"chunks_done": 0, "images_seen": 0, "tokens_seen": 0, "complete": False}
    if dataclasses.replace(saved, **progress) != fresh:
        raise AnalysisError(
            out / "meta.json",
            "an analysis of this SAE, cache and settings",
            "another one",
            "use a new --out",
        )
    if saved.complete:
        return saved, accumulator
    if saved.chunks_done:
        for name, tensor in load_file(out / STATE_FILE).items():
            setattr(accumulator, name, tensor)
    status(f"resuming {out} after {saved.chunks_done} of {saved.chunks_total} chunks")
    return saved, accumulator


def _save_state(out: Path, meta: AnalysisMeta, accumulator: FeatureAccumulator) -> None:
    """State first, then meta.json naming how far it got: a kill between them only repeats work."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / STATE_FILE, save(accumulator.tensors()))
    write_meta(out, meta)


def _finish(out: Path, meta: AnalysisMeta, acc: FeatureAccumulator, cache: Cache) -> None:
    if meta.complete:
        return
    out.mkdir(parents=True, exist_ok=True)
    tokens = max(meta.tokens_seen, 1)
    images = max(meta.images_seen, 1)
    fire_tokens = acc.fire_tokens_F.numpy()
    features = pa.table(
        {
            "feature": np.arange(meta.n_features, dtype=np.int32),
            "fire_tokens": fire_tokens,
            "fire_images": acc.fire_images_F.numpy(),
            "freq_tokens": fire_tokens / tokens,
            "freq_images": acc.fire_images_F.numpy() / images,
            "mean_act": (acc.act_sum_F.numpy() / np.maximum(fire_tokens, 1)).astype(np.float32),
            "max_act": np.where(fire_tokens > 0, acc.act_max_F.numpy(), 0).astype(np.float32),
            MORANS_COLUMN: pa.array(
                (acc.morans_sum_F / acc.morans_images_F.clamp(min=1)).numpy(),
                mask=acc.morans_images_F.numpy() == 0,
            ),
            "morans_images": acc.morans_images_F.numpy(),
        }
    )
    filled = acc.top_rows_FN >= 0
    feature_idx, rank = filled.nonzero(as_tuple=True)
    rows = acc.top_rows_FN[filled].tolist()
    sources = row_sources(cache, rows)
    top_images = pa.table(
        {
            "feature": feature_idx.numpy().astype(np.int32),
            "rank": rank.numpy().astype(np.int16),
            "row": np.asarray(rows, dtype=np.int64),
            "value": acc.top_values_FN[filled].numpy(),
            "shard": [sources[r][0] for r in rows],
            "key": [sources[r][1] for r in rows],
            "caption": [sources[r][2] for r in rows],
        }
    )
    write_results(out, features, top_images, acc.top_heat_FNT.numpy())
    write_meta(out, dataclasses.replace(meta, complete=True))
    (out / STATE_FILE).unlink(missing_ok=True)
