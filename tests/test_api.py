"""`import vitscope`: load SAEs of every supported kind and use them in the activations' units."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitscope
from conftest import PHOTOS, TEST_LAYERS
from vitscope.cache_spec import open_cache
from vitscope.demo import photo_dir
from vitscope.pipeline.shards import read_samples
from vitscope.saes.card import SAEFormatError

DATA = Path(__file__).parent / "data"
README = Path(__file__).parents[1] / "README.md"


def by_hand(sae: vitscope.TopKSAE, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula of saes/sae.py written out densely: (top-k values, reconstruction)."""
    x = acts * sae.input_scale - sae.b_pre
    preacts = x @ sae.w_enc.T + sae.b_enc
    values, idx = preacts.topk(sae.k, dim=-1)
    if sae.activation == "relu":
        values = values.relu()
    z = torch.zeros_like(preacts).scatter(-1, idx, values)
    return values, (z @ sae.w_dec + sae.b_pre) / sae.input_scale


def test_a_run_from_before_the_sae_format_still_loads_and_gives_its_outputs():
    sae = vitscope.load_sae(DATA / "run-v0")
    expected = load_file(DATA / "run-v0-expected.safetensors")
    assert sae.card.format_version == "0" and sae.card.layer == 3 and sae.card.model is None
    codes = sae.encode(expected["acts"])
    torch.testing.assert_close(codes.indices, expected["idx"])
    torch.testing.assert_close(codes.values, expected["values"])
    torch.testing.assert_close(sae(expected["acts"]), expected["recon"])


@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("sae-v1.0-topk", "topk"),
        ("sae-v1.1-topk", "topk"),
        ("sae-v1.1-batchtopk", "batchtopk"),
        ("sae-v1.1-matryoshka", "matryoshka"),
        ("sae-v1.2-batchtopk", "batchtopk"),
        ("sae-v1.2-matryoshka", "matryoshka"),
        ("sae-v1.3-batchtopk", "batchtopk"),
        ("sae-v1.3-matryoshka", "matryoshka"),
    ],
)
def test_an_sae_folder_of_every_format_version_still_loads_and_gives_its_outputs(
    name: str, architecture: str
):
    """Golden folders written by the code of their format version (d_in 8, 32 latents, k 4).
    Codes are compared dense: which unused latents pad a batch rule's rows is not the format's."""
    sae = vitscope.load_sae(DATA / name)
    expected = load_file(DATA / f"{name}-expected.safetensors")
    assert sae.card.format_version == name.split("-")[1][1:]
    assert sae.card.architecture == architecture and sae.card.layer == 3
    codes = sae.encode(expected["acts"])
    expected_codes = vitscope.SparseCodes(expected["idx"], expected["values"], sae.n_latents)
    torch.testing.assert_close(codes.dense(), expected_codes.dense())
    torch.testing.assert_close(sae(expected["acts"]), expected["recon"])


def test_a_trained_sae_records_what_it_belongs_to(photo_sae: Path, reference_cache: Path):
    card = json.loads((photo_sae / "cfg.json").read_text())
    attrs = open_cache(reference_cache).attrs
    assert card["format_version"] == "1.4" and card["architecture"] == "topk"
    assert (card["model"], card["pretrained"]) == (attrs.model, attrs.pretrained)
    assert (card["layer"], card["hook"], card["token_set"]) == (5, "resid_post", "all")
    assert card["tokens_trained"] == 4096 and card["cache_spec_version"] == attrs.spec_version
    assert card["input_scale"] == pytest.approx(float(vitscope.load_sae(photo_sae).input_scale))


@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 5)], ids=["vector", "tokens", "images"])
def test_encode_decode_work_in_activation_units_for_any_leading_shape(
    photo_sae: Path, reference_cache: Path, lead
):
    sae = vitscope.load_sae(photo_sae)
    acts = open_cache(reference_cache).read_rows(5, [0, 1])
    acts = acts.reshape(-1, sae.d_in)[: max(1, torch.Size(lead).numel())].reshape(*lead, sae.d_in)
    values, recon = by_hand(sae, acts)
    codes = sae.encode(acts)
    assert codes.indices.shape == codes.values.shape == (*lead, sae.k)
    assert codes.values.grad_fn is None  # loaded for inference: no graph is built
    torch.testing.assert_close(codes.values.sort(dim=-1).values, values.sort(dim=-1).values)
    torch.testing.assert_close(sae.decode(codes), recon, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(acts), recon, rtol=1e-4, atol=1e-4)
    assert sae(acts).shape == acts.shape


def test_bfloat16_inputs_give_bfloat16_outputs_of_the_same_function(
    photo_sae: Path, reference_cache: Path
):
    sae = vitscope.load_sae(photo_sae)
    acts = open_cache(reference_cache).read_rows(5, [0, 1, 2]).bfloat16()
    recon = sae(acts)
    assert recon.dtype == sae.encode(acts).values.dtype == torch.bfloat16
    exact = sae(acts.float())
    assert ((recon.float() - exact).norm() / exact.norm()) < 2**-8


def test_wrong_width_is_one_line_naming_what_was_expected(photo_sae: Path):
    sae = vitscope.load_sae(photo_sae)
    with pytest.raises(ValueError) as err:
        sae.encode(torch.zeros(3, 50, sae.d_in + 1))
    message = str(err.value)
    assert f"shape (..., {sae.d_in})" in message and "(3, 50, 385)" in message
    assert "ViT-S-32 layer 5" in message and "\n" not in message


