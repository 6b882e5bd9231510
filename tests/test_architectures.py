"""BatchTopK and Matryoshka SAEs: their sparse paths equal the dense computation (values and
every gradient), inference codes of one image ignore its neighbours, the threshold is the running
mean it is documented to be, and a trained SAE of each goes through folder, load_sae, analysis,
sort eval's encoder and the browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vitscope
from conftest import train_photo_sae
from vitscope.analysis.analyze import analyze
from vitscope.analysis.browser import write_browser
from vitscope.analysis.config import AnalyzeConfig
from vitscope.analysis.files import load_analysis
from vitscope.analysis.sorteval import feature_peaks
from vitscope.cache_spec import open_cache
from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.architectures.batchtopk import (
    TokenScale,
    batch_topk_rule,
    floor_batch_rule,
    threshold_rule,
)
from vitscope.saes.architectures.topk import TopKSAE
from vitscope.saes.card import SAECard, SAEFormatError
from vitscope.saes.folder import load_sae_folder, save_sae_folder
from vitscope.saes.kernels import Rows, dense_preacts, kept_preacts, padded
from vitscope.saes.sae import SAE, dense_codes, losses
from vitscope.support.configs import load_config
from vitscope.train.config import TrainConfig, sweep_configs

WIDTHS = (16, 64, 500)
DATA = Path(__file__).parent / "data"


def problem(n_tokens: int = 96, d: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=generator) * 2 + 0.5
    return x, generator


def new_sae(architecture: str, n_latents: int = 500, batch_rank: str = "raw") -> SAE:
    extra = {"matryoshka_widths": WIDTHS} if architecture == "matryoshka" else {}
    if architecture != "topk":
        extra["batch_rank"] = batch_rank
    options = ARCHITECTURES[architecture].Options(k=6, **extra)
    sae = build_sae(SAECard(32, n_latents, options), seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        sae.b_pre.fill_(0.3)
    return sae


def reference_kept(dense_BF: torch.Tensor, rule: str, scale_B: torch.Tensor) -> torch.Tensor:
    """Each rule by its definition on the keys pre / s: the batch's 8 · B largest positive ones,
    or those > 1.5 / 8."""
    keys_BF = dense_BF / scale_B[:, None]
    if rule == "threshold":
        return keys_BF > 1.5 / 8
    kept = torch.zeros(dense_BF.numel(), dtype=torch.bool)
    kept[keys_BF.flatten().topk(8 * len(dense_BF)).indices] = True
    return kept.view(dense_BF.shape) & (dense_BF > 0)


@pytest.mark.parametrize("rank", ["raw", "relative"])
@pytest.mark.parametrize("rule", ["batch", "threshold"])
@pytest.mark.parametrize("n_latents", [300, 5000])
def test_kept_preacts_apply_the_rule_to_every_latent(rank: str, rule: str, n_latents: int):
    """Flat and padded, float32 and bfloat16 selection, raw keys or relative to each token's
    scale (tokens of norms 1/8 .. 8 times another's); 5,000 latents make the batch rule's
    sampled guess stride over the product."""
    x, generator = problem()
    w = torch.randn(n_latents, 32, generator=generator) / 32**0.5
    b = torch.randn(n_latents, generator=generator) * 0.1
    dense_BF = dense_preacts(x, w, b)
    scale_B = torch.ones(len(x))
    if rank == "relative":
        scale_B = 2.0 ** torch.randint(-3, 4, (len(x),), generator=generator).float()
    given = None if rank == "raw" else scale_B
    keep = batch_topk_rule(8, given) if rule == "batch" else threshold_rule(1.5 / 8, given)
    expected = dense_BF.clamp_min(0) * reference_kept(dense_BF, rule, scale_B)
    preacts_N, rows = kept_preacts(x, w, b, keep, "float32")
    assert len(rows.idx) == int((expected > 0).sum())
    torch.testing.assert_close(dense_codes(preacts_N.clamp_min(0), rows, n_latents), expected)
    values, idx = padded(preacts_N, rows)
    assert bool((idx.diff(dim=1) > 0).all())
    assert idx.shape[1] == int((expected > 0).sum(dim=1).max()) > 8
    torch.testing.assert_close(
        dense_codes(values.flatten(), Rows.uniform(idx), n_latents), expected
    )
    if rule == "batch":
        assert int((expected > 0).sum()) == 8 * len(x)
    preacts_N, rows = kept_preacts(x, w, b, keep, "bfloat16")
    torch.testing.assert_close(preacts_N, dense_BF[rows.token_of_entry(), rows.idx])


@pytest.mark.parametrize("shift", [0.0, 2.5])
def test_the_floor_rule_from_each_tokens_candidates_is_the_batch_rule_on_the_whole_product(
    shift: float,
):
    """Ranking only each token's 2k largest pre-activations keeps what ranking all of them on
    the same keys keeps, also when fewer than B·k are positive (shift 2.5)."""
    product = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)) - shift
    scale = TokenScale("floor", 6, torch.zeros(64, 8))
    kept = floor_batch_rule(6, scale)(product)
    floor = product.topk(12, dim=1).values[:, -1].clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(scale.scale_B, floor)
    assert torch.equal(kept, batch_topk_rule(6, floor)(product))
    assert (len(kept) == 6 * 64) == (shift == 0.0)


@pytest.mark.parametrize("batch_rank", ["raw", "relative", "floor"])
@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sparse_paths_have_the_dense_loss_and_gradients(
    architecture: str, mode: str, batch_rank: str
):
    x, _ = problem()
    results = {}
    for dense in (True, False):
        sae = new_sae(architecture, batch_rank=batch_rank)
        sae.train(mode == "train")
        sae.get_buffer("threshold").fill_(0.8)
        dead = torch.zeros(500, dtype=torch.bool)
        dead[::3] = True
        out = sae.autoencode(x, dead_F=dead, k_aux=16, dense=dense)
        terms = losses(sae, out, x)
        terms["loss"].backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        results[dense] = (out, terms, grads, sae.get_buffer("threshold").clone())
    (d_out, d_terms, d_grads, d_threshold), (s_out, s_terms, s_grads, s_threshold) = (
        results[True],
        results[False],
    )
    torch.testing.assert_close(
        dense_codes(s_out.z_N, s_out.rows, 500), dense_codes(d_out.z_N, d_out.rows, 500)
    )
    if mode == "train":
        assert len(s_out.rows.idx) == 6 * len(x)  # B·k in all, flat: not padded to the most
        assert s_out.l0_B().max() > 6 > s_out.l0_B().min()
    torch.testing.assert_close(s_out.recon_BD, d_out.recon_BD, rtol=1e-5, atol=1e-5)
    assert len(s_out.prefix_recons) == (2 if architecture == "matryoshka" else 0)
    for got, expected in zip(s_out.prefix_recons, d_out.prefix_recons, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert s_terms.keys() == d_terms.keys()
    assert ("prefix_mse" in s_terms) == (architecture == "matryoshka")
    for name in s_terms:
        torch.testing.assert_close(s_terms[name], d_terms[name], rtol=1e-5, atol=1e-6)
    assert s_terms.get("prefix_mse", 1) > 0
    for name, grad in d_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(s_grads[name], grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(s_threshold, d_threshold)


def token_scale(sae: SAE, x_centered: torch.Tensor) -> torch.Tensor:
    """s of each token by the definition: 1 for raw ranking, the centred norm for relative, the
    token's (2k)-th largest pre-activation for floor."""
    if sae.card.options.batch_rank == "raw":
        return torch.ones(len(x_centered))
    if sae.card.options.batch_rank == "relative":
        return x_centered.norm(dim=1)
    preacts = dense_preacts(x_centered, sae.w_enc.detach(), sae.b_enc.detach())
    return preacts.sort(dim=1, descending=True).values[:, 2 * sae.k - 1]


@pytest.mark.parametrize("batch_rank", ["raw", "relative", "floor"])
def test_threshold_is_the_running_mean_of_the_smallest_kept_key(batch_rank: str):
    sae = new_sae("batchtopk", batch_rank=batch_rank)
    smallest = []
    for seed in range(3):
        x = problem(seed=seed)[0]
        out = sae.autoencode(x)
        keys = (
            out.z_N.detach() / token_scale(sae, x - sae.b_pre.detach())[out.rows.token_of_entry()]
        )
        smallest.append(float(keys[out.z_N > 0].min()))
    expected = smallest[0]
    for value in smallest[1:]:
        expected += sae.card.options.threshold_rate * (value - expected)
    assert float(sae.get_buffer("threshold")) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch_rank", ["raw", "relative", "floor"])
@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_inference_codes_of_a_vector_do_not_depend_on_its_neighbours(
    architecture: str, batch_rank: str, monkeypatch: pytest.MonkeyPatch
):
    sae = new_sae(architecture, batch_rank=batch_rank)
    sae.autoencode(problem()[0])  # a training step's batch sets the threshold
    sae.eval()
    acts = problem(seed=5)[0] / float(sae.input_scale)
    together = sae.encode(acts).dense()
    alone = torch.cat([sae.encode(row[None]).dense() for row in acts])
    torch.testing.assert_close(together, alone)
    monkeypatch.setattr("vitscope.saes.sae.ENCODE_ROWS", 7)  # blocks keeping different widths
    torch.testing.assert_close(sae.encode(acts).dense(), together)
    threshold = float(sae.get_buffer("threshold"))
    centred = acts - sae.b_pre
    preacts = dense_preacts(centred, sae.w_enc, sae.b_enc)
    keys = preacts / token_scale(sae, centred)[:, None]
    torch.testing.assert_close(together, preacts * (keys > threshold))
    torch.testing.assert_close(sae(acts), sae.decode(sae.encode(acts)))


def test_config_names_the_architecture_and_sweeps_it(tmp_path: Path):
    cfg = load_config(TrainConfig, None, cache="c", architecture="matryoshka", n_latents=1024)
    assert cfg.matryoshka_widths == (64, 256, 1024)
    with pytest.raises(ValueError, match="pass --activation relu"):
        load_config(TrainConfig, None, cache="c", preset="clip-scope", architecture="batchtopk")
    with pytest.raises(ValueError, match="matryoshka_prefixes must ascend"):
        load_config(
            TrainConfig, None, cache="c", architecture="matryoshka", matryoshka_prefixes="0.5,0.25"
        )
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        'cache = "c"\nout = "s"\n[[sae]]\narchitecture = "topk"\n'
        '[[sae]]\narchitecture = "batchtopk"\n[[sae]]\narchitecture = "matryoshka"\n'
    )
    members = sweep_configs(sweep_file)
    assert [m.architecture for m in members] == ["topk", "batchtopk", "matryoshka"]
    assert members[2].run_dir.name == "architecturematryoshka"


