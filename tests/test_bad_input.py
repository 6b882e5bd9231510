"""Every bad input of stage one gets a clear one-line error, or is skipped and counted."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import cache_config, cli_args, run_vitscope
from vitscope.cache_spec import CacheSpecError, open_cache
from vitscope.cache_spec.info import summary_lines
from vitscope.cache_spec.layout import commit_key, error_key, rows_key
from vitscope.pipeline.run import cache


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) * 6 // 10], "unexpected end of data"),
        (lambda data: b"\x17" * 3000, "invalid header"),
        (lambda data: b"", "empty file"),
    ],
    ids=["truncated", "corrupt", "zero-bytes"],
)
def test_unreadable_tar_fails_its_shard_only(shards_copy: Path, tmp_path: Path, damage, message):
    bad = shards_copy / "00001.tar"
    good_bytes = bad.read_bytes()
    bad.write_bytes(damage(good_bytes))
    config = cache_config(shards_copy, tmp_path / "cache")

    result = run_vitscope(*cli_args(config))
    assert result.returncode == 1
    failure = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failure == [failure[0]] and str(bad) in failure[0] and message in failure[0]
    assert "re-download" in failure[0]

    store = open_cache(config.out)
    assert sorted(store.committed) == [0, 2]
    assert (store.path / error_key("00001.tar")).exists()
    assert any("failed 00001.tar" in line for line in summary_lines(store))

    bad.write_bytes(good_bytes)
    summary = cache(config)
    assert (summary.already_committed, summary.committed, summary.failed) == (2, 1, {})
    assert not (store.path / error_key("00001.tar")).exists()


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_bad_images_are_skipped_and_recorded(tmp_path: Path, decode: str):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for key, jpg in [("000000", jpeg_bytes()), ("000001", b"not a jpeg"), ("000003", None)]:
            if jpg is not None:
                add_member(tar, f"{key}.jpg", jpg)
            add_member(tar, f"{key}.txt", f"caption {key}".encode())
            add_member(tar, f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode())
        add_member(tar, "000004.jpg", jpeg_bytes())
    summary = cache(cache_config(shards, tmp_path / "cache", decode=decode))
    assert summary.rows == 2
    assert summary.skipped == {"undecodable image": 1, "no image in sample": 1}
    records = {r["key"]: r for r in open_cache(tmp_path / "cache").rows_table().to_pylist()}
    assert records["000000"]["row"] == 0 and records["000004"]["row"] == 1
    assert records["000001"]["status"] == "skipped" and records["000001"]["row"] is None
    assert records["000001"]["error"].startswith("undecodable image: UnidentifiedImageError")
    assert records["000001"]["url"] == "http://x/000001"
    assert records["000003"]["error"] == "no image in sample"


def test_empty_shard_is_committed_with_no_rows(tmp_path: Path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w"):
        pass
    summary = cache(cache_config(shards, tmp_path / "cache"))
    assert (summary.committed, summary.rows, summary.empty) == (1, 0, ["00000.tar"])
    assert "empty shard (committed with 0 rows): 00000.tar" in summary.lines()
    assert open_cache(tmp_path / "cache").n_rows == 0


def test_no_shards_is_one_line(tmp_path: Path):
    result = run_vitscope("cache", "--shards", str(tmp_path), "--out", str(tmp_path / "c"))
    assert result.returncode == 1
    expected = f"error: {tmp_path}: no .tar shards in it; run `vitscope download`"
    assert result.stderr.strip() == expected


def test_layer_beyond_the_model_is_refused_before_any_work(shards: Path, tmp_path: Path):
    config = cache_config(shards, tmp_path / "cache", layers=(2, 12))
    result = run_vitscope(*cli_args(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: layer(s) [12] beyond the model: ViT-S-32 has blocks 0..11"
    )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ({"layers": (2, 5)}, "layers=(2, 5, 11) (this run: (2, 5))"),
        ({"model": "ViT-B-32"}, "model='ViT-S-32' (this run: 'ViT-B-32')"),
    ],
)
def test_existing_cache_with_other_settings_is_refused(
    shards: Path, reference_cache: Path, tmp_path: Path, change: dict, found: str
):
    out = shutil.copytree(reference_cache, tmp_path / "cache")
    with pytest.raises(CacheSpecError, match="use a new --out") as err:
        cache(cache_config(shards, out, **change))
    assert found in str(err.value) and "\n" not in str(err.value)


def test_full_disk_fails_cleanly_and_keeps_committed_shards(shards: Path, tmp_path: Path):
    """A real full filesystem: a 1.2 MB tmpfs mounted in a private user and mount namespace."""
    mount, snapshot = tmp_path / "small", tmp_path / "snapshot"
    mount.mkdir()
    config = cache_config(shards, mount / "cache")
    vitscope = " ".join(["python", "-m", "vitscope", *cli_args(config)])
    script = (
        f"mount -t tmpfs -o size=1200k tmpfs {mount} && "
        f"{vitscope}; echo exit=$?; cp -a {mount}/cache {snapshot}"
    )
    result = run_vitscope_in_namespace(script)
    assert "exit=1" in result.stdout, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {mount}/cache: disk full while writing shard 0000")
    assert error.endswith("free space and re-run the same command to resume")
    store = open_cache(snapshot)
    assert 0 < len(store.committed) < 3
    for commit in store.committed.values():
        assert commit.n_rows == 8 and (snapshot / rows_key(commit.shard)).exists()
    store.read_rows(11, range(store.chunks()[-1].first_row + 1))


def run_vitscope_in_namespace(script: str):
    import subprocess
    import sys

    env_path = Path(sys.executable).parent
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{env_path}:/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1"},
    )


def edit_attrs(cache_path: Path, **changes: object) -> None:
    meta = cache_path / "zarr.json"
    data = json.loads(meta.read_text())
    data["attributes"]["vitscope_cache"].update(changes)
    meta.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: shutil.rmtree(c), "expected a vitscope cache, found no such directory"),
        (lambda c: (c / "zarr.json").unlink(), "expected a vitscope cache, found no zarr.json"),
        (lambda c: edit_attrs(c, spec_version="2.0"), "expected spec version 1.x, found spec "),
        (lambda c: edit_attrs(c, d_model=512), "expected shape (24, 50, 512)"),
        (lambda c: edit_attrs(c, storage="int4"), "field 'storage' to be one of 'float16', "),
        (lambda c: edit_attrs(c, chunk_images="4"), "field 'chunk_images' to be int, found '4'"),
        (lambda c: shutil.rmtree(c / "layer_05"), "expected the array of cached layer 5"),
        (
            lambda c: (c / commit_key("00001.tar")).write_text("{"),
            "00001.commit.json: expected JSON",
        ),
        (lambda c: (c / rows_key("00002.tar")).unlink(), "expected the row table of a committed"),
    ],
    ids=["missing", "not-zarr", "version", "shape", "storage", "type", "layer", "commit", "rows"],
)
def test_opening_validates_and_names_the_file(
    reference_cache: Path, tmp_path: Path, damage, expected: str
):
    copy = shutil.copytree(reference_cache, tmp_path / "cache")
    damage(copy)
    with pytest.raises(CacheSpecError) as err:
        open_cache(copy)
    message = str(err.value)
    assert message.startswith(str(copy)) and expected in message and "\n" not in message


@pytest.mark.parametrize(("distributor", "extra"), [("pyspark", "spark"), ("ray", "ray")])
def test_cluster_distributor_without_its_package_is_one_line(
    tmp_path: Path, distributor: str, extra: str
):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    result = run_vitscope("download", "--url-list", str(urls), "--distributor", distributor)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: vitscope download --distributor {distributor} needs {distributor}, which is not "
        f"installed; pip install 'vitscope[{extra}]'"
    )
