"""The project's promises about itself: one namespace in site-packages, CI runs README's tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DATA = ROOT / "tests" / "data"
EXPECTED = DATA / "run-v0-expected.safetensors"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build --wheel` of this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("vitscope-*.whl")
    return built


def test_wheel_installs_everything_under_the_vitscope_namespace(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "vitscope",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    for module in ("pipeline/run.py", "cache_spec/SPEC.md", "train/__init__.py", "cli.py"):
        assert f"vitscope/{module}" in names
    for module in (
        "saes/load.py",
        "saes/architectures/matryoshka.py",
        "support/configs.py",
        "saes/SAE_FORMAT.md",
        "analysis/ANALYSIS.md",
        "py.typed",
        "analysis/browser_assets/app.js",
    ):
        assert f"vitscope/{module}" in names


INFERENCE = """
import sys
import torch
import vitscope
from safetensors.torch import load_file

sae = vitscope.load_sae(sys.argv[1])
expected = load_file(sys.argv[2])
assert sae.encode(expected["acts"]).indices.equal(expected["idx"])
torch.testing.assert_close(sae(expected["acts"]), expected["recon"])
print(sorted({m.split(".")[0] for m in sys.modules} & {"img2dataset", "matplotlib", "zarr"}))
"""


def test_the_wheel_alone_loads_and_runs_an_sae_in_a_fresh_venv(wheel: Path, tmp_path: Path):
    """Core dependencies only (no extras): what an inference user installs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # The torch pair this environment runs on, so the fresh venv takes it from local disk.
    torch_pair = [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision")]
    subprocess.run([*pip, *torch_pair], check=True, capture_output=True)
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    for extra_only in ("img2dataset", "matplotlib", "sae_lens"):
        found = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {extra_only}"])
        assert found.returncode != 0, f"{extra_only} came with the core install"
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", INFERENCE, str(DATA / "run-v0"), str(EXPECTED)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # inference imports none of the heavy parts
    cli = subprocess.run([str(venv / "bin" / "vitscope"), "--help"], capture_output=True)
    assert cli.returncode == 0


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


def test_make_test_installs_the_browser_it_needs():
    """A fresh machine lacks Debian's Chromium and its driver, which the browser tests drive:
    `make test` installs them itself, and only when missing."""
    planned = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    steps = planned.stdout
    assert "[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||" in steps
    assert "apt-get install -y -qq chromium chromium-driver" in steps
    assert steps.index("chromium-driver") < steps.index("pytest")


ALLOWED_IMPORTS = {
    "support": {"support"},
    "cache_spec": {"cache_spec", "support"},
    "pipeline": {"pipeline", "cache_spec", "support"},
    "saes": {"saes", "support"},
    "train": {"train", "saes", "cache_spec", "support"},
    "analysis": {"analysis", "saes", "train", "pipeline", "cache_spec", "support"},
}
"""Which vitscope packages each folder may import: the arrows point down, never up."""


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, absolute: `from vitscope import x` and `from . import x`
    count as importing vitscope.x, `from .. import x` as the package above."""
    folders = path.parent.relative_to(ROOT).parts if path.is_relative_to(ROOT) else ()
    package = ".".join(("vitscope", *(folders or (path.parent.name,))))
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            modules += [f"{module}.{a.name}" for a in node.names]
    return modules


def test_imports_run_one_way():
    for folder, allowed in ALLOWED_IMPORTS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_modules(path):
                parts = name.split(".")
                if parts[0] == "vitscope" and len(parts) > 1:
                    assert parts[1] in allowed, f"{path.relative_to(ROOT)} imports {name}"


SAE_MODULES = ("sae", "card", "kernels", "architectures", "sae_folder")
"""What train/ held of the SAE artifact before it moved to saes/."""


def test_nothing_gets_an_sae_from_train():
    for folder in [*(f for f in ALLOWED_IMPORTS if f != "train"), "vitscope", "tests", "bench"]:
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_modules(path):
                parts = name.split(".")
                assert parts[:2] != ["vitscope", "train"] or parts[2] not in SAE_MODULES, (
                    f"{path.relative_to(ROOT)} imports {name}"
                )
    assert not [m for m in SAE_MODULES if list((ROOT / "train").glob(f"{m}.*"))]


def test_the_import_check_sees_every_spelling(tmp_path: Path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "x.py").write_text(
        "from vitscope import analysis\nfrom .. import cli\nfrom . import sae\n"
        "import vitscope.api\nfrom vitscope.cache_spec.store import open_cache\n"
    )
    assert imported_modules(folder / "x.py") == [
        "vitscope.analysis",
        "vitscope.cli",
        "vitscope.train.sae",
        "vitscope.api",
        "vitscope.cache_spec.store.open_cache",
    ]