@pytest.fixture(scope="module", params=["batchtopk", "matryoshka"])
def trained(request, tmp_path_factory: pytest.TempPathFactory, reference_cache: Path) -> Path:
    """The photo SAE of the architecture, trained by the real trainer on the photo cache."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    return train_photo_sae(reference_cache, out, architecture=request.param)


def test_a_trained_sae_goes_through_every_consumer(
    trained: Path, reference_cache: Path, tmp_path: Path
):
    card = json.loads((trained / "cfg.json").read_text())
    sae = vitscope.load_sae(trained)
    assert sae.card.architecture == card["architecture"] == trained.parent.name[:-1]
    assert card.get("matryoshka_widths") == (
        [4, 16, 64] if card["architecture"] == "matryoshka" else None
    )
    assert card["threshold_rate"] == 0.2 and "activation" not in card
    assert float(sae.get_buffer("threshold")) > 0
    acts = open_cache(reference_cache).read_rows(5, range(4))
    codes = sae.encode(acts)
    assert 0 < float((codes.values > 0).sum(dim=-1).float().mean()) < 64
    analysis = analyze(
        AnalyzeConfig(
            run=str(trained), cache=str(reference_cache), out=str(tmp_path / "a"), device="cpu"
        )
    )
    loaded = load_analysis(analysis)
    assert loaded.features["fire_images"].to_numpy().sum() > 0
    peaks, _ = feature_peaks(sae, open_cache(reference_cache), 5, torch.arange(64).numpy(), "all")
    best = loaded.features["max_act"].to_numpy()
    fired = best > 0
    torch.testing.assert_close(torch.tensor(peaks.max(axis=0))[fired], torch.tensor(best)[fired])
    assert write_browser(loaded, tmp_path / "site").is_file()


def test_a_bad_matryoshka_card_is_one_line_naming_the_file(tmp_path: Path):
    folder = shutil.copytree(DATA / "sae-v1.1-matryoshka", tmp_path / "sae")
    card = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**card, "matryoshka_widths": [8, 4]}))
    with pytest.raises(SAEFormatError, match=r"cfg\.json.*matryoshka_widths") as err:
        vitscope.load_sae(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_build_sae_rebuilds_every_architecture_from_its_card_alone(architecture: str, tmp_path):
    sae = new_sae(architecture)
    save_sae_folder(tmp_path, sae, sae.card)
    loaded = load_sae_folder(tmp_path)
    assert type(loaded) is type(sae) and loaded.card == sae.card and loaded.card.training is None
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, equal_nan=True)


def test_the_registry_refuses_a_name_twice_and_names_the_choices(tmp_path: Path):
    with pytest.raises(ValueError, match="architecture 'topk' is already registered"):
        ARCHITECTURES.register("topk", TopKSAE)
    known = "known: topk, batchtopk, matryoshka"
    with pytest.raises(ValueError, match=f"unknown architecture 'jumprelu'; {known}"):
        TrainConfig(cache="c", architecture="jumprelu")  # type: ignore[arg-type]
    shutil.copytree(DATA / "sae-v1.1-topk", tmp_path / "sae")
    card = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**card, "architecture": "jumprelu"}))
    expected = (
        r"cfg\.json: expected an architecture of topk, batchtopk, matryoshka, found 'jumprelu'"
    )
    with pytest.raises(SAEFormatError, match=expected) as err:
        vitscope.load_sae(tmp_path / "sae")
    assert "\n" not in str(err.value)


def test_matryoshka_prefix_weight_scales_the_inner_losses_only():
    x, _ = problem()
    terms = {}
    for weight in (1.0, 0.25):
        options = ARCHITECTURES["matryoshka"].Options(
            k=6, matryoshka_widths=WIDTHS, prefix_weight=weight
        )
        sae = build_sae(SAECard(32, 500, options), seed=3)
        out = sae.autoencode(x)
        inner = sum((recon - x).pow(2).sum(dim=1).mean() for recon in out.prefix_recons)
        terms[weight] = losses(sae, out, x, aux_coefficient=0.0)
        torch.testing.assert_close(terms[weight]["prefix_mse"], weight * inner)
    torch.testing.assert_close(terms[0.25]["mse"], terms[1.0]["mse"])
    assert float(terms[0.25]["loss"].detach()) < float(terms[1.0]["loss"].detach())
