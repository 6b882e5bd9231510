"""Publishing and fetching SAEs over real HTTP, against a hub speaking the protocol on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub, serve_hub

import vitscope
from conftest import run_vitscope

TOKEN = "hf_secret_token_for_tests"


@pytest.fixture
def hub() -> FakeHub:
    with serve_hub(TOKEN) as server:
        yield server


def hub_env(tmp_path: Path, endpoint: str, token: str | None = TOKEN) -> dict[str, str]:
    """A process that knows the hub only from the environment, with an empty hub cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def assert_no_token(result: subprocess.CompletedProcess) -> None:
    assert TOKEN not in result.stdout + result.stderr


def test_push_publishes_one_commit_and_pull_gets_the_same_sae(
    photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    env = hub_env(tmp_path, hub.url)
    pushed = run_vitscope("push", str(photo_sae), "--repo", "user/photo-sae", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert_no_token(pushed)
    files = hub.repos["user/photo-sae"]
    assert set(files) == {"README.md", "cfg.json", "sae.safetensors", "log.jsonl", "report.png"}
    assert hub.calls["commit"] == 1
    for name in ("cfg.json", "sae.safetensors", "log.jsonl"):
        assert files[name] == (photo_sae / name).read_bytes()
    card = files["README.md"].decode()
    last = vitscope.load_sae(photo_sae)
    assert "library_name: vitscope" in card and "ViT-S-32" in card and "| layer | 5" in card
    assert "held-out explained variance" in card and "4,096 trained" in card

    pulled = run_vitscope("pull", "user/photo-sae", "--out", str(tmp_path / "pulled"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert_no_token(pulled)
    again = vitscope.load_sae(tmp_path / "pulled")
    for name, tensor in last.state_dict().items():
        assert again.state_dict()[name].equal(tensor)

    by_id = subprocess.run(
        [sys.executable, "-c", "import vitscope; print(vitscope.load_sae('user/photo-sae').card)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert by_id.returncode == 0 and "layer=5" in by_id.stdout, by_id.stderr


def test_a_failed_upload_publishes_nothing_and_a_retry_publishes_all(
    photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    env = hub_env(tmp_path, hub.url)
    hub.fail_status, hub.fail_next_commits = 403, 1
    failed = run_vitscope("push", str(photo_sae), "--repo", "user/photo-sae", env=env)
    assert failed.returncode == 1
    assert_no_token(failed)
    (line,) = failed.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: push to user/photo-sae: HfHubHTTPError from {hub.url}")
    assert hub.repos.get("user/photo-sae", {}) == {}

    retried = run_vitscope("push", str(photo_sae), "--repo", "user/photo-sae", env=env)
    assert retried.returncode == 0, retried.stderr
    assert len(hub.repos["user/photo-sae"]) == 5


def test_push_without_a_token_says_where_tokens_come_from(photo_sae: Path, hub: FakeHub, tmp_path):
    result = run_vitscope(
        "push", str(photo_sae), "--repo", "user/x", env=hub_env(tmp_path, hub.url, token=None)
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: push to user/x: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
    )


def test_a_wrong_token_is_refused_without_echoing_it(photo_sae: Path, hub: FakeHub, tmp_path):
    env = hub_env(tmp_path, hub.url, token="hf_wrong_" + TOKEN)
    result = run_vitscope("push", str(photo_sae), "--repo", "user/x", env=env)
    assert result.returncode == 1 and "401" in result.stderr
    assert TOKEN not in result.stdout + result.stderr and "user/x" not in hub.repos


def test_missing_repo_is_one_line(hub: FakeHub, tmp_path: Path):
    result = run_vitscope("pull", "user/nothing-here", env=hub_env(tmp_path, hub.url))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: hub id user/nothing-here: no such repo at {hub.url} (or it is private: "
        "`hf auth login`)"
    )


def test_a_hub_id_without_network_is_one_line(tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    script = (
        "import vitscope\n"
        "try:\n    vitscope.load_sae('user/photo-sae')\n"
        "except Exception as err:\n    print(type(err).__name__, err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=hub_env(tmp_path, closed),
        timeout=120,
    )
    assert result.stdout.strip() == (
        f"HubError hub id user/photo-sae: cannot reach the hub at {closed} and it is not in the "
        "local hub cache; connect to the network, or pass a local SAE folder"
    )
