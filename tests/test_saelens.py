"""Our SAEs exported to SAELens' layout load in the real sae-lens package and compute the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitscope
from conftest import run_vitscope
from vitscope.cache_spec import open_cache
from vitscope.pipeline.model import import_open_clip


@pytest.fixture(scope="module")
def sae_lens():
    import_open_clip()  # transformers imports torchvision: the same CPU-torch pairing fix
    import sae_lens

    return sae_lens


def test_an_exported_sae_gives_our_outputs_in_sae_lens(
    sae_lens, photo_sae: Path, reference_cache: Path, tmp_path: Path
):
    result = run_vitscope("to-saelens", str(photo_sae), str(tmp_path / "saelens"))
    assert result.returncode == 0, result.stderr
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    ours = vitscope.load_sae(photo_sae)
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == ours.k
    acts = open_cache(reference_cache).read_rows(5, range(6)).reshape(-1, ours.d_in)
    with torch.no_grad():
        codes = ours.encode(acts)
        torch.testing.assert_close(theirs.encode(acts), codes.dense(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(acts), ours(acts), rtol=1e-4, atol=1e-4)
        decoded = theirs.decode(codes.dense())
        torch.testing.assert_close(decoded, ours.decode(codes), rtol=1e-4, atol=1e-4)


def test_an_sae_that_keeps_raw_values_is_not_exported_as_a_different_function(
    tmp_path: Path, clipscope_checkpoint: Path
):
    result = run_vitscope("to-saelens", str(clipscope_checkpoint), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "SAELens' TopK SAE applies ReLU" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
