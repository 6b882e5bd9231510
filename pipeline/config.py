"""Settings of stage one's two jobs: downloading shards and caching activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from vitscope.cache_spec.codecs import CODECS, DEFAULT_CODEC
from vitscope.cache_spec.layout import CLIP_SCOPE_LAYERS, Storage
from vitscope.pipeline.model import ModelDtype
from vitscope.support.configs import AtLeast, check_bounds
from vitscope.support.errors import BadSetting
from vitscope.support.shared_options import Device, Overwrite

Decode = Literal["pil", "device"]


@dataclass(frozen=True)
class DownloadConfig(Overwrite):
    """img2dataset settings that suit CLIP: 224 px center crops as jpg, captions and json kept."""

    url_list: str
    """Parquet, CSV, TSV or TXT file (or a folder of them) of image URLs, e.g. LAION metadata."""
    out: str = "data/shards"
    """Folder for the webdataset shards (NNNNN.tar with .parquet and _stats.json beside each)."""
    url_col: str = "url"
    """Column holding the URL (LAION's parquet files call it URL)."""
    caption_col: str = "caption"
    """Column holding the caption (LAION's parquet files call it TEXT)."""
    image_size: Annotated[int, AtLeast(1)] = 224
    """Side of the stored images; the model's preprocessing resizes again if it differs."""
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    """How img2dataset fits images to image_size; center_crop matches CLIP's own preprocessing."""
    samples_per_shard: Annotated[int, AtLeast(1)] = 10000
    """Samples per output shard; a cache reserves this many rows per shard."""
    processes: Annotated[int, AtLeast(1)] = 1
    """Download processes."""
    threads: Annotated[int, AtLeast(1)] = 64
    """Download threads per process."""
    timeout: Annotated[int, AtLeast(1)] = 10
    """Seconds before a download is given up."""
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    """img2dataset's distributor: multiprocessing on this machine, or pyspark / ray across the
    nodes of a running Spark or Ray cluster (README "Running at scale")."""

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class CacheConfig(Device):
    """One pass of a vision tower over shards, writing the residual stream of several layers."""

    shards: str = "data/shards"
    """Folder of img2dataset webdataset shards (*.tar)."""
    out: str = "data/cache"
    """Cache to create, or to resume and extend (a Zarr v3 group): a folder or a URL (s3://...)."""
    layers: tuple[int, ...] = CLIP_SCOPE_LAYERS
    """Blocks whose output to cache, comma-separated: layer L = residual stream after block L."""
    model: str = "ViT-L-14"
    """A ViT: an open_clip model name (ViT-L-14, ViT-B-16-SigLIP, PE-Core-B-16, EVA02-B-16, ...)
    or timm:NAME for a timm one (timm:vit_base_patch14_reg4_dinov2, timm:vit_base_patch16_dinov3;
    timm:NAME@SIZE for SIZE-pixel inputs)."""
    pretrained: str = "laion2b_s32b_b82k"
    """The model library's pretrained tag (open_clip's, or timm's such as lvd142m), a local weights
    file, or 'none' for seeded random weights."""
    seed: Annotated[int, AtLeast(0)] = 0
    """Seed of the random weights when pretrained is 'none'."""
    model_dtype: ModelDtype = "auto"
    """Dtype of the forward pass; auto = bfloat16 on GPU, float32 on CPU."""
    batch_size: Annotated[int, AtLeast(1)] = 64
    """Images per forward pass."""
    num_workers: Annotated[int, AtLeast(0)] = 4
    """DataLoader workers reading shards, and with --decode pil decoding their images too."""
    decode: Decode = "pil"
    """Where images are decoded, resized and cropped: pil in the DataLoader workers (the
    reference), or device: as tensors on the model's device, with nvJPEG on a GPU (close to pil but
    not equal; BENCHMARKS.md, issue 12)."""
    write_threads: Annotated[int, AtLeast(1)] = 4
    """Threads encoding, compressing and writing chunks while the model runs."""
    storage: Storage = "float16"
    """Stored value type: float16, float32, or 8-bit int8 / float8_e4m3 with per-chunk scales."""
    codec: str = DEFAULT_CODEC
    """Compression preset (cache_spec/codecs.py)."""
    chunk_images: Annotated[int, AtLeast(1)] = 16
    """Images per chunk: the unit of compression and of stage two's reads."""
    rows_per_shard: Annotated[int, AtLeast(1)] = 10000
    """Rows reserved per input shard; at least img2dataset's samples per shard."""
    part: Annotated[int, AtLeast(0)] = 0
    """This writer's part (0 .. parts-1): it takes the shards whose index % parts == part."""
    parts: Annotated[int, AtLeast(1)] = 1
    """Number of writers sharing the cache (GPUs, nodes); each runs with its own --part."""

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.codec not in CODECS:
            raise BadSetting(f"codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        if not 0 <= self.part < self.parts:
            raise BadSetting(f"part must be in 0..{self.parts - 1}, not {self.part}")
        if not self.layers:
            raise BadSetting("layers must name at least one layer")
        if min(self.layers) < 0:
            raise BadSetting(f"layers must be at least 0, not {min(self.layers)}")
