"""Stage two end to end: it finds planted features, resumes a killed run exactly, sweeps share
batches without changing results, and bad input stops it in one line before any work."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_vitscope, small_config, synthetic_cache
from vitscope import load_sae
from vitscope.support.configs import load_config
from vitscope.support.run_log import LogRecord, read_log
from vitscope.train.config import TrainConfig, sweep_configs
from vitscope.train.loader import tensor_batches
from vitscope.train.run import train
from vitscope.train.synthetic import Recovery, planted_tokens, planted_world, recovery
from vitscope.train.trainer import fit, new_member

PLANTED = planted_world(n_features=256, d_in=64, seed=0, active=4)
"""bench/planted.py's data at a test's size: Zipf frequencies over 1.5 orders of magnitude, a mean
offset twice the signal's norm."""
OLD_RECIPES = {"issue 4": {"lr": 1e-4}}
"""The recipe before issue 11: Gao et al.'s learning rate at 65,536 latents whatever the width.
(Issue 11's recipe is not a setting away any more: the input scale and AuxK changed in code.)"""


@pytest.mark.parametrize("recipe", ["defaults", *OLD_RECIPES])
def test_default_recipe_recovers_rare_planted_features(recipe: str, tmp_path: Path):
    """Measured at this size with issue 23's recipe: the defaults match 97.7% of the directions
    and 93.8% of the rarest quarter (FVU 0.088); issue 4's recipe none."""
    found, fvu = planted_run(tmp_path, **OLD_RECIPES.get(recipe, {}))
    passed = found.matched >= 0.95 and found.rarest_quarter_matched >= 0.9 and fvu < 0.11
    assert passed == (recipe == "defaults"), found  # the thresholds tell the recipes apart


@pytest.mark.parametrize("batch_rank", ["floor", "raw"])
@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_batch_architectures_recover_planted_features(
    architecture: str, batch_rank: str, tmp_path: Path
):
    """The defaults' batch rule (keys relative to each token's floor) matches planted
    directions nearly as TopK does and reconstructs as well; ranking raw pre-activations (the
    paper's and SAELens' rule) starves latents and does not. Measured at this size (each at its
    automatic rate): floor 84.4% / 90.6% matched, 73.4% / 85.9% of the rarest quarter, FVU 0.083
    / 0.086 (batchtopk / matryoshka); raw 40.2% / 37.9%, 3.1% / 3.1%, FVU 0.120 / 0.118 (TopK:
    97.7%, 93.8%, 0.088)."""
    found, fvu = planted_run(tmp_path, architecture=architecture, batch_rank=batch_rank)
    passed = found.matched >= 0.7 and found.rarest_quarter_matched >= 0.45 and fvu < 0.11
    assert passed == (batch_rank == "floor"), (found, fvu)


def planted_run(tmp_path: Path, **settings: object) -> tuple[Recovery, float]:
    """Train on 400,000 planted tokens with the defaults and `settings`; recovery, held-out FVU."""
    x, _ = planted_tokens(PLANTED, 400_000, seed=1)
    heldout, _ = planted_tokens(PLANTED, 4096, seed=2)
    cfg = load_config(
        TrainConfig,
        None,
        cache="in-memory",
        out=str(tmp_path / "run"),
        tokens=len(x),
        batch_size=1024,
        n_latents=512,
        k=8,
        **settings,  # type: ignore[arg-type]
    )
    member = new_member(cfg, 64, x[:65536], torch.device("cpu"))
    fit([member], tensor_batches(x, 1024), heldout.view(64, 64, 64), slice(0, 64))
    return recovery(PLANTED, member.sae.w_dec), read_log(cfg.run_dir)[-1].heldout.fvu


def comparable(record: LogRecord) -> list[float]:
    """The numbers of a log line that must not depend on timing."""
    keys = ("tokens", "step", "lr", "mse", "aux_loss", "l0", "dead_fraction")
    return [getattr(record, k) for k in keys] + [record.heldout.fvu, *record.heldout.mse_by_token]


def cli_flags(cfg: TrainConfig) -> list[str]:
    return [
        f"--{name.replace('_', '-')}={flag_value(value)}"
        for name, value in dataclasses.asdict(cfg).items()
        if not isinstance(value, bool)
    ]


