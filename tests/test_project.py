"""The project's promises about itself: one namespace in site-packages, CI runs README's tests."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_installs_everything_under_the_vitscope_namespace(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vitscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "vitscope",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    for module in ("pipeline/run.py", "cache_spec/SPEC.md", "train/__init__.py", "cli.py"):
        assert f"vitscope/{module}" in names


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block
    run_line, test_line = first_block.group(1).strip().splitlines()
    assert run_line.startswith("make demo")
    test_command = test_line.split("#")[0].strip()
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_commands == [test_command]
