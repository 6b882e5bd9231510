"""The splice eval on the seeded ViT-S-32: an exact SAE is the clean run, a zero SAE is zero
ablation, the trained photo SAE lands in range, and `vitscope splice` runs end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

from conftest import TEST_MODEL, run_vitscope
from vitscope.analysis.splice import cache_images, splice_eval
from vitscope.cache_spec.store import open_cache
from vitscope.pipeline.model import ClipModel, load_clip, residual_stream, spliced_forward
from vitscope.saes.card import SAECard
from vitscope.saes.load import load_sae
from vitscope.support.errors import BadSetting

LABELS = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "ray")


@dataclass
class StandIn:
    """An SAE-shaped callable: a card and a fixed function of the activations."""

    card: SAECard
    reconstruct: Callable[[Tensor], Tensor]

    def __call__(self, acts: Tensor) -> Tensor:
        return self.reconstruct(acts)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip(TEST_MODEL, "none", "cpu", "float32", seed=0)


@pytest.fixture(scope="module")
def photos(reference_cache: Path, shards: Path) -> list[Image.Image]:
    return cache_images(open_cache(reference_cache), 8, shards)


@pytest.fixture(scope="module")
def card(photo_sae: Path) -> SAECard:
    return load_sae(photo_sae).card


def test_splicing_nothing_is_the_plain_forward_pass(clip: ClipModel, tower):
    images = torch.randn(2, 3, 224, 224)
    kept = spliced_forward(clip.tower, images, 5, lambda acts: None)
    assert torch.equal(kept, tower.visual(images))
    seen: list[Tensor] = []
    spliced_forward(clip.tower, images, 5, lambda acts: seen.append(acts.clone()))
    assert torch.equal(seen[0], residual_stream(tower, images, [5])[5])


def test_an_exact_sae_recovers_the_clean_run(clip: ClipModel, photos, card: SAECard):
    result = splice_eval(StandIn(card, lambda acts: acts), photos, clip, LABELS)
    assert result.sae.cosine == pytest.approx(1, abs=1e-5)
    assert result.sae.agreement == 1
    assert result.recovered("mean_ablation") == pytest.approx(1, abs=1e-4)
    assert (result.n_images, result.n_labels, result.layer) == (8, len(LABELS), 5)


def test_a_zero_sae_is_zero_ablation(clip: ClipModel, photos, photo_sae: Path):
    """The trained photo SAE with its decoder and pre-bias zeroed: a real SAE whose every
    reconstruction is 0, through its own encode, decode and input scale."""
    sae = load_sae(photo_sae)
    with torch.no_grad():
        sae.w_dec.zero_()
        sae.b_pre.zero_()
    result = splice_eval(sae, photos, clip, LABELS)
    assert result.sae == result.zero_ablation
    assert result.sae.cosine < 0.999
    assert result.sae.agreement < 1  # the 8th photo's clean label is lost (seeded weights)


def test_a_cls_sae_splices_only_the_cls_token(clip: ClipModel, photos, card: SAECard):
    shapes: list[tuple[int, ...]] = []

    def zero(acts: Tensor) -> Tensor:
        shapes.append(tuple(acts.shape))
        return torch.zeros_like(acts)

    cls_card = dataclasses.replace(card, token_set="cls")
    result = splice_eval(StandIn(cls_card, zero), photos, clip.tower, batch_size=5)
    assert shapes == [(5, 1, card.d_in), (3, 1, card.d_in)]
    assert result.sae == result.zero_ablation
    assert result.sae.agreement is None and result.n_labels == 0


def test_the_photo_sae_lands_between_the_ablations_and_clean(clip: ClipModel, photos, photo_sae):
    result = splice_eval(load_sae(photo_sae), photos, clip, LABELS)
    for score in (result.sae, result.mean_ablation, result.zero_ablation):
        assert math.isfinite(score.cosine) and -1 <= score.cosine <= 1
        assert 0 <= score.agreement <= 1
    assert result.zero_ablation.cosine < result.sae.cosine < 1


def test_the_slow_passes_show_their_progress(clip: ClipModel, photos, card: SAECard, capsys):
    """Four passes of the images and one of the labels' texts, each a bar with its rate and ETA
    (ImageNet's 1000 labels on a CPU took minutes without a word)."""
    splice_eval(StandIn(card, lambda acts: acts), photos, clip, LABELS, batch_size=3)
    bars = capsys.readouterr().err
    assert re.search(r"splice passes: 100%.* 32/32 \[[0-9:]+<[0-9:]+, +[0-9.]+img/s\]", bars)
    assert re.search(r"label texts: 100%.* 6/6 \[[0-9:]+<[0-9:]+, +[0-9.]+label/s\]", bars)


def test_the_command_writes_splice_json(photo_sae: Path, shards: Path, tmp_path: Path):
    run = Path(shutil.copytree(photo_sae, tmp_path / "run"))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    args = ["splice", str(run), "--shards", str(shards), "--labels", str(labels), "--images", "4"]
    done = run_vitscope(*args, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    written = json.loads((run / "splice.json").read_text())
    assert (written["n_images"], written["n_labels"], written["layer"]) == (4, len(LABELS), 5)
    assert set(written["cosine_recovered"]) == {"mean_ablation", "zero_ablation"}
    assert "zero_ablation" in done.stdout and "cosine recovered" in done.stdout


def test_a_missing_shard_folder_is_one_line(photo_sae: Path, tmp_path: Path):
    missing = tmp_path / "moved"
    done = run_vitscope("splice", str(photo_sae), "--shards", str(missing), "--device", "cpu")
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(missing) in line


def test_fewer_than_two_labels_are_refused_before_any_work(
    photo_sae: Path, clip: ClipModel, photos, tmp_path: Path
):
    """One label is every image's top-1: agreement 1.000 for every edit, a silent non-result."""
    labels = tmp_path / "labels.txt"
    labels.write_text("tench\n\n")
    run = Path(shutil.copytree(photo_sae, tmp_path / "run"))
    done = run_vitscope("splice", str(run), "--labels", str(labels), "--device", "cpu")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {labels}: expected at least 2 labels, one a line, found 1 (with one, every image "
        "gets it and agreement is 1.000 whatever the edit); list more labels in --labels, or leave "
        "it out for ImageNet's"
    ]
    assert not (run / "splice.json").exists()
    with pytest.raises(BadSetting, match="needs at least 2 labels"):
        splice_eval(load_sae(photo_sae), photos[:2], clip, ["tench"])
