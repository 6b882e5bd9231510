"""`vitscope download`: img2dataset with settings that suit CLIP, writing webdataset shards."""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vitscope.pipeline.config import DownloadConfig
from vitscope.support.errors import BadSetting, MissingInput
from vitscope.support.extras import require
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.progress import status

INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
CLUSTER_EXTRAS = {"pyspark": "spark", "ray": "ray"}
SHARDS = holding("a folder of shards", "*.tar", "*_stats.json")
"""The download's own output, which a re-run completes (img2dataset skips finished shards)."""
"""The package each cluster distributor needs, and the extra that brings it."""


@dataclass(frozen=True)
class DownloadStats:
    """A shard folder's totals, from the `NNNNN_stats.json` img2dataset writes for each shard."""

    shards: int
    count: int
    """URLs tried."""
    successes: int
    reasons: dict[str, int]
    """Why the others failed (img2dataset's status, e.g. 'HTTP Error 404: File not found') and
    how many each."""

    @property
    def failed(self) -> int:
        return self.count - self.successes

    def line(self, out: Path | str) -> str:
        """One summary line: what img2dataset's per-worker fractions leave to arithmetic."""
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        return (
            f"shards in {out}: {self.shards}; {self.successes} of {self.count} images downloaded, "
            f"{self.failed} failed" + (f" ({why})" if why else "")
        )


def download_stats(out: Path) -> DownloadStats:
    """Sum the stats of every shard in `out` (earlier runs' included: re-runs skip their shards)."""
    count, successes, reasons = 0, 0, Counter[str]()
    shard_stats = sorted(out.glob("*_stats.json"))
    for path in shard_stats:
        stats = json.loads(path.read_text())
        count += stats["count"]
        successes += stats["successes"]
        reasons.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    return DownloadStats(len(shard_stats), count, successes, dict(reasons))


def input_format(url_list: Path) -> str:
    """img2dataset's input_format from the file's (or the folder's first file's) extension."""
    files = sorted(url_list.iterdir()) if url_list.is_dir() else [url_list]
    for file in files:
        if file.suffix in INPUT_FORMATS:
            return INPUT_FORMATS[file.suffix]
    raise BadSetting(f"{url_list}: no URL list with a known extension ({', '.join(INPUT_FORMATS)})")


def join_cluster(distributor: str) -> None:
    """Connect to the cluster the distributor runs on before img2dataset looks for it: it uses an
    active Spark session (under spark-submit, the cluster's; without one it would start a local
    one) and Ray's initialised connection (ray.init joins the cluster `ray start` made, or
    RAY_ADDRESS's)."""
    module = require(
        distributor, CLUSTER_EXTRAS[distributor], f"vitscope download --distributor {distributor}"
    )
    if distributor == "pyspark":
        spark_sql = importlib.import_module("pyspark.sql")
        spark_sql.SparkSession.builder.appName("vitscope download").getOrCreate()
    else:
        module.init(ignore_reinit_error=True)


def download(config: DownloadConfig) -> Path:
    """Fetch every URL into shards of `samples_per_shard`; re-running skips finished shards."""
    url_list = Path(config.url_list)
    if not url_list.exists():
        raise MissingInput(f"{url_list}: no such URL list")
    check_output_path(config.out, "--out", overwrite=config.overwrite, own=SHARDS)
    # albumentations, imported by img2dataset, phones home for updates unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    img2dataset_download = require("img2dataset", "cache", "vitscope download").download
    if config.distributor in CLUSTER_EXTRAS:
        join_cluster(config.distributor)
    status(
        f"downloading {url_list} into {config.out} with img2dataset "
        f"({config.processes} process(es) x {config.threads} threads, {config.distributor}; "
        "its bar counts shards)"
    )
    img2dataset_download(
        url_list=str(url_list),
        output_folder=config.out,
        input_format=input_format(url_list),
        url_col=config.url_col,
        caption_col=config.caption_col,
        output_format="webdataset",
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        encode_format="jpg",
        number_sample_per_shard=config.samples_per_shard,
        processes_count=config.processes,
        distributor=config.distributor,
        thread_count=config.threads,
        timeout=config.timeout,
        enable_wandb=False,
        incremental_mode="incremental",
    )
    return Path(config.out)
