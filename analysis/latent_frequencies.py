"""How often each latent of an SAE fires, for `vitscope consistency`'s split by frequency.

A latent's firing frequency (the share of tokens it fires on) comes from its run's analysis
(RUN/analysis/features.parquet) when it has a complete one: already paid for, over the whole
cache. Otherwise the SAEs without one encode the first `--images` images of one cache (log.jsonl
keeps no per-latent rates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitscope.analysis.analyze import first_images
from vitscope.analysis.config import ConsistencyConfig
from vitscope.analysis.files import FEATURES_FILE, META_FILE, load_analysis, read_meta
from vitscope.cache_spec.store import open_cache
from vitscope.saes.sae import SAE
from vitscope.support.errors import BadSetting
from vitscope.support.progress import status
from vitscope.train.loader import read_chunks


@dataclass(frozen=True)
class FrequencyBin:
    """The latents of one run whose firing frequency lies in [low, high) (0, 0: never fired)."""

    run: str
    """A or B."""
    low: float
    high: float
    features: int
    share_above: float
    """Share of them matched above the threshold (consistency.json's)."""

    @property
    def label(self) -> str:
        return "never fired" if self.high == 0 else f"{self.low:.0e} to {self.high:.0e}"


def firing_frequencies(
    config: ConsistencyConfig, saes: list[SAE]
) -> list[tuple[np.ndarray | None, str]]:
    """Each SAE's per-latent share of tokens fired on (None with --images 0 and no analysis),
    and where it came from."""
    found: list[tuple[np.ndarray | None, str]] = []
    for run in (config.run_a, config.run_b):
        analysis = Path(run) / "analysis"
        if (analysis / META_FILE).is_file() and read_meta(analysis).complete:
            features = load_analysis(analysis).features
            found.append((features["freq_tokens"].to_numpy(), str(analysis / FEATURES_FILE)))
        else:
            found.append((None, "not measured (--images 0)"))
    todo = [i for i, (freq, _) in enumerate(found) if freq is None]
    if todo and config.images:
        cache = saes[0].card.cache_or(config.cache, config.run_a)
        sampled = sampled_frequencies([saes[i] for i in todo], cache, config)
        for i, freq in zip(todo, sampled, strict=True):
            found[i] = (freq, f"the first {config.images:,} images of {cache}")
    return found


def sampled_frequencies(
    saes: list[SAE], cache_ref: str, config: ConsistencyConfig
) -> list[np.ndarray]:
    """Per SAE, the share of tokens each latent fires on over the cache's first whole chunks
    holding `config.images` images (each SAE on its own token set)."""
    layer = saes[0].card.layer
    if layer is None:
        raise BadSetting(
            "the SAE does not record its layer, so no cache layer to measure frequencies on",
            path=config.run_a,
            fix="pass --images 0",
        )
    cache = open_cache(cache_ref, layer=layer)
    chunks = first_images(cache.chunks(), config.images)
    layout = cache.attrs.token_layout
    fired = [torch.zeros(sae.n_latents, dtype=torch.long) for sae in saes]
    tokens = [0] * len(saes)
    status(f"encoding {sum(c.n_rows for c in chunks):,} images of {cache_ref} for frequencies")
    for _, acts_CTD in read_chunks(cache, layer, chunks):
        for i, sae in enumerate(saes):
            acts = acts_CTD[:, layout.token_set(sae.card.token_set)]  # type: ignore[arg-type]
            with torch.no_grad():
                codes = sae.encode(acts.to(sae.w_dec.device))
            # A ReLU SAE's kept latent fires when positive; CLIP-Scope's raw values whenever kept.
            relu = sae.activation == "relu"
            kept = codes.values > 0 if relu else torch.ones_like(codes.values, dtype=torch.bool)
            fired[i] += torch.bincount(codes.indices[kept].cpu(), minlength=sae.n_latents)
            tokens[i] += acts.shape[0] * acts.shape[1]
    return [(f / max(t, 1)).numpy() for f, t in zip(fired, tokens, strict=True)]


def frequency_bins(run: str, freq_F: np.ndarray, matched_F: np.ndarray) -> list[FrequencyBin]:
    """One bin for the latents that never fired, then one per decade of frequency up to 1; each
    with the share of its latents that `matched_F` marks."""
    never = freq_F <= 0
    bins = []
    if never.any():
        bins.append(FrequencyBin(run, 0.0, 0.0, int(never.sum()), float(matched_F[never].mean())))
    if (~never).any():
        lowest = math.floor(math.log10(freq_F[~never].min()))
        for exponent in range(min(lowest, -1), 0):
            low, high = 10.0**exponent, 10.0 ** (exponent + 1)
            inside = (freq_F >= low) & ((freq_F < high) | (exponent == -1))  # the last takes 1
            if inside.any():
                share = float(matched_F[inside].mean())
                bins.append(FrequencyBin(run, low, high, int(inside.sum()), share))
    return bins
