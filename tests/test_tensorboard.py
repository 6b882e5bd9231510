"""--tensorboard: the event files hold the numbers of log.jsonl, one point per log line, also after
a resume; without the flag nothing is written, and without the package training never starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import small_config
from vitscope.support import extras
from vitscope.support.extras import MissingExtraError
from vitscope.support.run_log import read_log
from vitscope.train.config import TrainConfig
from vitscope.train.run import train
from vitscope.train.tensorboard import SCALARS


def config(cache: Path, out: Path, **changes: object) -> TrainConfig:
    settings = {"tokens": 4_096, "checkpoint_every": 2_048, "tensorboard": True, **changes}
    return small_config(cache, out, **settings)


def read_events(run_dir: Path) -> event_accumulator.EventAccumulator:
    """The event files as TensorBoard reads them, offline, keeping every point."""
    everything = {event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), everything)
    return events.Reload()


def test_every_curve_is_the_log(small_cache: Path, tmp_path: Path):
    (run_dir,) = train([config(small_cache, tmp_path / "run")])
    log = read_log(run_dir)
    events = read_events(run_dir)
    assert sorted(events.Tags()["scalars"]) == sorted(SCALARS)
    for tag, value_of in SCALARS.items():
        points = events.Scalars(tag)
        assert [p.step for p in points] == [r.tokens for r in log], tag
        expected = [value_of(r) for r in log]
        assert [p.value for p in points] == pytest.approx(expected, rel=1e-6, abs=1e-9), tag
    spread = events.Histograms("heldout/mse_by_token")
    assert [h.step for h in spread] == [r.tokens for r in log]
    assert spread[-1].histogram_value.num == len(log[-1].heldout.mse_by_token)


def test_a_resumed_run_shows_each_step_once_with_the_new_values(small_cache: Path, tmp_path: Path):
    cfg = config(small_cache, tmp_path / "run")
    train([cfg])  # its newest checkpoint is at 2,048 tokens: resuming redoes the second half
    train([dataclasses.replace(cfg, resume=True)])
    log = read_log(cfg.run_dir)
    assert len(list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    points = read_events(cfg.run_dir).Scalars("speed/tokens_per_s")
    assert [p.step for p in points] == [r.tokens for r in log]
    assert [p.value for p in points] == pytest.approx([r.tokens_per_s for r in log], rel=1e-6)


def test_off_by_default_writes_no_event_files(small_cache: Path, tmp_path: Path):
    cfg = config(small_cache, tmp_path / "run", tokens=1_024, tensorboard=False)
    assert TrainConfig(cache="c").tensorboard is False
    (run_dir,) = train([cfg])
    assert (run_dir / "log.jsonl").exists() and not (run_dir / "tensorboard").exists()


def test_without_the_package_training_never_starts(
    small_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(extras, "has_module", lambda module: module != "tensorboard")
    cfg = config(small_cache, tmp_path / "run")
    with pytest.raises(MissingExtraError, match=r"--tensorboard.*vitscope\[tensorboard\]"):
        train([cfg])
    assert not (cfg.run_dir / "log.jsonl").exists()
    assert not (cfg.run_dir / "checkpoints").exists()


def test_the_core_never_imports_torch_tensorboard():
    code = (
        "import sys, vitscope, vitscope.train.run, vitscope.train.trainer; "
        "assert 'torch.utils.tensorboard' not in sys.modules; "
        "assert 'tensorboard' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
