"""Our SAEs exported to SAELens' layout load in the real sae-lens package and compute the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitscope
from conftest import run_vitscope
from vitscope.cache_spec import open_cache
from vitscope.pipeline.model import import_open_clip
from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.card import SAECard
from vitscope.saes.sae import dense_codes, losses
from vitscope.saes.saelens import export_saelens
from vitscope.support.errors import BadSetting


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


@pytest.mark.parametrize("batch_rank", ["relative", "floor"])
def test_a_relative_batch_rule_is_not_exported_as_a_jumprelu(batch_rank: str, tmp_path: Path):
    """θ · s, s each token's own, is no per-latent threshold: refused in one line naming the
    fix."""
    options = ARCHITECTURES["batchtopk"].Options(k=4, batch_rank=batch_rank)
    sae = build_sae(SAECard(16, 128, options), seed=1)
    with pytest.raises(BadSetting, match=f"batch_rank {batch_rank}.*train with --batch-rank raw"):
        export_saelens(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_batch_rules_train_and_export_as_sae_lens_computes_them(sae_lens, architecture, tmp_path):
    """In training, our codes and losses are those of SAELens' own BatchTopK (Matryoshka)
    training SAE on the same weights; exported, SAELens loads the JumpReLU SAE it saves for
    them and computes our inference codes and reconstructions."""
    from sae_lens.saes.sae import TrainStepInput

    widths = (8, 32, 128) if architecture == "matryoshka" else ()
    options = ARCHITECTURES[architecture].Options(
        k=4, **({"matryoshka_widths": widths} if widths else {})
    )
    ours = build_sae(SAECard(16, 128, options), seed=1)
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        ours.b_pre.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4)) * 2
    if architecture == "matryoshka":
        cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=16, d_sae=128, k=4, matryoshka_widths=list(widths)
        )
        theirs_training = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=16, d_sae=128, k=4)
        theirs_training = sae_lens.BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for name, tensor in {"W_enc": ours.w_enc.T, "W_dec": ours.w_dec}.items():
            getattr(theirs_training, name).copy_(tensor)
        theirs_training.b_enc.copy_(ours.b_enc)
        theirs_training.b_dec.copy_(ours.b_pre)
    step = TrainStepInput(x, {}, None, 0, False)
    theirs_out = theirs_training.training_forward_pass(step)
    out = ours.autoencode(x)
    terms = losses(ours, out, x, aux_coefficient=0.0)
    z_BF = dense_codes(out.z_N, out.rows, 128)
    torch.testing.assert_close(z_BF, theirs_out.feature_acts, rtol=1e-5, atol=1e-6)
    inner = sum(v for k, v in theirs_out.losses.items() if k.startswith("inner_mse_loss"))
    torch.testing.assert_close(terms["mse"], theirs_out.losses["mse_loss"])
    prefix_mse = terms.get("prefix_mse", torch.zeros(()))
    torch.testing.assert_close(prefix_mse, torch.as_tensor(inner, dtype=torch.float32))
    their_first = float(theirs_training.topk_threshold) / 0.01  # SAELens starts from 0
    assert float(ours.get_buffer("threshold")) == pytest.approx(their_first, rel=1e-5)

    ours.input_scale.fill_(0.25)
    ours.eval()
    theirs = sae_lens.SAE.load_from_disk(str(export_saelens(ours, tmp_path / "out")))
    assert type(theirs).__name__ == "JumpReLUSAE"
    assert theirs.cfg.metadata.training_architecture == ours.saelens_training_architecture
    acts = x * 4
    with torch.no_grad():
        codes = ours.encode(acts)
        torch.testing.assert_close(theirs.encode(acts), codes.dense(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(acts), ours(acts), rtol=1e-4, atol=1e-4)
    assert 0 < int((codes.values > 0).sum()) < 64 * 128
