"""What the stage-two benchmarks share: the machine's name, a results section, a random cache."""

from __future__ import annotations

import itertools
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from vitscope.cache_spec import CacheAttrs, ShardCommit, create_or_open
from vitscope.cache_spec.codecs import DEFAULT_CODEC
from vitscope.cache_spec.layout import ROWS_SCHEMA
from vitscope.train.loader import ActivationStream


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpu.splitlines()
            if line.startswith("Model name")
        ),
        platform.processor(),
    )
    return f"{model}, {torch.get_num_threads()} threads"


def command_line() -> str:
    """How this benchmark was run, from the project root, for its results section."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def publish(out: Path, device: torch.device, command: str, body: list[str]) -> None:
    """Print a results section (date, machine, exact command, body) and append it to `out`."""
    lines = [
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(device)}",
        "",
        f"`{command}` (torch {torch.__version__})",
        "",
        *body,
        "",
    ]
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write("\n".join(lines) + "\n")


def write_random_cache(
    path: Path, n_images: int, chunk_images: int, layer: int = 20, codec: str = DEFAULT_CODEC
) -> Path:
    """float16 activations of ViT-L/14's shape (T=257, D=1024) through the real writer, one shard:
    loader and training speed do not depend on the values."""
    generator = torch.Generator().manual_seed(0)
    chunks = (
        torch.randn(chunk_images, 257, 1024, generator=generator)
        for _ in range(n_images // chunk_images)
    )
    return write_single_shard_cache(path, chunks, n_images, chunk_images, layer, "float16", codec)


def write_single_shard_cache(
    path: Path,
    chunks_CTD: Iterable[torch.Tensor],
    n_images: int,
    chunk_images: int,
    layer: int,
    storage: str,
    codec: str = DEFAULT_CODEC,
) -> Path:
    """Whole chunks of given activations through the real cache writer as one committed shard
    of `n_images` rows (no model, no images: benchmarks of what comes after stage one)."""
    chunks = iter(chunks_CTD)
    first = next(chunks)
    attrs = CacheAttrs(
        model="bench",
        pretrained="none:seed=0",
        image_size=224,
        n_tokens=first.shape[1],
        d_model=first.shape[2],
        n_blocks=layer + 1,
        layers=(layer,),
        storage=storage,
        codec=codec,
        chunk_images=chunk_images,
        rows_per_shard=-(-n_images // chunk_images) * chunk_images,
        shards=("00000.tar",),
        model_dtype="float32",
        preprocess="",
    )
    store = create_or_open(path, attrs)
    for index, chunk in enumerate(itertools.chain([first], chunks)):
        padding = chunk.new_zeros(chunk_images - len(chunk), *chunk.shape[1:])  # the tail chunk
        store.write_chunk(layer, index, torch.cat([chunk, padding]))
    rows = pa.table(
        {
            "row": list(range(n_images)),
            "shard": ["00000.tar"] * n_images,
            "key": [str(i) for i in range(n_images)],
            "url": [None] * n_images,
            "caption": [None] * n_images,
            "status": ["ok"] * n_images,
            "error": [None] * n_images,
        },
        schema=ROWS_SCHEMA,
    )
    store.commit(ShardCommit("00000.tar", 0, 0, n_images, 0, 0, "bench", "now"), rows)
    return path


def sequential_read(folder: Path) -> tuple[int, float]:
    """Bytes and seconds to read every chunk file once, in name order, into memory."""
    start, total = time.perf_counter(), 0
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            total += len(file.read_bytes())
    return total, time.perf_counter() - start


def loader_rate(stream: ActivationStream, n_tokens: int) -> tuple[int, float]:
    start, seen = time.perf_counter(), 0
    for batch in stream.batches(0):
        seen += len(batch.acts_BD)
        if seen >= n_tokens:
            break
    return seen, time.perf_counter() - start
