"""CLIP-Scope's released checkpoints load and compute exactly their own formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitscope
from vitscope.saes.card import SAEFormatError


def clipscope_by_hand(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = topk((x − pre_b) · enc) with raw values, x̂ = z · dec + pre_b (clipscope/sae.py)."""
    state = torch.load(path, weights_only=True)["model_state_dict"]
    top = ((x - state["pre_b"]) @ state["enc"]).topk(32, dim=-1)
    latent = torch.zeros(len(x), state["dec"].shape[0]).scatter(-1, top.indices, top.values)
    return latent, latent @ state["dec"] + state["pre_b"]


def test_a_clipscope_checkpoint_computes_their_formula(clipscope_checkpoint: Path):
    sae = vitscope.load_sae(clipscope_checkpoint)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1)) * 2
    latent, recon = clipscope_by_hand(clipscope_checkpoint, x)
    codes = sae.encode(x)
    assert (codes.values < 0).any(dim=1).float().mean() > 0.1  # raw values: some are negative
    torch.testing.assert_close(codes.dense(), latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)
    card = sae.card
    assert (card.model, card.pretrained, card.layer) == ("ViT-L-14", "laion2b_s32b_b82k", 22)
    assert (card.source, sae.activation, card.tokens_trained) == ("clip-scope", "none", 1200013184)


def test_standardised_inputs_as_clipscope_trained(clipscope_checkpoint: Path):
    sae = vitscope.load_sae(clipscope_checkpoint, input_norm="standardize")
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 5 + 3
    mean, std = x.mean(dim=0), x.std(dim=0)
    standardised = (x - mean) / (std + 1e-6)
    latent, recon = clipscope_by_hand(clipscope_checkpoint, standardised)
    torch.testing.assert_close(sae.encode(x).dense(), latent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x), recon * (std + 1e-6) + mean, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs a batch of at least 2 vectors"):
        sae.encode(x[0])


class NotWeights:
    """Anything but tensors: `torch.load(weights_only=True)` must refuse to build it."""


def test_a_pickle_that_is_not_weights_is_refused(tmp_path: Path):
    path = tmp_path / "20_resid" / "1.pt"
    path.parent.mkdir()
    torch.save({"model_state_dict": {}, "payload": NotWeights()}, path)
    with pytest.raises(SAEFormatError) as err:
        vitscope.load_sae(path)
    message = str(err.value)
    assert message.startswith(f"{path}: expected a CLIP-Scope checkpoint (a torch dict), found")
    assert "\n" not in message


def test_a_torch_file_without_their_tensors_names_the_keys(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(SAEFormatError, match=r"found keys \['w'\]; pass a `\{layer\}_resid/"):
        vitscope.load_sae(path)
