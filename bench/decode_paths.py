"""Stage one's two decode paths on real photos: how far `--decode device` moves the cached
activations from the PIL path's, against the float16 rounding the cache applies anyway, and how
fast each path decodes and preprocesses.

Both paths read the same shards (scikit-image's photos, img2dataset's layout) in this process, one
batch at a time: PIL in the way DataLoader workers run it, and `DeviceDecoder` (nvJPEG on CUDA),
in two ABBA rounds (`common.alternate`; the first device pass starts nvJPEG and its kernels).
The tower runs in float32 so that only the pixels differ. Per cached layer: the mean and minimum
per-token cosine (printed as 1 - cos) and ||a_dev - a_pil|| / ||a_pil||; the same numbers for
the PIL path's float32 activations against their own float16 rounding are the yardstick.

    .venv/bin/python bench/decode_paths.py --device cpu --model ViT-B-32 --layers 2,5,8,11
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import alternate, command_line, md_table, publish, timed
from photo_shards import write_photo_shards

from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS
from vitscope.pipeline.dataset import ShardImages
from vitscope.pipeline.device_decode import DeviceDecoder
from vitscope.pipeline.model import load_vision_tower, residual_stream
from vitscope.pipeline.shards import list_shards


class Distance:
    """Per-token cosine (mean, min) and relative error of activations against a reference."""

    def __init__(self) -> None:
        self.cosines: list[torch.Tensor] = []
        self.diff_sq = self.ref_sq = 0.0

    def add(self, acts_BTD: torch.Tensor, reference_BTD: torch.Tensor) -> None:
        acts, ref = acts_BTD.double(), reference_BTD.double()
        self.cosines.append(torch.cosine_similarity(acts, ref, dim=-1).flatten().cpu())
        self.diff_sq += float((acts - ref).square().sum())
        self.ref_sq += float(ref.square().sum())

    def cells(self) -> str:
        cosine = torch.cat(self.cosines).clamp(max=1)  # float64 puts equal vectors at 1 +- 1e-16
        error = (self.diff_sq / self.ref_sq) ** 0.5
        return f"{1 - cosine.mean():.1e} | {1 - cosine.min():.1e} | {error:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--layers", default=",".join(map(str, CLIP_SCOPE_LAYERS)))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224, help="side of the stored JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode_paths.md"))
    args = parser.parse_args()
    layers = [int(layer) for layer in args.layers.split(",")]
    device = torch.device(args.device)
    tower = load_vision_tower(args.model, "none", args.device, "float32")
    decoder = DeviceDecoder(tower)
    with tempfile.TemporaryDirectory(prefix="vitscope-decode-bench-") as workdir:
        shards_dir = write_photo_shards(
            Path(workdir), args.images, shard_size=128, image_size=args.image_size
        )
        shards = list(enumerate(list_shards(shards_dir)))

        def pil_path() -> list[torch.Tensor]:
            dataset = ShardImages(shards, tower.preprocess, args.batch_size, tower.image_size)
            return [batch.images_BCHW for batch in dataset if batch.n_images]

        def device_path() -> list[torch.Tensor]:
            dataset = ShardImages(shards, None, args.batch_size, tower.image_size)
            return [decoder(batch).images_BCHW for batch in dataset if batch.encoded]

        paths = {"PIL": pil_path, "device": device_path}
        rounds = alternate(
            {name: lambda p=path: timed(p, device) for name, path in paths.items()}, 2
        )
    pil_s, device_s = (min(t.wall for t in rounds.timings[name]) for name in paths)
    pil_batches, device_batches = (rounds.timings[name][0].result for name in paths)
    device_vs_pil = {layer: Distance() for layer in layers}
    float16 = {layer: Distance() for layer in layers}
    for pil_BCHW, device_BCHW in zip(pil_batches, device_batches, strict=True):
        pil_acts = residual_stream(tower, pil_BCHW, layers)
        device_acts = residual_stream(tower, device_BCHW, layers)
        for layer in layers:
            device_vs_pil[layer].add(device_acts[layer], pil_acts[layer])
            float16[layer].add(pil_acts[layer].half(), pil_acts[layer])
    beyond = [layer for layer in layers if device_vs_pil[layer].diff_sq > float16[layer].diff_sq]
    body = [
        f"Random-weight {args.model} in float32, {args.images} photos stored as "
        f"{args.image_size} px JPEGs (quality 95), batches of {args.batch_size}; decode and "
        "preprocess timed in one process (tar read included), best of two ABBA rounds.",
        "",
        *md_table(
            "layer | device vs PIL: 1 - mean cos | 1 - min cos | rel. error "
            "| PIL f32 vs f16: 1 - mean cos | 1 - min cos | rel. error",
            (f"{n} | {device_vs_pil[n].cells()} | {float16[n].cells()}" for n in layers),
        ),
        "",
        f"Decode + preprocess: PIL {args.images / pil_s:.0f} images/s, device "
        f"{args.images / device_s:.0f} images/s ({pil_s / device_s:.2f}x).",
        f"Beyond float16 rounding at layers: {', '.join(map(str, beyond)) or 'none'}.",
    ]
    publish(args.out, device, command_line(), body)


if __name__ == "__main__":
    main()
