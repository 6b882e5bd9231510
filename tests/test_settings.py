"""Every numeric setting of every command has a lower bound, and the command line refuses a value
below it in one line before any work; output paths that cannot be used are refused up front."""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path
from typing import get_type_hints

import pytest
from typer.testing import CliRunner

from conftest import cache_config, cli_args, run_vitscope
from vitscope.analysis.config import (
    AnalyzeConfig,
    BrowseConfig,
    CompareConfig,
    ConsistencyConfig,
    GridConfig,
    MonosemanticityConfig,
    SearchConfig,
    SpliceConfig,
)
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.cache_spec.info import CacheInfoConfig
from vitscope.cli import app
from vitscope.demo import DemoConfig
from vitscope.pipeline.config import CacheConfig, DownloadConfig
from vitscope.saes.config import ExportConfig, PullConfig, PushConfig
from vitscope.support.configs import Above, field_bounds
from vitscope.train.config import SweepConfig, TrainConfig

COMMANDS = {
    "download": DownloadConfig,
    "cache": CacheConfig,
    "train": TrainConfig,
    "analyze": AnalyzeConfig,
    "monosemanticity": MonosemanticityConfig,
    "sorteval": SortEvalConfig,
    "compare": CompareConfig,
    "consistency": ConsistencyConfig,
    "grid": GridConfig,
    "sweep": SweepConfig,
    "cache-info": CacheInfoConfig,
    "demo": DemoConfig,
    "push": PushConfig,
    "pull": PullConfig,
    "to-saelens": ExportConfig,
    "browse": BrowseConfig,
    "search": SearchConfig,
    "splice": SpliceConfig,
}
"""Every command, with the config dataclass its flags, TOML keys and help derive from."""
REQUIRED = {
    "download": ["--url-list", "urls.csv"],
    "train": ["--cache", "c"],
    "cache": [],
    "analyze": ["run"],
    "monosemanticity": ["run"],
    "sorteval": ["run"],
    "grid": ["analysis", "--feature", "0"],
    "consistency": ["run_a", "run_b"],
    "browse": ["run"],
    "search": ["run", "text"],
    "splice": ["run"],
    "cache-info": ["path"],
}
"""The arguments each needs besides the one under test: flags with values, or the positional RUN."""


def test_every_command_derives_from_a_config():
    commands = {c.name for c in app.registered_commands}
    configs = {c.name for c in app.registered_commands if "config" in _parameters(c.callback)}
    assert configs == commands == set(COMMANDS)


@pytest.mark.parametrize("name", ["shards", "device", "overwrite", "resume"])
def test_shared_settings_have_one_help_text(name: str):
    """Declared once (support/shared_options.py), so every command shows the same help."""
    helps = {
        param.help
        for command in app.registered_commands
        for param in typer_params(command)
        if param.name == name and command.name != "cache"  # its --shards is its input folder
    }
    assert len(helps) == 1, helps


def typer_params(command) -> list:
    from typer.main import get_command

    return get_command(app).commands[command.name].params


def _parameters(callback) -> set[str]:
    return set(inspect.signature(callback).parameters)


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


def _required_values(command: str) -> dict[str, object]:
    args = REQUIRED[command]
    values: dict[str, object] = {}
    required = (
        f.name for f in dataclasses.fields(COMMANDS[command]) if f.default is dataclasses.MISSING
    )
    while args and not args[0].startswith("--"):
        values[next(required)], args = args[0], args[1:]
    pairs = zip(args[::2], args[1::2], strict=True)
    hints = get_type_hints(COMMANDS[command])
    values.update({f[2:].replace("-", "_"): hints[f[2:].replace("-", "_")](v) for f, v in pairs})
    return values


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


OUTPUTS = {
    "train": (["train", "--cache", "c", "--out"], "--out"),
    "download": (["download", "--url-list", "URLS", "--out"], "--out"),
    "analyze": (["analyze", "run", "--out"], "--out"),
    "monosemanticity": (["monosemanticity", "run", "--out"], "--out"),
    "sorteval": (["sorteval", "run", "--out"], "--out"),
    "compare": (["compare", "run", "--out"], "--out"),
    "consistency": (["consistency", "run_a", "run_b", "--out"], "--out"),
    "pull": (["pull", "user/sae", "--out"], "--out"),
    "to-saelens": (["to-saelens", "run"], "OUT"),
    "grid": (["grid", "analysis", "--feature", "0", "--out"], "--out"),
    "splice": (["splice", "run", "--out"], "--out"),
}
"""Each command that writes, with the argument naming where: given a file (or a path under one)."""


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_output_path_that_is_a_file_is_refused_before_any_work(
    command: str, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    Path("URLS").write_text("url\n")
    Path("taken").write_text("x")
    args, flag = OUTPUTS[command]
    into = "taken/out.png" if command in ("grid", "splice") else "taken"  # they write one file
    result = CliRunner().invoke(app, [*args, into])
    assert result.exit_code == 1, result.output
    found = "a file" if into == "taken" else "a file at taken"
    assert result.output.strip().splitlines() == [
        f"error: {into}: expected a folder to write into, found {found}; choose another {flag}"
    ]
