"""Nothing overwritten, nothing silent (issue 24): every command refuses, in one line and before
any work, a missing input, an output it did not write and a setting below its bound, and leaves
every file that was there byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import run_vitscope
from vitscope.cli import app
from vitscope.demo import DEMO_FOLDER, DEMO_MARKER
from vitscope.saes.architectures import ARCHITECTURES, build_sae
from vitscope.saes.card import SAECard
from vitscope.saes.folder import save_sae_folder
from vitscope.support.errors import OutputExists
from vitscope.support.outputs import check_output_path


def tree(root: Path) -> dict[str, str]:
    """Every file under `root`, by relative path, with the SHA-256 of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tiny_sae(folder: Path) -> Path:
    """A real SAE folder (cfg.json + sae.safetensors): 16 inputs, 32 latents, k = 4."""
    options = ARCHITECTURES["topk"].Options(k=4)
    sae = build_sae(SAECard(16, 32, options), seed=0)
    save_sae_folder(folder, sae, sae.card)
    return folder


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder: an SAE, inputs of each kind, and outputs no command wrote."""
    monkeypatch.chdir(tmp_path)
    tiny_sae(tmp_path / "sae")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine, not vitscope's\n")
    (tmp_path / "notes.png").write_bytes(b"not a picture vitscope drew")
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    (tmp_path / "sweep" / "k4").mkdir(parents=True)  # where the sweep's one SAE would train
    (tmp_path / "sweep" / "k4" / "notes.txt").write_text("mine\n")
    (tmp_path / "sweep.toml").write_text('cache = "c"\nout = "sweep"\n[[sae]]\nk = 4\n')
    (tmp_path / "bad-sweep.toml").write_text('cache = "c"\nbatch_size = 0\n[[sae]]\nk = 4\n')
    return tmp_path


MISSING = {
    "download": ["download", "--url-list", "no-such.csv"],
    "cache": ["cache", "--shards", "no-such", "--out", "c"],
    "train": ["train", "--cache", "no-such", "--out", "r"],
    "analyze": ["analyze", "no-such"],
    "monosemanticity": ["monosemanticity", "no-such"],
    "sorteval": ["sorteval", "no-such"],
    "compare": ["compare", "no-such", "sae"],
    "consistency": ["consistency", "no-such", "sae"],
    "grid": ["grid", "no-such", "--feature", "0"],
    "sweep": ["sweep", "no-such.toml"],
    "cache-info": ["cache-info", "no-such"],
    "push": ["push", "no-such", "--repo", "user/sae"],
    "to-saelens": ["to-saelens", "no-such", "out"],
    "browse": ["browse", "no-such"],
    "search": ["search", "no-such", "a cat"],
    "splice": ["splice", "no-such"],
}
"""Each command with an input that is not there (demo has none; pull's is the hub, below)."""

TAKEN = {
    "download": ["download", "--url-list", "urls.csv", "--out", "taken"],
    "cache": ["cache", "--shards", "shards", "--out", "taken"],
    "train": ["train", "--cache", "no-such", "--out", "taken"],
    "analyze": ["analyze", "sae", "--out", "taken"],
    "monosemanticity": ["monosemanticity", "sae", "--out", "taken"],
    "sorteval": ["sorteval", "sae", "--out", "taken"],
    "compare": ["compare", "sae", "sae", "--out", "taken"],
    "consistency": ["consistency", "sae", "sae", "--out", "taken"],
    "grid": ["grid", "sae", "--feature", "0", "--out", "notes.png"],
    "sweep": ["sweep", "sweep.toml"],
    "cache-info": ["cache-info", "no-such", "--plot", "notes.png"],
    "demo": ["demo", "--workdir", "taken"],
    "pull": ["pull", "user/sae", "--out", "taken"],
    "to-saelens": ["to-saelens", "sae", "taken"],
    "browse": ["browse", "sae", "--out", "taken"],
    "splice": ["splice", "sae", "--out", "notes.png"],
}
"""Each command writing where something it did not write is (push and search write nothing
here)."""
TAKEN_SAID = {"cache": "or a cache to resume, found a folder of other files"}
"""A cache is written into only when new or its own (resumed), never overwritten."""

BELOW_BOUND = {
    "download": ["download", "--url-list", "urls.csv", "--image-size", "0"],
    "cache": ["cache", "--shards", "shards", "--batch-size", "0"],
    "train": ["train", "--cache", "c", "--k", "0"],
    "analyze": ["analyze", "sae", "--top-n", "0"],
    "monosemanticity": ["monosemanticity", "sae", "--batch-size", "0"],
    "sorteval": ["sorteval", "sae", "--pairs", "0"],
    "grid": ["grid", "sae", "--feature", "-1"],
    "consistency": ["consistency", "sae", "sae", "--images", "-1"],
    "sweep": ["sweep", "bad-sweep.toml"],
    "browse": ["browse", "sae", "--port", "-1"],
    "search": ["search", "sae", "a cat", "--top", "0"],
    "splice": ["splice", "sae", "--images", "0"],
}
"""Each command with a numeric setting, one below its bound (the others have none)."""

CASES = [
    *[(command, "missing", args, "no-such") for command, args in MISSING.items()],
    *[
        (command, "taken", args, TAKEN_SAID.get(command, "--overwrite"))
        for command, args in TAKEN.items()
    ],
    *[(command, "bound", args, "must be") for command, args in BELOW_BOUND.items()],
]


def test_the_table_drives_every_command():
    commands = {command.name for command in app.registered_commands}
    covered = {command for command, *_ in CASES} | {"pull"}  # pull's missing input: the hub
    assert covered == commands
    assert set(TAKEN) == commands - {"push", "search"}  # they write nothing here


@pytest.mark.parametrize(
    ("command", "case", "args", "said"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_bad_input_is_one_line_and_changes_nothing(
    workspace: Path, command: str, case: str, args: list[str], said: str
):
    before = tree(workspace)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and said in errors[0], result.output
    assert tree(workspace) == before


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    return env


@pytest.mark.parametrize("overwrite", [False, True], ids=["pulled-before", "overwrite"])
def test_pull_from_an_unreachable_hub_fails_whatever_out_holds(tmp_path: Path, overwrite: bool):
    out = tiny_sae(tmp_path / "out")
    (out / ".cache" / "huggingface").mkdir(parents=True)  # as an earlier pull leaves it
    before = tree(out)
    args = ["pull", "nobody/no-such", "--out", str(out), *(["--overwrite"] * overwrite)]
    result = run_vitscope(*args, env=offline_env(tmp_path), timeout=120)
    assert result.returncode == 1, result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "cannot reach the hub at http://127.0.0.1:" in line
    assert "->" not in result.stdout and tree(out) == before


def test_to_saelens_into_the_run_itself_keeps_the_run(workspace: Path):
    before = tree(workspace / "sae")
    result = CliRunner().invoke(app, ["to-saelens", "sae", "sae"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: sae: expected a new or empty folder, or a SAELens export by vitscope to write "
        "again, found a folder of other files (not a SAELens export by vitscope); choose "
        "another OUT, or pass --overwrite to write into it anyway"
    )
    assert tree(workspace / "sae") == before


def test_to_saelens_writes_its_own_export_again(workspace: Path):
    first = CliRunner().invoke(app, ["to-saelens", "sae", "export"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["to-saelens", "sae", "export"])
    assert again.exit_code == 0, again.output
    cfg = json.loads((workspace / "export" / "cfg.json").read_text())
    assert cfg["metadata"]["exported_by"] == "vitscope"


def test_splice_does_not_replace_the_runs_card(workspace: Path):
    before = tree(workspace / "sae")
    result = CliRunner().invoke(app, ["splice", "sae", "--out", "sae/cfg.json"])
    assert result.exit_code == 1
    assert result.output.startswith("error: sae/cfg.json: expected a new file, or a splice result")
    assert tree(workspace / "sae") == before


def test_grid_does_not_replace_the_training_report(workspace: Path):
    (workspace / "sae" / "report.png").write_bytes(b"\x89PNG the training report")
    before = tree(workspace / "sae")
    result = CliRunner().invoke(app, ["grid", "sae", "--feature", "0", "--out", "sae/report.png"])
    assert result.exit_code == 1
    assert "expected a new file, or a feature grid to write again" in result.output
    assert tree(workspace / "sae") == before


def test_the_demo_empties_only_its_own_folder(tmp_path: Path):
    (tmp_path / DEMO_MARKER).write_text("")
    (tmp_path / "cache").mkdir()
    check_output_path(tmp_path, "--workdir", own=DEMO_FOLDER)  # its own: a re-run refills it
    (tmp_path / DEMO_MARKER).unlink()
    with pytest.raises(OutputExists, match="pass --overwrite"):
        check_output_path(tmp_path, "--workdir", own=DEMO_FOLDER)
    check_output_path(tmp_path, "--workdir", overwrite=True, own=DEMO_FOLDER)
