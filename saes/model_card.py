"""The README.md a pushed SAE carries: what it reads, how well it reconstructs (measured numbers
from the run's own log), and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitscope.saes.card import SAECard
from vitscope.support.run_log import read_log


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """The last log line's held-out numbers, or {} for an SAE folder without a training log."""
    log = read_log(run_dir)
    if not log:
        return {}
    last = log[-1]
    return {
        "explained_variance": last.heldout.explained_variance,
        "clipscope_ev": last.heldout.clipscope_ev,
        "fvu": last.heldout.fvu,
        "l0": last.heldout.l0,
        "dead_fraction": last.dead_fraction,
        "tokens": last.tokens,
    }


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
    if metrics:
        rows += [
            ("held-out explained variance", f"{metrics['explained_variance']:.4f}"),
            ("held-out L0", f"{metrics['l0']:.2f}"),
            ("dead latents", f"{metrics['dead_fraction']:.2%}"),
        ]
    if metrics.get("clipscope_ev") is not None:
        rows.append(("held-out explained variance, CLIP-Scope's", f"{metrics['clipscope_ev']:.4f}"))
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
