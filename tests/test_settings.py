"""Every numeric setting of every command has a lower bound, and the command line refuses a value
below it in one line before any work; output paths that cannot be used are refused up front."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import get_type_hints

import pytest
from typer.testing import CliRunner

from conftest import cache_config, cli_args, run_vitscope
from vitscope.cli import app
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.support.configs import Above, field_bounds
from vitscope.train.config import TrainConfig

COMMANDS = {"download": DownloadConfig, "cache": CacheConfig, "train": TrainConfig}
REQUIRED = {"download": ["--url-list", "urls.csv"], "train": ["--cache", "c"], "cache": []}


def numeric_fields(cls: type) -> list[str]:
    hints = get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def below(bound: object, kind: type) -> str:
    value = bound.value if isinstance(bound, Above) else bound.value - (1 if kind is int else 0.5)
    return str(kind(value))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_numeric_setting_declares_a_lower_bound(command: str):
    cls = COMMANDS[command]
    assert sorted(field_bounds(cls)) == sorted(numeric_fields(cls))


CASES = [(command, name) for command, cls in COMMANDS.items() for name in numeric_fields(cls)]


@pytest.mark.parametrize(("command", "name"), CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_a_value_below_the_bound_is_refused_in_one_line(command: str, name: str):
    cls = COMMANDS[command]
    bound = field_bounds(cls)[name]
    value = below(bound, get_type_hints(cls)[name])
    flag = "--" + name.replace("_", "-")
    result = CliRunner().invoke(app, [command, *REQUIRED[command], flag, value])
    assert result.exit_code == 2
    assert f"{name} must be {bound}, not {value}" in result.output
    with pytest.raises(ValueError, match=f"^{name} must be {bound}"):
        cls(**{**_required_values(command), name: get_type_hints(cls)[name](value)})


def _required_values(command: str) -> dict[str, str]:
    flags = REQUIRED[command]
    return {
        flag[2:].replace("-", "_"): value
        for flag, value in zip(flags[::2], flags[1::2], strict=True)
    }


def test_a_negative_layer_is_refused():
    result = CliRunner().invoke(app, ["cache", "--layers", "2,-1"])
    assert result.exit_code == 2 and "layers must be at least 0, not -1" in result.output


def test_batch_size_zero_no_longer_hangs(tmp_path: Path):
    started = time.monotonic()
    result = run_vitscope("train", "--cache", str(tmp_path), "--batch-size", "0", timeout=60)
    assert result.returncode == 2 and "batch_size must be at least 1, not 0" in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda p: p.write_text("x"),
            "expected a folder for the cache (new, or a cache to resume), found a file",
        ),
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")),
            "expected a new or empty folder, or a cache to resume, found a folder of other files "
            "(no zarr.json)",
        ),
    ],
    ids=["file", "other-folder"],
)
def test_an_unusable_cache_path_is_refused_before_the_model_loads(
    shards: Path, tmp_path: Path, make, expected: str
):
    out = tmp_path / "out"
    make(out)
    result = run_vitscope(*cli_args(cache_config(shards, out)))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {out}: {expected}; choose another --out"
    assert "loading" not in result.stderr


def test_a_run_folder_that_is_a_file_is_refused(tmp_path: Path):
    (tmp_path / "run").write_text("x")
    result = run_vitscope("train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'run'}: expected a run folder, found a file; choose another --out"
    )


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["grid", ".", "--feature", "-1"], "--feature"), (["browse", ".", "--port", "-1"], "--port")],
)
def test_numeric_options_outside_configs_have_their_bounds_too(args: list[str], flag: str):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    expected = f"Invalid value for '{flag}': Input should be greater than or equal to 0"
    assert expected in result.output
