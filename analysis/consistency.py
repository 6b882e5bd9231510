"""`vitscope consistency RUN_A RUN_B`: how far two SAEs of one layer and width (e.g. two seeds of
a sweep) learned the same dictionary.

The latents are matched one-to-one by the cosine of their decoder rows (analysis/matching.py);
reported are PW-MCC, the mean cosine of the matched pairs (~0.80 for TopK SAEs on language
models, arXiv 2505.20254), the share of latents matched above 0.9, and that share by firing
frequency (analysis/latent_frequencies.py: from each run's analysis, else a sample of the
cache). Written: consistency.json (the numbers), consistency.md,
consistency.png (matched cosines; share above 0.9 by frequency) and matches.parquet (each latent
of A, its partner in B, their cosine and frequencies).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitscope.analysis.compare import check_distinct
from vitscope.analysis.config import ConsistencyConfig
from vitscope.analysis.latent_frequencies import FrequencyBin, firing_frequencies, frequency_bins
from vitscope.analysis.matching import EXACT, Matching, match_decoders
from vitscope.saes.folder import CARD_FILE, read_card
from vitscope.saes.load import load_sae
from vitscope.saes.sae import SAE
from vitscope.support.devices import resolve_device
from vitscope.support.errors import BadSetting
from vitscope.support.outputs import check_output_path, holding
from vitscope.support.progress import status
from vitscope.support.records import absolute

MATCHED_ABOVE = 0.9
"""A latent counts as found again when its match's decoder cosine is above this."""
CONSISTENCY_FILE = "consistency.json"
MATCHES_FILE = "matches.parquet"
CONSISTENCY_FOLDER = holding("a consistency result", CONSISTENCY_FILE)


@dataclass(frozen=True)
class ConsistencyResult:
    """consistency.json."""

    run_a: str
    run_b: str
    layer: int | None
    d_in: int
    n_latents: int
    method: str
    """How the latents were matched (analysis/matching.py: EXACT or SPARSE)."""
    seconds: float
    """Wall time of the matching."""
    pw_mcc: float
    share_above: float
    threshold: float = MATCHED_ABOVE
    frequency_a: str = ""
    """Where A's firing frequencies came from (or why there are none)."""
    frequency_b: str = ""
    bins: tuple[FrequencyBin, ...] = ()

    def summary(self) -> str:
        return summary(self.pw_mcc, self.share_above, self.n_latents, self.method, self.seconds)

    def markdown(self) -> str:
        lines = [
            f"# Consistency of {self.run_a} and {self.run_b}",
            "",
            f"Layer {self.layer}, d_in {self.d_in}: {self.summary()}.",
            "",
            f"Matching: {self.method}.",
            f"Firing frequencies: A from {self.frequency_a}; B from {self.frequency_b}.",
            "",
            f"| run | tokens fired on | latents | share matched above {self.threshold} |",
            "| --- | --- | --- | --- |",
            *(f"| {b.run} | {b.label} | {b.features:,} | {b.share_above:.3f} |" for b in self.bins),
        ]
        return "\n".join(lines) + "\n"


def summary(pw_mcc: float, share: float, n_latents: int, method: str, seconds: float) -> str:
    """One line of the numbers, for the command, the sweep and `compare`."""
    how = "exact Hungarian" if method == EXACT else "sparse Hungarian"
    return (
        f"PW-MCC {pw_mcc:.4f}, {share:.1%} of {n_latents:,} latents matched above "
        f"{MATCHED_ABOVE} ({how}, {seconds:.1f} s)"
    )


def consistency(config: ConsistencyConfig) -> tuple[ConsistencyResult, Path]:
    """Match the two SAEs, measure, write the result folder; returns the result and the folder."""
    out = config.out_dir
    check_output_path(out, "--out", overwrite=config.overwrite, own=CONSISTENCY_FOLDER)
    check_distinct([Path(config.run_a), Path(config.run_b)])
    device = resolve_device(config.device)
    saes = [load_sae(run, device=device) for run in (config.run_a, config.run_b)]
    check_comparable((config.run_a, config.run_b), saes)
    matching, seconds = match_saes(*saes)
    found = firing_frequencies(config, saes)
    partner_of_b = np.argsort(matching.partner)
    cosine_of = {"A": matching.cosine, "B": matching.cosine[partner_of_b]}
    bins = [
        b
        for run, (freq, _) in zip("AB", found, strict=True)
        if freq is not None
        for b in frequency_bins(run, freq, cosine_of[run] > MATCHED_ABOVE)
    ]
    card = saes[0].card
    result = ConsistencyResult(
        run_a=absolute(config.run_a),
        run_b=absolute(config.run_b),
        layer=card.layer,
        d_in=card.d_in,
        n_latents=card.n_latents,
        method=matching.method,
        seconds=seconds,
        pw_mcc=matching.pw_mcc,
        share_above=matching.share_above(MATCHED_ABOVE),
        frequency_a=found[0][1],
        frequency_b=found[1][1],
        bins=tuple(bins),
    )
    write_result(out, result, matching, [freq for freq, _ in found])
    return result, out


def check_comparable(refs: tuple[str, str], saes: list[SAE]) -> None:
    """Only SAEs of one layer, d_in and width match one-to-one."""
    shapes = [(s.card.d_in, s.card.n_latents, s.card.layer) for s in saes]
    if shapes[0] == shapes[1]:
        return
    said = [
        f"d_in {d_in}, {n:,} latents, layer {layer} ({card_of(ref)})"
        for (d_in, n, layer), ref in zip(shapes, refs, strict=True)
    ]
    raise BadSetting(
        f"expected two SAEs of one layer, d_in and width, found {said[0]} and {said[1]}; "
        "compare SAEs trained on the same layer with the same n_latents (e.g. two seeds)"
    )


