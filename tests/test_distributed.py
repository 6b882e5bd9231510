"""Both stages under real torchrun (2 processes, gloo on CPU): stage one's ranks split the shards
into one cache equal to a one-process cache; a rank killed mid-shard leaves only uncommitted work
that a re-run finishes; stage two's two ranks train the SAE one process trains on the same global
batches."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import open_fifo_for_writing, rows_by_key, wait_for
from test_training import cli_flags

from conftest import TEST_LAYERS, cache_config, cli_args, small_config
from vitscope.cache_spec import open_cache
from vitscope.cache_spec.layout import layer_array_name
from vitscope.support.launch import Launch
from vitscope.train.loader import Batch
from vitscope.train.run import INIT_SAMPLE_TOKENS, _first_batches, member_devices, training_stream
from vitscope.train.trainer import fit, new_member

RANKS = 2


def torchrun(*args: str, marker: str = "") -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m vitscope ARGS`, single node; `marker` tags the ranks'
    environment so a test can find them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VITSCOPE_TEST_MARKER": marker}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.Popen(
        [*launcher, f"--nproc-per-node={RANKS}", "-m", "vitscope", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker with this rank and marker, if it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        wanted = {f"VITSCOPE_TEST_MARKER={marker}".encode(), f"RANK={rank}".encode()}
        if wanted <= set(environ):
            return int(entry.name)
    return None


def test_two_ranks_cache_equals_one_process(shards: Path, reference_cache: Path, tmp_path: Path):
    out = tmp_path / "cache"
    log = finished(torchrun(*cli_args(cache_config(shards, out))))
    assert "cache part 0/2" in log or "committed" in log
    together, alone = open_cache(out), open_cache(reference_cache)
    assert sorted(together.committed) == [0, 1, 2]
    assert len({c.written_by for c in together.committed.values()}) == RANKS
    assert rows_by_key(out).equals(rows_by_key(reference_cache))
    assert together.chunks() == alone.chunks()
    for layer in TEST_LAYERS:
        for ref in alone.chunks():
            assert torch.equal(together.read_chunk(layer, ref), alone.read_chunk(layer, ref))


def test_rank_killed_mid_shard_then_rerun_gives_each_row_once(
    shards_copy: Path, reference_cache: Path, tmp_path: Path
):
    """Rank 0 owns shards 0 and 2; shard 2 is a pipe filled part-way, so rank 0 is mid-shard
    when it is killed, whatever the timing."""
    config = cache_config(shards_copy, tmp_path / "cache", batch_size=2)
    third = shards_copy / "00002.tar"
    tar_bytes = third.read_bytes()
    third.unlink()
    os.mkfifo(third)
    proc = torchrun(*cli_args(config), marker=str(tmp_path))
    try:
        fd = open_fifo_for_writing(third, proc)
        os.write(fd, tar_bytes[: int(len(tar_bytes) * 0.7)])
        first_chunk = 2 * config.rows_per_shard // config.chunk_images
        chunk = Path(config.out) / layer_array_name(TEST_LAYERS[0]) / "c" / str(first_chunk)
        wait_for(lambda: (chunk / "0" / "0").exists(), "rank 0's first chunk of shard 2")
        wait_for(lambda: 0 in open_cache(config.out).commits(), "rank 0's commit of shard 0")
        pid = rank_pid(str(tmp_path), 0)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
        os.close(fd)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    killed = open_cache(config.out)
    assert 0 in killed.committed and killed.uncommitted_shards() in (
        ["00002.tar"],
        ["00001.tar", "00002.tar"],  # rank 1 was torn down before it committed
    )

    third.unlink()
    third.write_bytes(tar_bytes)
    finished(torchrun(*cli_args(config)))
    done, reference = open_cache(config.out), open_cache(reference_cache)
    assert sorted(done.committed) == [0, 1, 2]
    assert rows_by_key(config.out).equals(rows_by_key(reference_cache))
    for ref in reference.chunks():
        torch.testing.assert_close(done.read_chunk(2, ref), reference.read_chunk(2, ref))


def test_parts_flag_under_torchrun_is_a_one_line_error(shards: Path, tmp_path: Path):
    proc = torchrun(*cli_args(cache_config(shards, tmp_path / "cache", part=0, parts=2)))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "torchrun's ranks are the parts; drop --part/--parts" in out


def test_two_ranks_train_the_sae_one_process_trains_on_their_global_batches(
    small_cache: Path, tmp_path: Path
):
    """The reference is one process fed, at every step, both ranks' batches concatenated, and
    initialised on both ranks' first batches: what data parallelism claims to equal."""
    cfg = small_config(small_cache, tmp_path / "ranks", tokens=3_840, aux_coefficient=0.0)
    finished(torchrun("train", *cli_flags(cfg)))
    trained = load_file(cfg.run_dir / "sae.safetensors")

    cache, device = open_cache(small_cache), torch.device("cpu")
    streams = [training_stream(cfg, cache, device, Launch(r, RANKS)) for r in range(RANKS)]
    shares, firsts = [], []
    for stream in streams:
        batches = stream.batches(0)
        first = _first_batches(batches, min(INIT_SAMPLE_TOKENS // RANKS, stream.epoch_tokens))
        firsts.append(torch.cat([b.acts_BD for b in first]))
        shares.append(itertools.chain(first, batches))
    global_batches = (
        Batch(torch.cat([b.acts_BD for b in step]), torch.cat([b.rows_B for b in step]), 0)
        for step in zip(*shares, strict=True)
    )
    reference_cfg = dataclasses.replace(cfg, out=str(tmp_path / "one"))
    member = new_member(reference_cfg, 16, torch.cat(firsts).float(), device, cache.attrs)
    heldout, _ = streams[0].heldout_images(cfg.eval_images)
    fit([member], global_batches, heldout, cache.attrs.token_layout.token_set("all"))
    reference = load_file(reference_cfg.run_dir / "sae.safetensors")
    assert trained.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-5)
    assert not (cfg.run_dir.parent / "rank1").exists()


def test_distribute_saes_places_a_sweep_on_the_gpus_in_turn(
    small_cache: Path, tmp_path: Path, monkeypatch
):
    cfg = small_config(small_cache, tmp_path, distribute_saes=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    gpus = [torch.device("cuda", i) for i in (0, 1, 0)]
    assert member_devices(cfg, 3, cuda, gpus=2) == gpus
    assert member_devices(dataclasses.replace(cfg, distribute_saes=False), 2, cuda, 2) == [cuda] * 2
    assert member_devices(cfg, 2, cpu, gpus=0) == [cpu, cpu]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="run it without torchrun"):
        member_devices(cfg, 2, cuda, gpus=2)


def test_two_ranks_train_a_batchtopk_sae_with_one_threshold(small_cache: Path, tmp_path: Path):
    """The batch rule runs on each rank's share; the ranks average θ after every step."""
    cfg = small_config(small_cache, tmp_path / "ranks", tokens=2_560, architecture="batchtopk")
    finished(torchrun("train", *cli_flags(cfg)))
    threshold = load_file(cfg.run_dir / "sae.safetensors")["threshold"]
    assert torch.isfinite(threshold) and threshold > 0
