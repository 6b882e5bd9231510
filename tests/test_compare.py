"""`vitscope compare` over SAEs on two layers of the photo cache: one table, one figure, and the
layers' browsers linked to each other."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import run_vitscope
from vitscope.analysis.analyze import analyze
from vitscope.analysis.config import AnalyzeConfig
from vitscope.train.config import TrainConfig
from vitscope.train.run import train


def test_two_layers_side_by_side(photo_sae: Path, photo_analysis: Path, tmp_path: Path):
    layer5 = shutil.copytree(photo_sae, tmp_path / "layer05")
    saved = json.loads((photo_sae / "cfg.json").read_text())["training"]
    config = TrainConfig(**{**saved, "layer": 11, "out": str(tmp_path / "layer11")})
    (layer11,) = train([dataclasses.replace(config, resume=False)])
    analyze(AnalyzeConfig(run=str(layer11), device="cpu"))
    for run in (layer5, layer11):
        browsed = run_vitscope("browse", str(run))
        assert browsed.returncode == 0, browsed.stderr

    result = run_vitscope("compare", str(layer11), str(layer5), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["5", "11"]  # sorted by layer
    for row in rows:
        assert 0 < float(row["median_frequency"]) <= 1
        assert float(row["dead_fraction"]) >= 0 and row["explained_variance"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.startswith("| layer | explained variance |") and "| 11 |" in table
    picture = np.asarray(Image.open(tmp_path / "cmp" / "compare.png").convert("L"), np.float32)
    assert picture.std() > 10

    links = (layer5 / "browser" / "data" / "layers.js").read_text()
    parsed = json.loads(links.removeprefix("VS.layers = ").removesuffix(";\n"))
    assert [(link["layer"], link["here"]) for link in parsed] == [(5, True), (11, False)]
    assert (layer5 / "browser" / parsed[1]["href"]).resolve() == layer11 / "browser" / "index.html"