def flag_value(value: object) -> str:
    """A setting as the command line spells it (a tuple as comma-separated items)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def test_killed_training_resumes_with_the_same_losses(small_cache: Path, tmp_path: Path):
    uninterrupted = small_config(small_cache, tmp_path / "whole", tokens=81_920)
    killed = dataclasses.replace(uninterrupted, out=str(tmp_path / "killed"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitscope", "train", *cli_flags(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second_checkpoint = killed.run_dir / "checkpoints" / f"tokens_{2 * 4096:012d}"
    deadline = time.monotonic() + 120
    while not second_checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert second_checkpoint.exists() and not (killed.run_dir / "sae.safetensors").exists()
    log_before = read_log(killed.run_dir)
    assert log_before[-1].tokens < uninterrupted.tokens

    train([dataclasses.replace(killed, resume=True)])
    train([uninterrupted])
    resumed, whole = read_log(killed.run_dir), read_log(uninterrupted.run_dir)
    assert [r.tokens for r in resumed] == [r.tokens for r in whole]
    for got, expected in zip(resumed, whole, strict=True):
        torch.testing.assert_close(comparable(got), comparable(expected), rtol=1e-4, atol=1e-6)
    final = {}
    for run in (killed, uninterrupted):
        final[run.out] = json.loads((run.run_dir / "cfg.json").read_text())
        assert (run.run_dir / "sae.safetensors").exists() and (run.run_dir / "report.png").exists()
    assert final[killed.out]["input_scale"] == final[uninterrupted.out]["input_scale"]


def test_sweep_shares_batches_without_changing_any_sae(small_cache: Path, tmp_path: Path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        f'cache = "{small_cache}"\nlayer = 3\nout = "{tmp_path / "sweep"}"\ntokens = 8192\n'
        "batch_size = 128\nn_latents = 64\nk_aux = 8\nbuffer_tokens = 500\nheldout_fraction = 0.1\n"
        "eval_images = 8\nlog_every = 2048\ndevice = 'cpu'\n"
        "[[sae]]\nk = 4\nlr = 1e-3\n\n[[sae]]\nk = 8\nlr = 3e-4\n"
    )
    members = sweep_configs(sweep_file)
    assert [m.run_dir.name for m in members] == ["k4_lr0.001", "k8_lr0.0003"]
    train(members)
    alone = dataclasses.replace(members[1], out=str(tmp_path / "alone"))
    train([alone])
    together, solo = read_log(members[1].run_dir), read_log(alone.run_dir)
    for got, expected in zip(together, solo, strict=True):
        torch.testing.assert_close(comparable(got), comparable(expected), rtol=1e-4, atol=1e-6)
    assert read_log(members[0].run_dir)[-1].l0 <= 4


def test_clip_scope_preset_trains_its_recipe_under_explicit_flags(small_cache: Path, tmp_path):
    out = tmp_path / "clipscope"
    flags = ["--cache", str(small_cache), "--layer", "3", "--out", str(out), "--tokens", "4096"]
    sizes = ["--batch-size", "128", "--n-latents", "64", "--k", "4", "--eval-images", "4"]
    result = run_vitscope("train", "--preset", "clip-scope", "--lr", "1e-3", *flags, *sizes)
    assert result.returncode == 0, result.stderr
    card = json.loads((out / "cfg.json").read_text())
    assert (card["activation"], card["input_norm"]) == ("none", "standardize")
    training = card["training"]
    assert training["preset"] == "clip-scope" and training["lr"] == 1e-3  # the flag wins
    assert (training["aux_coefficient"], training["unit_decoder"]) == (0.0, False)
    sae = load_sae(out)
    acts = torch.randn(3, 5, 16)
    assert sae.input_norm == "standardize" and sae(acts).shape == acts.shape
    assert "clip-scope" in run_vitscope("train", "--help").stdout


def test_sweep_refuses_settings_that_cannot_differ(tmp_path: Path):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text('cache = "c"\n[[sae]]\nk = 4\n[[sae]]\nlayer = 5\n')
    with pytest.raises(
        ValueError, match=r"may only set architecture, k, n_latents, k_aux, lr, seed, not layer"
    ):
        sweep_configs(sweep_file)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer": 7}, "expected layer 7, found layers 3"),
        ({"d_in": 1024}, "layer 3 has d_model 16, but the config says d_in = 1024"),
        ({"resume": True}, "no checkpoint to resume from; start without --resume"),
    ],
)
def test_bad_training_input_is_one_line(small_cache: Path, tmp_path: Path, changes, message):
    with pytest.raises(Exception, match=message) as err:
        train([small_config(small_cache, tmp_path / "run", **changes)])
    assert "\n" not in str(err.value)


def test_cache_still_being_written_is_refused(tmp_path: Path):
    path = synthetic_cache(tmp_path / "cache", n_images=40, uncommitted_shards=1)
    result = run_vitscope("train", "--cache", str(path), "--layer", "3", "--tokens", "4096")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {path}: 1 of 3 shards are not committed (still being written, or failed: see "
        "`vitscope cache-info`); wait for `vitscope cache` to finish, or pass --allow-partial to "
        "train on the committed rows"
    )


def test_a_run_records_its_cache_absolute_and_a_moved_one_names_cfg_json(
    small_cache: Path, tmp_path: Path
):
    """Typed relative, recorded absolute: the run's commands work from any folder. An old card
    with a relative path still works where it was typed, and elsewhere says which file named
    the cache and which flag overrides it."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(small_cache, work / "cache")
    flags = ["--cache", "cache", "--layer", "3", "--out", "run", "--tokens", "4096"]
    sizes = ["--batch-size", "128", "--n-latents", "64", "--k", "4", "--eval-images", "4"]
    trained = run_vitscope("train", *flags, *sizes, "--device", "cpu", cwd=work)
    assert trained.returncode == 0, trained.stderr
    card_path = work / "run" / "cfg.json"
    card = json.loads(card_path.read_text())
    assert card["training"]["cache"] == str((work / "cache").resolve())

    analyze = ["analyze", str(work / "run"), "--grids", "0", "--device", "cpu"]
    analysed = run_vitscope(*analyze, "--out", str(tmp_path / "a1"), cwd=elsewhere)
    assert analysed.returncode == 0, analysed.stderr

    card_path.write_text(json.dumps({**card, "training": {**card["training"], "cache": "cache"}}))
    refused = run_vitscope(*analyze, "--out", str(tmp_path / "a2"), cwd=elsewhere)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: {card_path}: training.cache names the cache cache, which is not there (a "
        f"relative path, read from {elsewhere}); pass --cache CACHE where it is now"
    ]
    here = run_vitscope(*analyze, "--out", str(tmp_path / "a3"), cwd=work)
    assert here.returncode == 0, here.stderr
