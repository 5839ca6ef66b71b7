"""The main job: ``python -m fastae demo --quick`` prints its table and writes its PNGs."""

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastae import demo  # noqa: E402
from fastae.__main__ import main  # noqa: E402

PNGS = (
    "filters.png",
    "reconstructions.png",
    "codes_2d.png",
    "anomaly_scores.png",
    "anomaly_pixels.png",
    "vae_samples.png",
)


def test_quick_demo_prints_the_table_and_writes_pngs(tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("model"))
    for column in ("recon MSE", "probe acc", "k-means NMI", "AUROC digit", "AUROC cancer",
                   "10% labels", "time s"):  # fmt: skip
        assert column in header
    for row in ("plain AE", "sparse AE", "denoising AE", "contractive AE", "stacked",
                "DEC", "VAE 64-128-8", "PCA (", "raw pixels", "IsolationForest"):  # fmt: skip
        assert any(line.startswith(row) for line in text.splitlines()), row
    deep_row = next(line for line in text.splitlines() if line.startswith("deep AE 64-64-32"))
    assert "-" not in deep_row.split()[3:], deep_row  # every column measured
    vae_row = next(line for line in text.splitlines() if line.startswith("VAE"))
    assert vae_row.split()[-2] == "-"  # no semi-supervised number for the VAE
    assert all(cell != "-" for cell in vae_row.split()[2:-2]), vae_row
    scored = next(line for line in text.splitlines() if line.startswith("VAE, reconstruction"))
    cells = scored.split()[3:]  # train loss, recon MSE, probe, NMI, AUROCs, 10% labels, time
    assert cells[:4] == ["-"] * 4 and cells[6:] == ["-"] * 2, scored
    assert all(0 < float(cell) <= 1 for cell in cells[4:6]), scored
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 200_000, name


def test_table_with_repeats_shows_mean_and_spread():
    one, two = demo.Result(), demo.Result()
    one.set("plain AE", "probe", 0.90)
    two.set("plain AE", "probe", 0.94)
    one.set("IsolationForest", "auroc_digit", 0.7)
    two.set("IsolationForest", "auroc_digit", 0.8)
    table = demo.format_table([one, two])
    assert "0.920±0.020" in table
    assert "0.750±0.050" in table
    row = next(line for line in table.splitlines() if line.startswith("plain AE"))
    assert row.split()[2:4] == ["-", "-"]  # missing metrics print as "-"
    assert np.isnan(one.rows["plain AE"].get("mse", np.nan))


def test_an_unusable_device_is_a_usage_error(capsys):
    assert main(["demo", "--quick", "--device", "tpu:7"]) == 2
    assert capsys.readouterr().err.startswith("error: --device must be 'auto' or a torch device")
