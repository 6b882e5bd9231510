"""The README.md a pushed SAE carries: what it reads, how well it reconstructs (measured numbers
from the run's own log), and how to load it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vitscope.saes.card import SAECard
from vitscope.support.run_log import read_log

ANALYSIS_FEATURES = Path("analysis") / "features.parquet"
"""`vitscope analyze`'s per-feature table in a run (analysis/ANALYSIS.md); read here by name, as
saes/ sits below analysis/."""
CONSISTENCY_RESULTS = "consistency-*/consistency.json"
"""`vitscope consistency`'s results in a run, one folder per other SAE it was matched with."""


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """The last log line's held-out numbers (or none for an SAE folder without a training log),
    and what `analyze` and `consistency` left in the run: mean Moran's I, PW-MCC per pair."""
    log = read_log(run_dir)
    metrics: dict[str, Any] = _judgements(Path(run_dir))
    if not log:
        return metrics
    last = log[-1]
    return {
        **metrics,
        "explained_variance": last.heldout.explained_variance,
        "clipscope_ev": last.heldout.clipscope_ev,
        "fvu": last.heldout.fvu,
        "l0": last.heldout.l0,
        "dead_fraction": last.dead_fraction,
        "tokens": last.tokens,
        "mse_ordinary": last.heldout.mse_ordinary,
        "mse_outlier": last.heldout.mse_outlier,
    }


def _judgements(run_dir: Path) -> dict[str, Any]:
    """Mean Moran's I over the features that have one; PW-MCC against each matched SAE."""
    found: dict[str, Any] = {}
    features = run_dir / ANALYSIS_FEATURES
    if features.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(features)
        if "morans_i" in table.column_names:
            values = [v for v in table.column("morans_i").to_pylist() if v is not None]
            values = [v for v in values if not math.isnan(v)]
            if values:
                found["mean_morans_i"] = sum(values) / len(values)
    pairs = {}
    for result in sorted(run_dir.glob(CONSISTENCY_RESULTS)):
        data = json.loads(result.read_text())
        pairs[result.parent.name.removeprefix("consistency-")] = data["pw_mcc"]
    if pairs:
        found["pw_mcc"] = pairs
    return found


def model_card(card: SAECard, metrics: dict[str, Any], repo_id: str) -> str:
    """Markdown with hub metadata (front matter) for an SAE folder."""
    model = card.model or "unknown model"
    rows = [
        ("architecture", f"{card.architecture}, k = {card.options.k}, {card.n_latents:,} latents"),
        ("model", f"{model} ({card.pretrained or 'unknown weights'})"),
        ("layer", f"{card.layer} ({card.hook}: the residual stream after block {card.layer})"),
        ("tokens", f"{card.token_set}; {card.tokens_trained:,} trained"),
    ]
    training = card.training or {}
    if training.get("excluded_above_norm"):
        rows.append(
            (
                "outlier tokens",
                f"norm above {training['excluded_above_norm']:.4g} "
                f"({training['exclude_outlier_tokens']:g}x the median) left out of training and "
                "held-out numbers",
            )
        )
    if "explained_variance" in metrics:
        rows += [
            ("held-out explained variance", f"{metrics['explained_variance']:.4f}"),
            ("held-out L0", f"{metrics['l0']:.2f}"),
            ("dead latents", f"{metrics['dead_fraction']:.2%}"),
        ]
    if metrics.get("clipscope_ev") is not None:
        rows.append(("held-out explained variance, CLIP-Scope's", f"{metrics['clipscope_ev']:.4f}"))
    if metrics.get("mse_outlier") is not None:
        rows.append(
            (
                "held-out MSE, ordinary / outlier tokens",
                f"{metrics['mse_ordinary']:.4g} / {metrics['mse_outlier']:.4g}",
            )
        )
    if "mean_morans_i" in metrics:
        rows.append(("mean Moran's I (spatial coherence)", f"{metrics['mean_morans_i']:.4f}"))
    for other, pw_mcc in metrics.get("pw_mcc", {}).items():
        rows.append((f"cross-seed consistency with {other} (PW-MCC)", f"{pw_mcc:.4f}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: vitscope
tags:
- sparse-autoencoder
- vision-transformer
- interpretability
---

# {card.architecture.capitalize()} SAE on {model}, layer {card.layer}

| | |
| --- | --- |
{table}

Measured on the run's held-out images at the end of training (`log.jsonl` has every window;
`report.png` draws them). Explained variance is 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the held-out
tokens (Gao et al.'s, SAELens'); CLIP-Scope's card reports sache's mean over tokens of a per-token
ratio in standardised units, which the "CLIP-Scope's" row computes the same way.

```python
import vitscope

sae = vitscope.load_sae("{repo_id}")
codes = sae.encode(acts)  # acts: (..., {card.d_in}) residual stream, in its own units
```
"""
