"""Publishing and fetching SAEs over real HTTP, against a hub speaking the protocol on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub, serve_hub

import vitscope
from conftest import run_vitscope

TOKEN = "hf_secret_token_for_tests"
REPO = "user/photo-sae"


@pytest.fixture
def hub() -> FakeHub:
    with serve_hub(TOKEN) as server:
        yield server


def hub_env(
    tmp_path: Path, endpoint: str, token: str | None = TOKEN, xet: bool = False
) -> dict[str, str]:
    """A process that knows the hub only from the environment, with an empty hub cache.

    HF_HUB_DISABLE_XET=1 unless `xet`: huggingface_hub 2.4.0 uploads LFS-mode files through Xet
    whenever hf_xet is installed, without asking the server, and the fake hub speaks LFS only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def assert_no_token(result: subprocess.CompletedProcess) -> None:
    assert TOKEN not in result.stdout + result.stderr


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error (huggingface_hub's retry warnings and progress bars go around it)."""
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_rows(card: str) -> dict[str, str]:
    """The model card's `| name | value |` table."""
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card, re.MULTILINE))


def repo_objects(hub: FakeHub, repo_id: str) -> list[str]:
    """The LFS objects the hub stores for `repo_id`."""
    return [oid for repo, oid in hub.lfs if repo == repo_id]


