"""Every ViT family against its own library: the token layout each adapter states is the one the
library's forward produces, and stage one's activations (a real cache, `ViTActivations`) equal a
direct forward with the library's own preprocessing and its own intermediate-layer API.
Random seeded weights throughout: no weights can be fetched here."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PHOTOS, TEST_MODEL, cache_config
from vitscope.analysis.splice import cache_images, splice_eval
from vitscope.cache_spec import CacheAttrs, create_or_open, open_cache
from vitscope.cache_spec.errors import CacheSpecError
from vitscope.cache_spec.tokens import TokenLayout
from vitscope.demo import photo_dir
from vitscope.pipeline.activations import ViTActivations
from vitscope.pipeline.backbones.parts import import_open_clip, import_timm
from vitscope.pipeline.model import load_clip, load_image_encoder, load_vision_tower
from vitscope.pipeline.run import cache
from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.card import SAECard
from vitscope.support.errors import BadSetting

DINO_REG = "timm:vit_small_patch14_reg4_dinov2@224"
"""timm's DINOv2 with 4 registers, built for 224-pixel inputs (its default is 518)."""
REGISTERS = ("cls", "reg0", "reg1", "reg2", "reg3")
LAYER = 3


def photos(n: int) -> list[Image.Image]:
    return [Image.open(photo_dir() / name).convert("RGB") for name in PHOTOS[:n]]


def in_order(patches_BDHW: torch.Tensor, prefix_BPD: torch.Tensor, layout) -> torch.Tensor:
    """A library's own split of block LAYER's output (prefix tokens, patch grid), which must be
    the layout's, put back in the layout's order: prefix, then the patches row by row."""
    assert prefix_BPD.shape[1] == layout.n_prefix
    assert tuple(patches_BDHW.shape[2:]) == layout.grid
    return torch.cat([prefix_BPD, patches_BDHW.flatten(2).transpose(1, 2)], dim=1)


