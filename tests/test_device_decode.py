"""`--decode device` against the PIL path it must stay close to: rows, activations, pixels."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from conftest import TEST_LAYERS, cache_config, cli_args, run_vitscope
from vitscope.cache_spec import open_cache
from vitscope.demo import PHOTO_CAPTIONS, photo_dir
from vitscope.pipeline.device_decode import DeviceDecoder, pil_pixels


def test_device_decoded_cache_has_the_pil_rows_and_activations(
    reference_cache: Path, shards: Path, tmp_path: Path
):
    config = cache_config(shards, tmp_path / "cache", decode="device")
    result = run_vitscope(*cli_args(config))
    assert result.returncode == 0, result.stderr
    device, pil = open_cache(config.out), open_cache(reference_cache)
    assert device.rows_table().equals(pil.rows_table())
    assert device.attrs.preprocess == f"{pil.attrs.preprocess} (--decode device)"
    rows = [r for r in pil.rows_table()["row"].to_pylist() if r is not None]
    for layer in TEST_LAYERS:
        # measured: equal. The shards hold 224 px JPEGs (no resize) and the CPU decodes with PIL
        assert torch.equal(device.read_rows(layer, rows), pil.read_rows(layer, rows))


def test_tensor_preprocessing_matches_open_clips_on_real_photos(tower):
    """Photos of many sizes, aspects and modes (L, RGB, RGBA), resized as tensors and by PIL."""
    decoder = DeviceDecoder(tower)
    std_C11 = torch.tensor(tower.preprocess.transforms[-1].std).view(3, 1, 1)
    levels = []
    for name in sorted(PHOTO_CAPTIONS):
        with Image.open(photo_dir() / name) as image:
            expected = tower.preprocess(image)
            got = decoder.preprocess([pil_pixels(image)])[0]
        assert got.shape == expected.shape == (3, tower.image_size, tower.image_size)
        levels.append(((got - expected) * std_C11 * 255).abs().flatten())
    levels_all = torch.cat(levels)
    # measured over the 24 photos: mean 0.13 levels of 255, at most 9 (sharp synthetic edges)
    assert levels_all.mean() < 0.2
    assert levels_all.max() <= 10
