"""The splice eval, the vision analogue of "loss recovered": how much of the model's output
survives when layer L's residual stream is replaced by the SAE's reconstruction.

Every image runs through the vision tower four times, all through `pipeline.model.
spliced_forward` (the block hook stage one caches through, so the SAE edits exactly what the cache
holds): clean; spliced, with the SAE's reconstruction; mean-ablated, with each token position's
mean over the eval images; zero-ablated. Each edited run is scored against the clean one by the
mean cosine of the final image embeddings (after ln_post and the projection) and, when the model
has a text tower, by how often its zero-shot top-1 label is the clean run's. The labels default
to ImageNet's 1000 class names (open_clip's IMAGENET_CLASSNAMES) in the single template
"a photo of a {}.": one text per label keeps the text pass cheap, and agreement between two runs
of one image tower does not need the accuracy that OpenAI's 80-template ensemble buys.

Tokens: the SAE replaces the tokens it was trained on (card.token_set: all = the prefix tokens
and patches, as CLIP-Scope's SAEs; cls or patches = only those, where the cache's token layout
puts them); the ablations replace the same tokens, and
the other tokens stay clean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from vitscope.analysis.config import SpliceConfig
from vitscope.analysis.images import read_images
from vitscope.cache_spec.store import Cache, open_cache
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.pipeline.model import (
    BlockHook,
    ClipModel,
    VisionTower,
    import_open_clip,
    load_clip,
    spliced_forward,
)
from vitscope.pipeline.shards import model_input
from vitscope.saes.card import SAECard
from vitscope.saes.load import load_sae
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.outputs import check_output_path, json_with
from vitscope.support.progress import status
from vitscope.support.records import write_json_atomically

TEMPLATE = "a photo of a {}."
"""The zero-shot prompt of every label."""

EDITS = ("sae", "mean_ablation", "zero_ablation")

MIN_LABELS = 2
"""Zero-shot agreement needs a choice: with one label every run agrees on every image."""


class Reconstructor(Protocol):
    """What the eval needs of an SAE (an `SAE`, or a stand-in): its card and `sae(acts)`."""

    card: SAECard

    def __call__(self, acts: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class SpliceScore:
    cosine: float
    """Mean cosine similarity of the final image embeddings with the clean run's."""
    agreement: float | None
    """Fraction of images whose zero-shot top-1 label is the clean run's (None: no text tower)."""


@dataclass(frozen=True)
class SpliceResult:
    model: str
    pretrained: str
    layer: int
    token_set: str
    n_images: int
    n_labels: int
    """Zero-shot labels (0 without a text tower)."""
    template: str
    sae: SpliceScore
    mean_ablation: SpliceScore
    zero_ablation: SpliceScore

    def recovered(self, ablation: str) -> float | None:
        """Loss recovered with 1 − cosine as the loss: 1 when the SAE's splice matches the clean
        run, 0 when it is no better than the ablation (None if the ablation changes nothing)."""
        ablated = getattr(self, ablation).cosine
        return None if ablated == 1 else (self.sae.cosine - ablated) / (1 - ablated)

    def to_json(self) -> dict:
        recovered = {ablation: self.recovered(ablation) for ablation in EDITS[1:]}
        return {**dataclasses.asdict(self), "cosine_recovered": recovered}

    def lines(self) -> list[str]:
        """A small table for the terminal."""
        labels = f"{self.n_labels} labels" if self.n_labels else "no text tower"
        lines = [
            f"splice of {self.model} ({self.pretrained}) layer {self.layer}, "
            f"{self.token_set} tokens, {self.n_images} images, {labels}",
            f"{'':15} {'cosine':>8} {'zero-shot agreement':>20}",
        ]
        for edit in EDITS:
            score: SpliceScore = getattr(self, edit)
            agreement = "-" if score.agreement is None else f"{score.agreement:.3f}"
            lines.append(f"{edit:15} {score.cosine:8.4f} {agreement:>20}")
        recovered = ", ".join(
            f"{'-' if r is None else f'{r:.1%}'} vs {ablation.replace('_', ' ')}"
            for ablation, r in ((a, self.recovered(a)) for a in EDITS[1:])
        )
        return [*lines, f"cosine recovered: {recovered}"]