def card_of(ref: str | Path) -> str:
    return str(Path(ref) / CARD_FILE) if Path(ref).is_dir() else f"the card of {ref}"


def match_saes(sae_a: SAE, sae_b: SAE) -> tuple[Matching, float]:
    """The matching of two SAEs' decoder rows, and its wall time in seconds."""
    status(f"matching {sae_a.n_latents:,} latents by decoder cosine")
    started = time.perf_counter()
    matching = match_decoders(sae_a.w_dec, sae_b.w_dec)
    return matching, time.perf_counter() - started


def write_result(
    out: Path, result: ConsistencyResult, matching: Matching, freqs: list[np.ndarray | None]
) -> None:
    """matches.parquet, consistency.md and .png, then consistency.json (it marks the folder)."""
    from vitscope.analysis.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    n = result.n_latents
    missing = np.full(n, np.nan)
    freq_a = missing if freqs[0] is None else freqs[0]
    freq_b = missing if freqs[1] is None else freqs[1][matching.partner]
    table = pa.table(
        {
            "feature_a": np.arange(n, dtype=np.int32),
            "feature_b": matching.partner.astype(np.int32),
            "cosine": matching.cosine.astype(np.float32),
            "freq_tokens_a": freq_a,
            "freq_tokens_b": freq_b,
        }
    )
    pq.write_table(table, out / MATCHES_FILE)
    (out / "consistency.md").write_text(result.markdown())
    save_figure(consistency_figure(result, matching), out / "consistency.png")
    (out / CONSISTENCY_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")


def consistency_figure(result: ConsistencyResult, matching: Matching):
    """Left: the matched pairs' cosines. Right: share matched above the threshold by frequency."""
    from vitscope.analysis.plots import plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    left.hist(matching.cosine, bins=50, range=(min(0.0, matching.cosine.min()), 1.0))
    left.axvline(result.threshold, color="grey", ls=":")
    left.set(xlabel="decoder cosine of the matched pair", ylabel="latents")
    left.set_title(f"PW-MCC {result.pw_mcc:.3f}, {result.share_above:.1%} above {result.threshold}")
    labels = [
        b.label for b in sorted({b.low: b for b in result.bins}.values(), key=lambda b: b.low)
    ]
    for offset, run in ((-0.2, "A"), (0.2, "B")):
        mine = {b.label: b for b in result.bins if b.run == run}
        shown = [(i + offset, mine[label]) for i, label in enumerate(labels) if label in mine]
        if shown:
            x, bins = zip(*shown, strict=True)
            bars = right.bar(x, [b.share_above for b in bins], width=0.4, label=f"run {run}")
            right.bar_label(bars, [f"{b.features:,}" for b in bins], fontsize=7)
    right.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    right.set(xlabel="share of tokens the latent fires on", ylim=(0, 1))
    right.set_title(f"share matched above {result.threshold} (latents on the bars)", fontsize=10)
    if result.bins:
        right.legend()
    fig.suptitle(f"A: {result.run_a}\nB: {result.run_b}", fontsize=8)
    return fig


def pair_line(run_a: Path, run_b: Path, device: str = "cpu") -> str:
    """One line on two SAE folders' consistency, decoders only (no frequencies): the saved result
    of `vitscope consistency` when its default folder holds one for this pair, else measured."""
    saved = ConsistencyConfig(run_a=str(run_a), run_b=str(run_b)).out_dir / CONSISTENCY_FILE
    data = json.loads(saved.read_text()) if saved.is_file() else {}
    if data.get("run_b") == absolute(str(run_b)):
        keys = ("pw_mcc", "share_above", "n_latents", "method", "seconds")
        return f"{run_a} ~ {run_b}: {summary(*(data[key] for key in keys))}"
    saes = [load_sae(run, device=device) for run in (run_a, run_b)]
    check_comparable((str(run_a), str(run_b)), saes)
    matching, seconds = match_saes(*saes)
    numbers = (matching.pw_mcc, matching.share_above(MATCHED_ABOVE), saes[0].n_latents)
    return f"{run_a} ~ {run_b}: {summary(*numbers, matching.method, seconds)}"


def seed_pairs(configs: list, run_dirs: list[Path]) -> list[tuple[Path, Path]]:
    """Pairs of a sweep's run folders whose training configs differ only in seed (and folder)."""
    groups: list[tuple[dict, list[Path]]] = []
    for config, run in zip(configs, run_dirs, strict=True):
        rest = {k: v for k, v in vars(config).items() if k not in ("seed", "out")}
        group = next((runs for key, runs in groups if key == rest), None)
        if group is None:
            groups.append((rest, [run]))
        else:
            group.append(run)
    return [pair for _, runs in groups for pair in itertools.combinations(runs, 2)]


def same_shape_pairs(runs: list[Path]) -> list[tuple[Path, Path]]:
    """Pairs of SAE folders of one layer, d_in and width (what `compare` matches)."""
    cards = {run: read_card(run / CARD_FILE) for run in runs}
    shape = {run: (c.layer, c.d_in, c.n_latents) for run, c in cards.items()}
    return [(a, b) for a, b in itertools.combinations(runs, 2) if shape[a] == shape[b]]
