"""What matching two SAEs' latents costs (`vitscope consistency`, analysis/matching.py): wall time
and peak memory of the dense and the sparse Hungarian assignment by width, and how far the sparse
one falls short of the exact optimum.

Why: a dense cosine matrix of 65,536 latents is 17 GB and the cubic solver out of reach, so above
EXACT_UP_TO latents the assignment is solved on each latent's top candidates; this measures that
it stays tractable and what it gives up. Dictionaries: D = 1,024 random unit rows; B holds half of
A's rows, permuted, with noise (cosine ~0.96 to their source), and random rows for the rest. Each
measurement runs in a fresh process, which reports its peak resident memory (VmHWM).

    .venv/bin/python bench/consistency_cost.py --latents 4096,16384,65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.optimize  # the solvers imported before any clock starts
import scipy.sparse.csgraph  # noqa: F401
import torch
from common import command_line, log, md_table, publish, timed

from vitscope.analysis.matching import (
    CANDIDATES,
    EXACT_UP_TO,
    exact_matching,
    sparse_matching,
    unit_rows,
)

NOISE = 0.3
"""Noise on a planted row, relative to its norm: cosine 1 / sqrt(1 + 0.09) ~ 0.958."""


def planted(n: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(A, B, where A's first n/2 rows went in B), seeded."""
    generator = torch.Generator().manual_seed(0)
    a = unit_rows(torch.randn(n, d, generator=generator))
    b = unit_rows(torch.randn(n, d, generator=generator))
    placed = torch.randperm(n, generator=generator)[: n // 2]
    noise = torch.randn(n // 2, d, generator=generator) * NOISE / d**0.5
    b[placed] = unit_rows(a[: n // 2] + noise)
    return a.to(device), b.to(device), placed.numpy()


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def measure(n: int, d: int, method: str, device: str) -> dict:
    """One matching in this process: its wall time, memory and what it found."""
    a, b, placed = planted(n, d, device)
    match = exact_matching if method == "exact" else sparse_matching
    timing = timed(lambda: match(a, b), torch.device(device))
    matching = timing.result
    return {
        "n": n,
        "method": method,
        "wall": timing.wall,
        "others": timing.others_cell,
        "peak_rss_gb": peak_rss_gb(),
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "pw_mcc": matching.pw_mcc,
        "share_above": matching.share_above(0.9),
        "planted_found": float((matching.partner[: n // 2] == placed).mean()),
    }


def in_fresh_process(n: int, d: int, method: str, device: str) -> dict:
    args = [sys.executable, __file__, "--one", method, "--latents", str(n), "--d", str(d)]
    done = subprocess.run([*args, "--device", device], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", default="4096,16384,65536")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--exact-up-to", type=int, default=16384, help="also run the dense one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=("exact", "sparse"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/consistency_cost.md"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.latents), args.d, args.one, args.device)))
        return
    rows = []
    for n in map(int, args.latents.split(",")):
        for method in ("exact", "sparse") if n <= args.exact_up_to else ("sparse",):
            found = in_fresh_process(n, args.d, method, args.device)
            log(json.dumps(found))
            rows.append(found)
    exact = {r["n"]: r["pw_mcc"] for r in rows if r["method"] == "exact"}
    cells = []
    for r in rows:
        gap = f"{exact[r['n']] - r['pw_mcc']:.2e}" if r["n"] in exact else ""
        gpu = "" if r["gpu_peak_gb"] is None else f", GPU {r['gpu_peak_gb']:.2f}"
        cells.append(
            f"{r['n']:,} | {r['method']} | {r['wall']:.1f} | {r['others']} | "
            f"{r['peak_rss_gb']:.2f}{gpu} | {r['pw_mcc']:.4f} | {gap} | {r['share_above']:.4f} | "
            f"{r['planted_found']:.4f}"
        )
    body = [
        f"D = {args.d}; B = half of A's rows permuted with noise (cosine ~0.96), half random; "
        f"sparse: top {CANDIDATES} candidates per latent each way; `vitscope consistency` uses "
        f"the exact one up to {EXACT_UP_TO:,} latents.",
        "",
        *md_table(
            "latents | method | wall (s) | others' CPU (s) | peak RSS (GB) | PW-MCC | "
            "exact − sparse | share > 0.9 | planted pairs found",
            cells,
        ),
    ]
    publish(args.out, torch.device(args.device), command_line(), body)


if __name__ == "__main__":
    main()