def test_activations_equal_the_cache_rows_of_the_same_images(shards: Path, reference_cache: Path):
    cache = open_cache(reference_cache)
    rows = [r for r in cache.rows_table().to_pylist() if r["row"] is not None][:5]
    images = [_shard_image(shards, r) for r in rows]
    extract = vitscope.ViTActivations(
        cache.attrs.model, cache.attrs.pretrained, TEST_LAYERS, device="cpu"
    )
    acts = extract(images, batch_size=2)
    from_pixels = extract(extract.preprocess(images))
    for layer in TEST_LAYERS:
        expected = cache.read_rows(layer, [r["row"] for r in rows])
        torch.testing.assert_close(acts[layer].float(), expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(from_pixels[layer], acts[layer])


def _shard_image(shards: Path, row: dict) -> Image.Image:
    """The image a cache row was made from, read back from its webdataset shard by key."""
    for sample in read_samples(shards / row["shard"]):
        if sample["__key__"].decode() == row["key"]:
            return Image.open(io.BytesIO(sample["jpg"]))
    raise KeyError(row["key"])


def test_features_per_image_and_per_patch(photo_sae: Path):
    sae = vitscope.load_sae(photo_sae)
    images = [Image.open(photo_dir() / name) for name in PHOTOS[:3]]
    feats = vitscope.features(images, sae)
    codes = feats.codes
    assert codes.indices.shape == (3, 50, sae.k)  # ViT-S-32: CLS + 7 x 7 patches
    assert (codes.values[..., :-1] >= codes.values[..., 1:]).all()
    top_idx, top_values = feats.image_top(3)
    for image in range(3):
        heat = feats.heatmap(int(top_idx[image, 0]))[image]
        assert float(heat.max()) == pytest.approx(float(top_values[image, 0]))
        assert float(top_values[image, 0]) == pytest.approx(float(codes.values[image].max()))


def test_an_sae_without_its_model_needs_activations_given():
    sae = vitscope.load_sae(DATA / "run-v0")
    with pytest.raises(ValueError, match="does not record its model, weights and layer; pass"):
        vitscope.features([Image.new("RGB", (32, 32))], sae)


def edit_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / "cfg.json").read_text())
    card.update(changes)
    (folder / "cfg.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("damage", "where", "expected"),
    [
        (lambda f: shutil.rmtree(f), "", "expected an SAE, found no such file or directory"),
        (lambda f: (f / "cfg.json").unlink(), "", "found no cfg.json; pass a folder written by"),
        (lambda f: edit_card(f, format_version="2.0"), "cfg.json", "expected SAE format 1.x"),
        (lambda f: edit_card(f, k="four"), "cfg.json", "field 'k' to be int, found 'four'"),
        (lambda f: (f / "cfg.json").write_text("{"), "cfg.json", "expected JSON, found"),
        (lambda f: (f / "sae.safetensors").unlink(), "sae.safetensors", "the SAE's weights"),
        (lambda f: edit_card(f, n_latents=65), "sae.safetensors", "do not belong to this"),
        (
            lambda f: (f / "sae.safetensors").write_bytes(b"garbage"),
            "sae.safetensors",
            "expected a safetensors file",
        ),
    ],
    ids=["missing", "no-card", "version", "field", "json", "no-weights", "shapes", "weights"],
)
def test_a_broken_sae_folder_is_one_line_naming_the_file(
    photo_sae: Path, tmp_path: Path, damage, where: str, expected: str
):
    folder = shutil.copytree(photo_sae, tmp_path / "sae")
    damage(folder)
    with pytest.raises(SAEFormatError) as err:
        vitscope.load_sae(folder)
    message = str(err.value)
    assert message.startswith(str(folder / where).rstrip("/") + ":"), message
    assert expected in message and "\n" not in message


def test_a_sweep_folder_names_the_saes_inside(photo_sae: Path, tmp_path: Path):
    shutil.copytree(photo_sae, tmp_path / "sweep" / "k4")
    shutil.copytree(photo_sae, tmp_path / "sweep" / "k8")
    with pytest.raises(SAEFormatError, match=r"but SAEs in k4, k8: load one of them"):
        vitscope.load_sae(tmp_path / "sweep")


def test_readme_python_example_runs(photo_sae: Path, tmp_path: Path, monkeypatch):
    """README's example, verbatim, in a folder where `make demo` would have left its SAE."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(block for block in blocks if "vitscope.load_sae" in block)
    shutil.copytree(photo_sae, tmp_path / "data" / "demo" / "sae-layer08")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert isinstance(namespace["sae"], vitscope.TopKSAE)


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs").mkdir()
    with pytest.raises(SAEFormatError) as err:
        vitscope.load_sae("runs/layer20")  # shaped like owner/name, but runs/ is a folder here
    assert str(err.value).startswith("runs/layer20: expected an SAE, found no such file")


def test_features_refuse_activations_of_another_layer(photo_sae: Path):
    sae = vitscope.load_sae(photo_sae)
    other = vitscope.ViTActivations(sae.card.model, sae.card.pretrained, [3], device="cpu")
    with pytest.raises(ValueError, match=r"reads layer 5, but the activations give layers \[3\]"):
        vitscope.features([Image.open(photo_dir() / PHOTOS[0])], sae, other)


def test_encode_in_row_blocks_equals_one_product(
    photo_sae: Path, reference_cache: Path, monkeypatch
):
    sae = vitscope.load_sae(photo_sae)
    acts = open_cache(reference_cache).read_rows(5, [0, 1, 2])  # 150 tokens
    whole = sae.encode(acts)
    monkeypatch.setattr("vitscope.saes.sae.ENCODE_ROWS", 7)  # 22 blocks, the last one short
    blocked = sae.encode(acts)
    assert torch.equal(blocked.indices, whole.indices)
    torch.testing.assert_close(blocked.values, whole.values)  # BLAS blocks sum in other orders