def timm_tokens(trunk: torch.nn.Module, pixels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Block LAYER's output through timm's own `forward_intermediates`."""
    with torch.no_grad():
        (out,) = trunk.forward_intermediates(
            pixels, indices=[LAYER], return_prefix_tokens=True, intermediates_only=True
        )
    if not isinstance(out, tuple):  # timm returns the patches alone when there is no prefix
        out = (out, out.new_zeros(len(out), 0, out.shape[1]))
    return in_order(*out, layout)


def open_clip_direct(model: str, images: list[Image.Image], layout: TokenLayout) -> torch.Tensor:
    """A freshly built open_clip model, its own transform, block LAYER read by its library."""
    open_clip = import_open_clip()
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=None)
    visual = clip.visual.eval()
    pixels = torch.stack([preprocess(image) for image in images])
    if hasattr(visual, "trunk"):
        return timm_tokens(visual.trunk, pixels, layout)
    with torch.no_grad():
        out = visual.forward_intermediates(
            pixels, indices=[LAYER], intermediates_only=True, output_extra_tokens=True
        )
    (patches_BDHW,), (prefix_BPD,) = out["image_intermediates"], out["image_intermediates_prefix"]
    return in_order(patches_BDHW, prefix_BPD, layout)


def timm_direct(name: str, size: int | None, images: list[Image.Image], layout) -> torch.Tensor:
    """A freshly built timm model, timm's data config for it at `size`, its own intermediates."""
    timm = import_timm()
    torch.manual_seed(0)
    kwargs = {"img_size": size} if size else {}
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    args = {"input_size": (3, size, size)} if size else {}
    config = timm.data.resolve_data_config(args, model=net)
    preprocess = timm.data.create_transform(**config, is_training=False)
    return timm_tokens(net, torch.stack([preprocess(image) for image in images]), layout)


@pytest.mark.parametrize(
    ("model", "prefix", "grid", "direct"),
    [
        pytest.param(TEST_MODEL, ("cls",), (7, 7), open_clip_direct, id="open_clip-ViT"),
        pytest.param("ViT-B-16-SigLIP", (), (14, 14), open_clip_direct, id="open_clip-SigLIP"),
        pytest.param("EVA02-B-16", ("cls",), (14, 14), open_clip_direct, id="open_clip-EVA02"),
        pytest.param(
            "timm:vit_small_patch16_dinov3",
            REGISTERS,
            (16, 16),
            lambda _model, images, layout: timm_direct(
                "vit_small_patch16_dinov3", None, images, layout
            ),
            id="timm-DINOv3",
        ),
    ],
)
def test_each_family_reads_its_library_s_own_tokens(model, prefix, grid, direct):
    """The adapter's layout is what the library's forward makes, and `ViTActivations` (stage
    one's loading, preprocessing and hooks) equals the library's own intermediate layer."""
    images = photos(2)
    acts = ViTActivations(model, "none", [LAYER], device="cpu", dtype="float32")
    assert acts.layout == TokenLayout(prefix, grid)
    found = acts(images)[LAYER]
    assert found.shape[1] == acts.layout.n_tokens == acts.tower.n_tokens
    torch.testing.assert_close(found, direct(model, images, acts.layout), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def dino_cache(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real stage-one run of DINOv2-reg over one shard of photos."""
    folder = tmp_path_factory.mktemp("dino")
    first = sorted(shards.glob("*.tar"))[0]
    (folder / "shards").mkdir()
    shutil.copy(first, folder / "shards")
    config = cache_config(
        folder / "shards", folder / "cache", model=DINO_REG, layers=(1, LAYER), storage="float32"
    )
    summary = cache(config)
    assert summary.committed == 1 and summary.rows == 8
    return Path(config.out)


def test_a_dinov2_cache_records_its_registers_and_equals_timm(dino_cache: Path, shards: Path):
    store = open_cache(dino_cache)
    attrs = store.attrs
    assert (attrs.prefix_tokens, attrs.patch_grid) == (REGISTERS, (16, 16))
    assert attrs.token_layout.registers == REGISTERS[1:]
    assert (attrs.n_tokens, attrs.d_model, attrs.image_size) == (5 + 256, 384, 224)
    assert "Resize(size=224" in attrs.preprocess
    rows = [r for r in store.rows_table().to_pylist() if r["status"] == "ok"][:3]
    with tarfile.open(shards / rows[0]["shard"]) as tar:
        jpgs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if ".jpg" in m.name}
    images = [Image.open(io.BytesIO(jpgs[r["key"]])).convert("RGB") for r in rows]
    expected = timm_direct("vit_small_patch14_reg4_dinov2", 224, images, attrs.token_layout)
    cached = store.read_rows(LAYER, [r["row"] for r in rows])
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)


def test_splicing_a_timm_model_scores_image_cosine_alone(dino_cache: Path, shards: Path):
    """DINOv2 has no text tower: the splice loads the card's model, scores by the cosine of the
    final (pooled, normed CLS) embeddings, and says that is all it scores."""
    store = open_cache(dino_cache)
    images = cache_images(store, 3, shards)
    card = SAECard(384, 64, TopKOptions(k=8), model=DINO_REG, pretrained="none:seed=0", layer=1)
    result = splice_eval(build_sae(card, seed=0), images, device="cpu")
    assert result.n_labels == 0 and result.scored_by.startswith("image-embedding cosine only")
    assert result.to_json()["scored_by"] == result.scored_by
    for score in (result.sae, result.mean_ablation, result.zero_ablation):
        assert score.agreement is None and -1 <= score.cosine < 1
    assert "zero-shot" not in "\n".join(result.lines())

    clip = load_clip(DINO_REG, "none", "cpu", "float32")
    assert clip.encode_text is None and clip.tokenizer is None
    kept = splice_eval(Identity(card), images, clip.tower)
    assert kept.sae.cosine == pytest.approx(1, abs=1e-5)


class Identity:
    """An SAE-shaped callable that reconstructs exactly."""

    def __init__(self, card: SAECard) -> None:
        self.card = card

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        return acts


def test_a_timm_model_is_an_image_encoder():
    """The MonoSemanticity Score's default encoder is the cache's own model, timm's too: its
    embedding is timm's pooled output, the same as the ViT's final forward."""
    encoder = load_image_encoder(DINO_REG, "none", "cpu", "float32")
    tower = load_vision_tower(DINO_REG, "none", "cpu", "float32")
    assert (encoder.image_size, encoder.embed_dim) == (224, 384)
    pixels = torch.stack([tower.preprocess(image) for image in photos(2)])
    expected = torch.nn.functional.normalize(tower.visual(pixels), dim=-1)
    torch.testing.assert_close(encoder.embed(pixels), expected)


def test_timm_weights_from_a_local_file(tmp_path: Path):
    timm = import_timm()
    torch.manual_seed(5)
    net = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=224)
    weights = tmp_path / "dino.pth"
    torch.save(net.state_dict(), weights)
    tower = load_vision_tower(DINO_REG, str(weights), "cpu", "float32")
    assert tower.pretrained == str(weights)
    assert torch.equal(tower.blocks[0].mlp.fc1.weight, net.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("RN50", "RN50's image tower is a ModifiedResNet, not a ViT"),
        ("timm:resnet18", "timm:resnet18's image tower is a ResNet, not a ViT"),
        ("timm:vit_nonesuch", "unknown timm model 'vit_nonesuch' in 'timm:vit_nonesuch'"),
        ("ViT-Nonesuch", "unknown open_clip model 'ViT-Nonesuch'; see open_clip.list_models"),
        ("timm:vit_small_patch14_dinov2@big", "expected timm:NAME@SIZE"),
    ],
)
def test_what_is_not_a_known_vit_is_one_line(model: str, expected: str):
    with pytest.raises(BadSetting, match=expected) as raised:
        load_vision_tower(model, "none")
    assert "\n" not in str(raised.value)


def test_no_weights_mean_the_model_s_published_default(tmp_path: Path):
    """`ViTActivations(model, None, ...)` asks for the default published weights (open_clip's
    first tag, timm's default tag); offline that is one line naming them, not a crash."""
    code = (
        "from vitscope import ViTActivations\n"
        "from vitscope.support.errors import Unreachable\n"
        "for model in ('timm:vit_small_patch14_reg4_dinov2', 'ViT-B-32'):\n"
        "    try:\n"
        "        ViTActivations(model, None, [1], device='cpu')\n"
        "    except Unreachable as err:\n"
        "        print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("timm:vit_small_patch14_reg4_dinov2 (lvd142m): expected its")
    assert lines[1].startswith("ViT-B-32 (openai): expected its weights")


def test_a_cache_from_before_the_layout_resumes_and_another_layout_is_refused(tmp_path: Path):
    """Stage one now records CLS + 7x7 for ViT-S-32; a cache written before spec 1.4 records
    nothing and reads as the same layout, so it resumes. A cache of another layout with the same
    T (no prefix, 5x10 patches) is another model's: refused."""
    recorded = CacheAttrs(
        model=TEST_MODEL,
        pretrained="none:seed=0",
        image_size=224,
        n_tokens=50,
        d_model=8,
        n_blocks=4,
        layers=(3,),
        storage="float32",
        codec="zstd-1",
        chunk_images=4,
        rows_per_shard=8,
        shards=("00000.tar",),
        model_dtype="float32",
        preprocess="",
        prefix_tokens=("cls",),
        patch_grid=(7, 7),
    )
    before = dataclasses.replace(recorded, spec_version="1.3", prefix_tokens=None, patch_grid=None)
    create_or_open(tmp_path / "cache", before)
    assert create_or_open(tmp_path / "cache", recorded).attrs.token_layout == recorded.token_layout
    other = dataclasses.replace(recorded, prefix_tokens=(), patch_grid=(5, 10))
    with pytest.raises(
        CacheSpecError, match=r"token layout .*\(this run: TokenLayout\(prefix=\(\)"
    ):
        create_or_open(tmp_path / "cache", other)
