"""The README's Python examples run as written: on small random data, with fewer epochs, and
without ``.cuda()`` where there is no GPU (each substitution is checked, so an edited example
fails here instead of running as something else)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).parents[1] / "README.md"


def _example(heading: str) -> str:
    """The first Python block after ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def _substitute(code: str, old: str, new: str) -> str:
    assert old in code, f"the README example no longer contains {old!r}"
    return code.replace(old, new)


def test_quick_start_example():
    pytest.importorskip("sklearn")
    code = _substitute(_example("## Quick start"), "epochs=200", "epochs=5")
    rng = np.random.default_rng(0)
    namespace = {"x_train": rng.random((80, 12)), "x_test": rng.random((30, 12))}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["anomaly"].shape == namespace["outlier"].shape == (30,)
    assert namespace["detector"].labels_.sum() == 8  # a tenth of the training rows
    assert namespace["codes"].shape == (30, 16)


def test_use_example():
    code = _substitute(_example("## Use"), "epochs=20", "epochs=2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        code = _substitute(code, ").cuda()", ")")
    g = torch.Generator().manual_seed(0)
    data = {
        name: torch.rand(rows, 784, generator=g)
        for name, rows in [("x_train", 96), ("x_val", 32), ("x_batch", 16), ("x", 24)]
    }
    data["x_batch"], data["x"] = data["x_batch"].to(device), data["x"].to(device)
    namespace = dict(data)
    exec(compile(code, str(README), "exec"), namespace)
    out, history = namespace["out"], namespace["history"]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.code.shape == (16, 1024)
    assert set(out.penalties) >= {"sparsity", "contractive"}
    assert namespace["codes"].shape == (24, 1024)
    assert namespace["scores"].shape == (24,)
    assert len(history.loss) == 2 and len(history.val_loss) == 2


def test_applications_example():
    pytest.importorskip("sklearn")
    code = _example("## Applications")
    rng = np.random.default_rng(0)
    x = rng.random((60, 12)).astype(np.float32)
    y_partial = np.where(rng.random(60) < 0.3, rng.integers(0, 3, 60), -1)
    namespace = {"x_train": x, "x": x, "y_partial": y_partial}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["detector"].predict(x).shape == (60,)
    assert namespace["deep_detector"].module_.sizes == (64, 32, 16)
    assert np.isfinite(namespace["vae_detector"].score_samples(x)).all()
    assert namespace["vae_codes"].shape == (60, 16)
    assert namespace["search"].best_params_["scale"] in ("standard", "minmax")
    np.testing.assert_allclose(
        namespace["culprits"].sum(1), -namespace["detector"].score_samples(x), rtol=1e-5
    )
    assert set(namespace["clf"].predict(x)) <= {0, 1, 2}
    assert namespace["stack"].transform(x).shape == (60, 32)
    assert namespace["streamed"].n_iter_ == 4
    assert namespace["labels"].shape == (60,)
    assert namespace["kmeans"].n_clusters == 10
    pipe = namespace["pipe"].fit(x, rng.integers(0, 2, 60))
    assert pipe.predict(x).shape == (60,)