def test_push_publishes_one_commit_through_lfs_and_pull_gets_the_same_sae(
    photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    env = hub_env(tmp_path, hub.url)
    hub.drop_next["lfs-upload"] = 1  # one PUT cut halfway: the retry sends it whole
    pushed = run_vitscope("push", str(photo_sae), "--repo", REPO, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert_no_token(pushed)
    files = hub.repos[REPO]
    assert set(files) == {"README.md", "cfg.json", "sae.safetensors", "log.jsonl", "report.png"}
    assert hub.calls["commit"] == 1
    for name in ("cfg.json", "sae.safetensors", "log.jsonl", "report.png"):
        assert files[name] == (photo_sae / name).read_bytes()
    # The weights and the plot went through LFS (batch, PUT to storage, verify) and the commit
    # only named them: the fake hub refuses binary files inline.
    weights, plot = sha256(photo_sae / "sae.safetensors"), sha256(photo_sae / "report.png")
    assert sorted(repo_objects(hub, REPO)) == sorted([weights, plot])
    puts = [path for method, path in hub.requests if method == "PUT"]
    assert (
        puts.count(f"/lfs-storage/{REPO}/{weights}") + puts.count(f"/lfs-storage/{REPO}/{plot}")
        == len(puts)
        == 3
    )  # one of them twice, after the dropped connection
    assert hub.calls["lfs-batch"] == 1 and hub.calls["lfs-verify"] == 2

    card = files["README.md"].decode()
    assert "library_name: vitscope" in card
    rows = card_rows(card)
    last = json.loads((photo_sae / "log.jsonl").read_text().splitlines()[-1])
    cfg = json.loads((photo_sae / "cfg.json").read_text())
    heldout = last["heldout"]
    assert float(rows["held-out explained variance"]) == pytest.approx(
        heldout["explained_variance"], abs=5e-5
    )
    clipscope = float(rows["held-out explained variance, CLIP-Scope's"])
    assert clipscope == pytest.approx(heldout["clipscope_ev"], abs=5e-5)
    assert float(rows["held-out L0"]) == pytest.approx(heldout["l0"], abs=5e-3)
    dead = float(rows["dead latents"].removesuffix("%")) / 100
    assert dead == pytest.approx(last["dead_fraction"], abs=5e-5)
    trained = re.fullmatch(r"\w+; ([\d,]+) trained", rows["tokens"])
    assert trained and int(trained[1].replace(",", "")) == last["tokens"] == cfg["tokens_trained"]
    assert rows["layer"].split()[0] == str(cfg["layer"]) == "5"
    assert rows["model"] == f"{cfg['model']} ({cfg['pretrained']})"
    assert cfg["model"] == "ViT-S-32"

    pulled = run_vitscope("pull", REPO, "--out", str(tmp_path / "pulled"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert_no_token(pulled)
    assert ("GET", f"/lfs-storage/{REPO}/{weights}") in hub.requests
    again = vitscope.load_sae(tmp_path / "pulled")
    for name, tensor in vitscope.load_sae(photo_sae).state_dict().items():
        assert again.state_dict()[name].equal(tensor)

    by_id = subprocess.run(
        [sys.executable, "-c", f"import vitscope; print(vitscope.load_sae({REPO!r}).card)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert by_id.returncode == 0 and "layer=5" in by_id.stdout, by_id.stderr
    assert hub.requests.count(("GET", f"/lfs-storage/{REPO}/{weights}")) == 2


FAILURES = {
    # a status huggingface_hub does not retry on the commit
    "commit refused": ("fail_next", "commit", 1, "HfHubHTTPError from {hub}: 403 Forbidden"),
    # the connection cut halfway through the commit's body
    "commit dropped": ("drop_next", "commit", 1, "{hub}: "),
    # every try of both LFS PUTs (5 retries each) answered 500
    "LFS upload failed": ("fail_next", "lfs-upload", 12, "RuntimeError from {hub}: Error while"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_first_push_leaves_no_repo_and_a_retry_publishes_all(
    failure: str, photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    knob, route, times, says = FAILURES[failure]
    env = hub_env(tmp_path, hub.url)
    hub.fail_status = 403 if route == "commit" else 500
    getattr(hub, knob)[route] = times
    failed = run_vitscope("push", str(photo_sae), "--repo", REPO, env=env)
    assert failed.returncode == 1
    assert_no_token(failed)
    line = error_line(failed)
    assert line.startswith(f"error: push to {REPO}: ") and says.format(hub=hub.url) in line
    assert "X-Amz-Signature" not in line
    if route == "lfs-upload":
        assert "500 Internal Server Error" in line and hub.calls["commit"] == 0
    assert REPO not in hub.repos and not repo_objects(hub, REPO)
    assert hub.calls["delete"] == 1

    hub.fail_next.clear()
    hub.drop_next.clear()
    retried = run_vitscope("push", str(photo_sae), "--repo", REPO, env=env)
    assert retried.returncode == 0, retried.stderr
    assert len(hub.repos[REPO]) == 5


def test_a_repo_that_cannot_be_deleted_again_is_named(photo_sae: Path, hub: FakeHub, tmp_path):
    hub.fail_status, hub.fail_next["commit"], hub.fail_next["delete"] = 403, 1, 1
    failed = run_vitscope("push", str(photo_sae), "--repo", REPO, env=hub_env(tmp_path, hub.url))
    assert failed.returncode == 1
    assert_no_token(failed)
    assert error_line(failed).endswith(
        "commit failure (fake hub); the repo it created is left behind, empty"
    )
    assert hub.repos[REPO] == {}


@pytest.mark.parametrize("route", ["lfs-batch", "lfs-upload", "lfs-verify", "commit"])
def test_a_failed_push_to_an_existing_repo_leaves_it_as_it_was(
    route: str, photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    head = hub.commit(REPO, {"README.md": b"# an older SAE\n", "sae.safetensors": b"old\0weights"})
    before, history = dict(hub.repos[REPO]), dict(hub.history)
    hub.fail_status, hub.fail_next[route] = 403, 1  # S3 answers 403 to an expired signature
    failed = run_vitscope("push", str(photo_sae), "--repo", REPO, env=hub_env(tmp_path, hub.url))
    assert failed.returncode == 1
    assert_no_token(failed)
    assert "403" in error_line(failed) and "X-Amz-Signature" not in error_line(failed)
    assert hub.repos[REPO] == before and hub.shas[REPO] == head and hub.history == history
    assert hub.calls["delete"] == 0 and hub.calls[route] >= 1


def test_a_xet_client_fails_against_this_lfs_only_hub_and_leaves_nothing(
    photo_sae: Path, hub: FakeHub, tmp_path: Path
):
    """With hf_xet, huggingface_hub 2.4.0 asks for a Xet write token, which this hub refuses:
    the LFS tests above are only valid with HF_HUB_DISABLE_XET=1, and this failure is clean."""
    pytest.importorskip("hf_xet")
    env = hub_env(tmp_path, hub.url, xet=True)
    failed = run_vitscope("push", str(photo_sae), "--repo", REPO, env=env)
    assert failed.returncode == 1
    assert_no_token(failed)
    assert "xet-write-token" in error_line(failed)
    assert REPO not in hub.repos and hub.calls["lfs-batch"] == 0 and hub.calls["delete"] == 1


def test_a_clipscope_checkpoint_in_a_hub_repo_loads_by_its_path(
    clipscope_checkpoint: Path, hub: FakeHub, tmp_path: Path
):
    path = "22_resid/1200013184.pt"
    hub.commit(
        "user/clip-scope", {"README.md": b"# CLIP-Scope\n", path: clipscope_checkpoint.read_bytes()}
    )
    script = (
        "import sys, torch, vitscope\n"
        f"sae = vitscope.load_sae('user/clip-scope/{path}')\n"
        "local = vitscope.load_sae(sys.argv[1])\n"
        "x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))\n"
        "assert torch.equal(sae(x), local(x)) and torch.equal(sae.encode(x).dense(),"
        " local.encode(x).dense())\n"
        "print(sae.card.source, sae.card.layer, sae.card.tokens_trained)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(clipscope_checkpoint)],
        capture_output=True,
        text=True,
        env=hub_env(tmp_path, hub.url),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["clip-scope", "22", "1200013184"]
    # hf_hub_download of that one file (no snapshot: no tree listing), from LFS storage
    assert hub.calls["tree"] == 0 and hub.calls["resolve"] >= 1
    lfs_get = ("GET", f"/lfs-storage/user/clip-scope/{sha256(clipscope_checkpoint)}")
    assert hub.requests.count(lfs_get) == 1


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


def test_the_model_card_shows_what_analyze_and_consistency_left(tmp_path):
    """Mean Moran's I over the features that have one, and PW-MCC per matched SAE, beside the
    log's numbers; a run without them gets neither row."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitscope.saes.folder import load_sae_folder
    from vitscope.saes.model_card import model_card, run_metrics

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "run-v0", run)
    card = load_sae_folder(run).card
    bare = model_card(card, run_metrics(run), "you/sae")
    assert "Moran" not in bare and "PW-MCC" not in bare and "explained variance" in bare
    (run / "analysis").mkdir()
    pq.write_table(
        pa.table({"morans_i": [0.5, None, 0.7, float("nan")]}),
        run / "analysis" / "features.parquet",
    )
    (run / "consistency-seed1").mkdir()
    (run / "consistency-seed1" / "consistency.json").write_text(json.dumps({"pw_mcc": 0.8125}))
    metrics = run_metrics(run)
    assert metrics["mean_morans_i"] == pytest.approx(0.6)
    text = model_card(card, metrics, "you/sae")
    assert "| mean Moran's I (spatial coherence) | 0.6000 |" in text
    assert "| cross-seed consistency with seed1 (PW-MCC) | 0.8125 |" in text