def splice_eval(
    sae: Reconstructor,
    images: Sequence[Image.Image] | Tensor,
    model: ClipModel | VisionTower | None = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    layout: TokenLayout | None = None,
) -> SpliceResult:
    """Score the SAE's splice, mean ablation and zero ablation of its layer against the clean run.

    `images` are PIL images (preprocessed as stage one does) or a preprocessed (N, 3, H, W)
    tensor. `model` defaults to the CLIP model the SAE's card names, loaded on `device`; a bare
    `VisionTower` gives cosines only. `labels` default to ImageNet's class names. The mean of
    mean ablation is over these images, per token position. `layout` says which of the
    tower's tokens the SAE's token set names (its cache's: `cache.attrs.token_layout`); without
    it, CLS and a square grid.
    """
    card = sae.card
    if model is None:
        model = _card_clip(card, device)
    tower = model.tower if isinstance(model, ClipModel) else model
    if card.layer is None or not 0 <= card.layer < tower.n_blocks:
        raise BadSetting(f"the SAE's layer {card.layer} is not a block of {tower.model}")
    batches = _pixel_batches(images, tower, batch_size)
    layout = layout or TokenLayout.legacy(tower.n_tokens)
    tokens = layout.token_set(card.token_set)  # type: ignore[arg-type]
    n_images = sum(len(b) for b in batches)
    status(f"splicing {n_images} images at layer {card.layer}: clean, {', '.join(EDITS)}")

    sums_TD: list[Tensor] = []

    def keep_sum(acts_BTD: Tensor) -> None:
        sums_TD.append(acts_BTD.float().sum(dim=0))

    passes = (1 + len(EDITS)) * n_images
    progress = tqdm(total=passes, unit="img", desc="splice passes", dynamic_ncols=True)
    clean_NE = _embed(tower, batches, card.layer, keep_sum, progress)
    mean_TD = torch.stack(sums_TD).sum(dim=0) / len(clean_NE)
    replacements: dict[str, Callable[[Tensor], Tensor]] = {
        "sae": sae,
        "mean_ablation": lambda acts: mean_TD[tokens].expand_as(acts),
        "zero_ablation": torch.zeros_like,
    }
    embeddings = {
        edit: _embed(tower, batches, card.layer, _on_tokens(tokens, replace), progress)
        for edit, replace in replacements.items()
    }
    progress.close()
    texts_LE = None
    if isinstance(model, ClipModel):
        names = import_open_clip().IMAGENET_CLASSNAMES if labels is None else labels
        texts_LE = _text_embeddings(model, list(names), batch_size)
    scores = {edit: _score(emb_NE, clean_NE, texts_LE) for edit, emb_NE in embeddings.items()}
    return SpliceResult(
        model=tower.model,
        pretrained=tower.pretrained,
        layer=card.layer,
        token_set=card.token_set,
        n_images=len(clean_NE),
        n_labels=0 if texts_LE is None else len(texts_LE),
        template=TEMPLATE,
        **scores,
    )


def cache_images(cache: Cache, n_images: int, shards: Path | None = None) -> list[Image.Image]:
    """The images of the cache's first `n_images` committed rows, read back from their shards
    (`shards` overrides the folder the cache recorded)."""
    rows = np.sort(pc.drop_null(cache.rows_table()["row"]).to_numpy())[:n_images].tolist()
    images = read_images(cache, rows, shards)
    return [images[row] for row in rows]


SPLICE_RESULT = json_with("a splice result", "cosine_recovered")


