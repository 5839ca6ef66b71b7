"""The wheel: fastae with its kernels as ``fastae.kernels`` (no top-level ``kernels``: that
name belongs to another PyPI project) and the PEP 561 ``py.typed`` marker (setuptools
packs it by itself), so type checkers read fastae's annotations."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def test_the_wheel_holds_the_kernels_and_the_typing_marker(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement
    root, source = Path(__file__).parents[1], tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for name in ("fastae", "kernels"):  # a copy: building leaves build/ and egg-info behind
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(source), "-w", str(tmp_path / "dist")],
        check=True,
    )  # fmt: skip
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    assert "fastae/py.typed" in names
    kernels = {f"fastae/kernels/{path.name}" for path in (root / "kernels").glob("*.py")}
    assert kernels and kernels <= names
    assert {f"fastae/{path.name}" for path in (root / "fastae").glob("*.py")} <= names
    assert not [name for name in names if name.startswith("kernels/")]
