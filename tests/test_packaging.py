"""The wheel: fastae with its kernels as ``fastae.kernels`` (no top-level ``kernels``: that
name belongs to another PyPI project) and the PEP 561 ``py.typed`` marker (setuptools
packs it by itself), so type checkers read fastae's annotations."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastae


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
    wheel = next((tmp_path / "dist").glob("*.whl"))
    assert wheel.name.startswith(f"fastae-{fastae.__version__}-")  # the version, said once
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastae/py.typed" in names
    kernels = {f"fastae/kernels/{path.name}" for path in (root / "kernels").glob("*.py")}
    assert kernels and kernels <= names
    assert {f"fastae/{path.name}" for path in (root / "fastae").glob("*.py")} <= names
    assert not [name for name in names if name.startswith("kernels/")]


def test_help_and_dir_work_without_scikit_learn():
    """Without the apps extra the lazy estimators are missing, with an error that names the
    extra, and ``dir``, ``help(fastae)`` and ``inspect`` pass over them."""
    code = """if True:
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "sklearn" or name.startswith("sklearn."):
                    raise ImportError(f"No module named {name!r}")
        sys.meta_path.insert(0, Block())
        import inspect, pydoc, fastae
        assert "AutoencoderTransformer" not in dir(fastae)
        try:
            fastae.AutoencoderTransformer
        except ImportError as error:
            assert "pip install 'fastae[apps]'" in str(error), error
        else:
            raise AssertionError("AutoencoderTransformer loaded without scikit-learn")
        assert "Autoencoder" in dict(inspect.getmembers(fastae))
        assert "fastae" in pydoc.render_doc(fastae)
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


def test_the_installed_command_names_itself():
    script = Path(sys.executable).parent / "fastae"
    if not script.exists():
        pytest.skip("fastae is not installed as a command beside this Python")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.startswith("usage: fastae ")
    module = subprocess.run(
        [sys.executable, "-m", "fastae", "--help"], capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    assert module.stdout.startswith("usage: python -m fastae ")
