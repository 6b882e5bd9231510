"""log.jsonl has one record type, read and written in one module: old logs read, lines round-trip,
a torn last line is left out, a bad one is one line naming it, and reading needs no matplotlib."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitscope.support.run_log import (
    LOG_FILE,
    RunLogError,
    append_record,
    drop_records_after,
    read_log,
)

RUN_V0 = Path(__file__).parent / "data" / "run-v0"
"""A run folder the trainer wrote before the SAE format: its log is the oldest one kept."""


def test_reading_a_log_imports_no_plotting():
    code = (
        "import sys\n"
        "from vitscope.support.run_log import read_log\n"
        f"assert len(read_log({str(RUN_V0)!r})) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_old_log_reads_and_its_records_write_back_the_same_lines(tmp_path: Path):
    log = read_log(RUN_V0)
    assert [r.tokens for r in log] == [4096, 8192]
    assert len(log[-1].heldout.mse_by_token) == 5 and log[-1].heldout.fvu > 0
    for record in log:
        append_record(tmp_path / "run", record)
    written = (tmp_path / "run" / LOG_FILE).read_text().splitlines()
    original = (RUN_V0 / LOG_FILE).read_text().splitlines()
    assert [json.loads(line) for line in written] == [json.loads(line) for line in original]


def test_a_line_torn_by_a_kill_is_left_out_and_resume_drops_later_lines(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(RUN_V0, run)
    with open(run / LOG_FILE, "a") as f:
        f.write('{"tokens": 12288, "step": 96, "l')  # the kill came mid-write
    assert [r.tokens for r in read_log(run)] == [4096, 8192]
    drop_records_after(run, 4096)
    assert (run / LOG_FILE).read_text() == (RUN_V0 / LOG_FILE).read_text().splitlines()[0] + "\n"


def test_a_folder_without_a_log_has_no_records(tmp_path: Path):
    assert read_log(tmp_path) == []


def test_a_bad_line_is_one_line_naming_the_file_the_line_and_the_field(tmp_path: Path):
    lines = (RUN_V0 / LOG_FILE).read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["heldout"]["fvu"]
    (tmp_path / LOG_FILE).write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(RunLogError, match=r"log.jsonl, line 2: expected held-out metrics field"):
        read_log(tmp_path)