def splice_run(config: SpliceConfig) -> tuple[SpliceResult, Path]:
    """`vitscope splice`: evaluate an SAE on images of a cache (by default the one it was trained
    on), write the result as JSON (default RUN/splice.json) and return it with the path."""
    path = config.out_path
    check_output_path(path, "--out", folder=False, overwrite=config.overwrite, own=SPLICE_RESULT)
    run, shards = config.run, config.shards
    names = _read_labels(Path(config.labels)) if config.labels else None
    sae = load_sae(run, device=resolve_device(config.device))
    cache = open_cache(sae.card.cache_or(config.cache, run))
    images = cache_images(cache, config.images, Path(shards) if shards else None)
    layout = cache.attrs.token_layout
    result = splice_eval(sae, images, labels=names, device=config.device, layout=layout)
    write_json_atomically(path, result.to_json())
    return result, path


def _card_clip(card: SAECard, device: str) -> ClipModel:
    if card.model is None or card.pretrained is None:
        raise BadSetting("the SAE's card does not name its model and weights; pass model=")
    status(f"loading {card.model} ({card.pretrained}) with its text tower")
    return load_clip(card.model, card.pretrained, resolve_device(device))


def _pixel_batches(
    images: Sequence[Image.Image] | Tensor, tower: VisionTower, batch_size: int
) -> list[Tensor]:
    if len(images) == 0:
        raise BadSetting("the splice eval needs at least one image")
    if isinstance(images, Tensor):
        return list(images.split(batch_size))
    return [
        torch.stack([model_input(image, tower.preprocess) for image in images[i : i + batch_size]])
        for i in range(0, len(images), batch_size)
    ]


def _on_tokens(tokens: slice, replace: Callable[[Tensor], Tensor]) -> BlockHook:
    """A hook that replaces only `tokens` of the residual stream by `replace` of them."""

    def hook(acts_BTD: Tensor) -> Tensor:
        spliced = acts_BTD.clone()
        spliced[:, tokens] = replace(acts_BTD[:, tokens]).to(acts_BTD.device, acts_BTD.dtype)
        return spliced

    return hook


def _embed(
    tower: VisionTower, batches: list[Tensor], layer: int, hook: BlockHook, progress: tqdm
) -> Tensor:
    """(N, E) float32 image embeddings with `hook` on block `layer`, counted on `progress`."""
    embeddings = []
    for batch in batches:
        embeddings.append(spliced_forward(tower, batch, layer, hook).float())
        progress.update(len(batch))
    return torch.cat(embeddings)


@torch.inference_mode()
def _text_embeddings(clip: ClipModel, labels: list[str], batch_size: int) -> Tensor:
    """(L, E) unit-norm float32 embeddings of the template filled with each label."""
    if len(labels) < MIN_LABELS:
        raise BadSetting(f"zero-shot agreement needs at least {MIN_LABELS} labels, not {labels}")
    ids = clip.tokenizer([TEMPLATE.format(label) for label in labels])
    parts = []
    with tqdm(total=len(labels), unit="label", desc="label texts", dynamic_ncols=True) as progress:
        for batch in ids.split(batch_size):
            parts.append(clip.encode_text(batch.to(clip.tower.device)).float())
            progress.update(len(batch))
    return F.normalize(torch.cat(parts), dim=-1)


def _score(emb_NE: Tensor, clean_NE: Tensor, texts_LE: Tensor | None) -> SpliceScore:
    cosine = F.cosine_similarity(emb_NE, clean_NE, dim=-1).mean().item()
    if texts_LE is None:
        return SpliceScore(cosine, None)
    same = (emb_NE @ texts_LE.T).argmax(dim=1) == (clean_NE @ texts_LE.T).argmax(dim=1)
    return SpliceScore(cosine, same.float().mean().item())


def _read_labels(path: Path) -> list[str]:
    """Label names, one a line; blank lines are skipped. Read before any work, and refused
    with fewer than two: one label is every image's top-1, agreement 1.000 whatever the edit."""
    if not path.is_file():
        raise MissingInput("expected a file of labels, one a line; found none", path=path)
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(labels) < MIN_LABELS:
        raise BadSetting(
            f"expected at least {MIN_LABELS} labels, one a line, found {len(labels)} (with one, "
            "every image gets it and agreement is 1.000 whatever the edit)",
            path=path,
            fix="list more labels in --labels, or leave it out for ImageNet's",
        )
    return labels
