"""Stage one against an independent forward pass, and the reader API on a real cache."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import PHOTOS, TEST_LAYERS, TEST_MODEL, cache_config, run_vitscope
from vitscope.cache_spec import open_cache
from vitscope.demo import write_url_list
from vitscope.pipeline.model import import_open_clip, load_vision_tower, residual_stream
from vitscope.pipeline.run import cache


def tar_images(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {
            m.name.split(".")[0]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.endswith(".jpg")
        }


def hooked_forward(images: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """A full forward of a freshly built model with plain hooks: no code from pipeline/model.py."""
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(TEST_MODEL, pretrained=None)
    model.eval()
    outputs: dict[int, torch.Tensor] = {}
    blocks = model.visual.transformer.resblocks
    handles = [
        blocks[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: outputs.__setitem__(layer, out.detach().clone())
        )
        for layer in layers
    ]
    with torch.no_grad():
        model.encode_image(images)
    for handle in handles:
        handle.remove()
    return outputs


def test_download_sums_up_what_failed(photo_url: str, tmp_path: Path):
    """img2dataset prints per-worker fractions ('failed to download: 0.250'); the command ends
    with the counts, and why the failures failed."""
    urls = write_url_list(tmp_path / "urls.csv", photo_url, PHOTOS[:3], {"gone.png": "not served"})
    args = ["download", "--url-list", str(urls), "--out", str(tmp_path / "shards")]
    done = run_vitscope(*args, "--threads", "2")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    expected = f"shards in {tmp_path / 'shards'}: 1; 3 of 4 images downloaded, 1 failed (1 HTTP"
    assert summary.startswith(expected) and "404" in summary


def test_cached_activations_equal_a_direct_forward_pass(reference_cache: Path, shards: Path, tower):
    store = open_cache(reference_cache)
    rows = store.rows_table().to_pylist()
    used = [r for r in rows if r["status"] == "ok"]
    assert len(used) == store.n_rows == 23
    jpgs = {}
    for shard in sorted(shards.glob("*.tar")):
        jpgs.update(tar_images(shard))
    picked = used[::4]
    images = torch.stack(
        [tower.preprocess(Image.open(io.BytesIO(jpgs[r["key"]])).convert("RGB")) for r in picked]
    )
    expected = hooked_forward(images, TEST_LAYERS)
    for layer in TEST_LAYERS:
        cached = store.read_rows(layer, [r["row"] for r in picked])
        assert cached.shape == (len(picked), 50, 384)
        torch.testing.assert_close(cached, expected[layer], rtol=2e-3, atol=2e-3)


def test_rows_trace_back_to_shard_key_url_and_caption(reference_cache: Path, shards: Path):
    store = open_cache(reference_cache)
    table = store.rows_table()
    assert table.num_rows == 23  # the missing URL never reached a tar (img2dataset counts it)
    for record in table.to_pylist():
        assert record["status"] == "ok"
        assert record["url"].endswith(".png") or record["url"].endswith(".jpg")
        assert record["caption"]
        assert record["key"] in tar_images(shards / record["shard"])
    rows = [r for r in table["row"].to_pylist() if r is not None]
    assert len(set(rows)) == len(rows)
    for commit in store.committed.values():
        in_region = [r for r in rows if commit.first_row <= r < commit.first_row + 8]
        assert in_region == list(range(commit.first_row, commit.first_row + commit.n_rows))


def test_vit_l14_gives_257_tokens_of_1024(tmp_path: Path):
    tower = load_vision_tower("ViT-L-14", "none", "cpu", "float32", seed=0)
    acts = residual_stream(tower, torch.randn(1, 3, 224, 224), [2, 22])
    assert tower.n_tokens == 257 and tower.n_blocks == 24
    assert acts[2].shape == acts[22].shape == (1, 257, 1024)


def test_chunks_cover_committed_rows_in_seeded_orders(reference_cache: Path):
    store = open_cache(reference_cache, layer=5)
    sequential = store.chunks()
    rows = [r for c in sequential for r in range(c.first_row, c.first_row + c.n_rows)]
    assert sorted(rows) == sorted(r for r in store.rows_table()["row"].to_pylist() if r is not None)
    assert [c.n_rows for c in sequential] == [4, 4, 4, 4, 4, 3]
    shuffled = store.chunks(order="random", seed=1)
    assert shuffled == store.chunks(order="random", seed=1)
    assert shuffled != store.chunks(order="random", seed=2)
    assert sorted(shuffled, key=lambda c: c.index) == sequential
    for ref in shuffled[:2]:
        chunk = store.read_chunk(5, ref)
        expected = store.read_rows(5, range(ref.first_row, ref.first_row + ref.n_rows))
        assert torch.equal(chunk, expected)


def test_reading_an_uncommitted_row_is_refused(reference_cache: Path):
    store = open_cache(reference_cache)
    last = max(c.first_row + c.n_rows for c in store.committed.values())
    with pytest.raises(IndexError, match="not a committed row"):
        store.read_rows(2, [0, last])


@pytest.fixture(scope="module")
def float32_cache(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = cache_config(shards, tmp_path_factory.mktemp("f32") / "cache", storage="float32")
    cache(config)
    return Path(config.out)


@pytest.mark.parametrize(
    ("storage", "bytes_per_value", "tolerance"),
    [("float16", 2, 1e-3), ("int8", 1, 0.01), ("float8_e4m3", 1, 0.04)],
)
def test_storages_round_trip_within_their_precision(
    shards: Path,
    float32_cache: Path,
    tmp_path: Path,
    storage: str,
    bytes_per_value: int,
    tolerance: float,
):
    config = cache_config(shards, tmp_path / "cache", storage=storage, layers=(5, 11))
    cache(config)
    exact_store, store = open_cache(float32_cache), open_cache(config.out)
    assert store.encoding.bytes_per_value == bytes_per_value
    for layer in (5, 11):
        for ref in store.chunks():
            exact = exact_store.read_chunk(layer, ref)
            error = float((store.read_chunk(layer, ref) - exact).norm() / exact.norm())
            assert error < tolerance, (layer, ref, error)


def test_weights_from_a_local_file(tmp_path: Path, tower):
    """`--pretrained FILE` loads a checkpoint from disk: here the seeded random model's own."""
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(TEST_MODEL, pretrained=None)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    from_file = load_vision_tower(TEST_MODEL, str(weights), "cpu", "float32")
    assert from_file.pretrained == str(weights)
    images = torch.randn(2, 3, 224, 224)
    expected = residual_stream(tower, images, [5])[5]
    assert torch.equal(residual_stream(from_file, images, [5])[5], expected)


def test_cache_picture_shows_every_layer(reference_cache: Path, tmp_path: Path):
    from vitscope.cache_plot import plot_cache
    from vitscope.cache_spec.outliers import layer_norms

    store = open_cache(reference_cache)
    norms = list(layer_norms(store, 2))
    assert [stats.layer for stats in norms] == list(TEST_LAYERS)
    first, last = store.chunks()[0], store.chunks()[-1]
    rows = [*range(first.first_row, first.first_row + first.n_rows)]
    rows += range(last.first_row, last.first_row + last.n_rows)
    expected = store.read_rows(11, rows).norm(dim=2).mean(dim=0)
    actual = torch.tensor(norms[2].norms_NT.mean(axis=0)).float()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    picture = plot_cache(store, norms, tmp_path / "cache.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
