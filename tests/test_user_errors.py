"""One error system: what a user can cause is one line on stderr and exit 1, never a traceback and
never an API key; anything else is a bug and keeps its traceback. Judges come from one registry."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import typer
from openai_server import serve_openai
from typer.testing import CliRunner

from conftest import run_vitscope
from vitscope.analysis.judges import JUDGES
from vitscope.analysis.sorteval_config import SortEvalConfig
from vitscope.analysis.sorteval_run import sort_eval
from vitscope.cli import app, one_line_errors
from vitscope.support.errors import BadSetting, MissingInput

KEY = "sk-user-errors-secret-4242"
KEY_VARS = ("VITSCOPE_JUDGE_API_KEY", "OPENAI_API_KEY")


def one_line(stderr: str) -> str:
    """The error line; fails unless stderr is that one line (besides progress output)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def judge_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    return {**env, "no_proxy": "*", **extra}


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(capsys: pytest.CaptureFixture):
    @one_line_errors
    def refused() -> None:
        raise MissingInput("no.toml: expected a settings file, found nothing; create it")

    @one_line_errors
    def broken() -> None:
        raise ValueError("an invariant of the code broke")

    with pytest.raises(typer.Exit) as stopped:
        refused()
    assert stopped.value.exit_code == 1
    assert capsys.readouterr().err == (
        "error: no.toml: expected a settings file, found nothing; create it\n"
    )
    with pytest.raises(ValueError, match="invariant"):
        broken()


def test_every_judge_the_flag_offers_is_registered():
    offered = get_args(get_type_hints(SortEvalConfig)["judge"])
    assert sorted(offered) == sorted(JUDGES)


def test_an_unknown_judge_is_refused_before_any_work(tmp_path: Path):
    """It used to become the CLIP judge, after the minutes of ranking images."""
    config = SortEvalConfig(run=str(tmp_path / "no-run"), judge="gpt")  # type: ignore[arg-type]
    with pytest.raises(BadSetting, match=r"^--judge 'gpt': expected one of clip, http, human"):
        sort_eval(config)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://127.0.0.1/v1", "expected an http:// or https:// URL"),
        ("127.0.0.1:8000/v1", "expected an http:// or https:// URL"),
        (f"https://judge:{KEY}@127.0.0.1/v1", "without a user:key@ part"),
        (f"https://{KEY}@127.0.0.1/v1", "without a user:key@ part"),
    ],
)
def test_a_bad_judge_url_is_one_line_without_its_key(tmp_path: Path, url: str, expected: str):
    args = ["sorteval", str(tmp_path / "no-run"), "--judge", "http", "--judge-url", url]
    result = run_vitscope(*args, env=judge_env(VITSCOPE_JUDGE_API_KEY="k"), timeout=120)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("error: --judge-url ") and expected in line
    assert KEY not in result.stdout + result.stderr


def test_a_missing_key_names_the_variables_and_the_flag_not_python(tmp_path: Path):
    args = ["sorteval", str(tmp_path / "no-run"), "--judge", "http"]
    result = run_vitscope(*args, env=judge_env(), timeout=120)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "--judge-key-env" in line and all(var in line for var in KEY_VARS)
    assert "api_key=" not in line


def test_a_judge_failing_to_the_end_is_one_line(photo_analysis: Path, tmp_path: Path):
    with serve_openai(KEY) as server:
        server.faults = ["500"] * 4
        args = [
            "sorteval",
            str(photo_analysis.parent),
            "--judge",
            "http",
            "--judge-url",
            server.url,
            "--judge-retries",
            "1",
            "--pairs",
            "4",
            "--out",
            str(tmp_path / "eval"),
        ]
        result = run_vitscope(*args, env=judge_env(VITSCOPE_JUDGE_API_KEY=KEY))
    assert result.returncode == 1
    assert "still failing after 2 attempts" in one_line(result.stderr)
    assert KEY not in result.stdout + result.stderr


def test_browse_serve_on_a_taken_port_is_one_line(photo_analysis: Path, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = photo_analysis.parent
        args = ["browse", str(run), "--out", str(tmp_path / "site"), "--serve", "--port", str(port)]
        result = run_vitscope(*args, timeout=120)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"error: --port {port}: expected a free port")


def test_weights_that_cannot_be_fetched_offline_are_one_line(photo_sae: Path, tmp_path: Path):
    args = ["monosemanticity", str(photo_sae), "--out", str(tmp_path / "ms")]
    args += ["--encoder", "ViT-B-32", "--encoder-weights", "openai", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = run_vitscope(*args, env=env)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "ViT-B-32 (openai)" in line and "run once online" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sweep", "{tmp}/sweep.toml"], "no [[sae]] tables"),
        (["download", "--url-list", "{tmp}/urls.parquet", "--out", "{tmp}/s"], "no such URL"),
        (["sorteval", "{tmp}/run", "--judge", "human", "--answers", "{tmp}/a.jsonl"], "--answers"),
        (["train", "--cache", "{tmp}/cache", "--k", "9", "--n-latents", "8"], "k must be in"),
    ],
)
def test_a_handful_of_user_errors_stay_one_line(tmp_path: Path, args: list[str], expected: str):
    """Now that the CLI catches UserError alone, the errors it used to catch as builtins are
    UserErrors: these are a sample from settings, a missing file and a TOML file."""
    (tmp_path / "sweep.toml").write_text('cache = "c"\n')
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert expected in result.output
    assert not any((tmp_path / name).exists() for name in ("s", "run", "cache"))
