"""Size and writing time of the feature browser at a real SAE's width (65,536 features, top 9)
and a real patch grid (16x16, ViT-L/14), on random statistics whose top images are real rows of
CACHE (the test suite's own `wide_analysis`, so bench and test measure the same site)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import command_line, publish, timed
from test_browser import wide_analysis

from vitscope.analysis.browser import size_per_feature, write_browser
from vitscope.analysis.files import load_analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cache", type=Path, help="a cache with real rows, e.g. data/demo/cache")
    parser.add_argument("--features", type=int, default=65_536)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/browser_size.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="browser-bench-") as tmp:
        work = Path(tmp)
        folder = wide_analysis(work / "analysis", args.cache, args.features, 9, grid=args.grid)
        written = timed(lambda: write_browser(load_analysis(folder), work / "site"))
        site = written.result.parent
        per_feature = size_per_feature(site, args.features)
        data_bytes = sum(p.stat().st_size for p in (site / "data").glob("*"))
        n_data = len(list((site / "data").glob("*")))
        images = [p.stat().st_size for p in (site / "images").glob("*.jpg")]
    body = [
        f"{args.features:,} features, top 9, {args.grid}x{args.grid} patches: written in "
        f"{written.wall:.1f} s; {per_feature:,.0f} bytes per feature in all;",
        f"data {data_bytes / args.features:,.0f} bytes per feature in {n_data} files; "
        f"{len(images)} distinct top images, {sum(images) / max(len(images), 1):,.0f} bytes each.",
    ]
    publish(args.out, torch.device("cpu"), command_line(), body)


if __name__ == "__main__":
    main()
