"""The main job: ``python -m fastae demo --quick`` prints its table and writes its PNGs."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastae import benchmark, demo  # noqa: E402
from fastae.__main__ import main  # noqa: E402

PNGS = (
    "filters.png",
    "reconstructions.png",
    "codes_2d.png",
    "anomaly_scores.png",
    "anomaly_pixels.png",
    "vae_samples.png",
)


def test_quick_demo_prints_the_table_and_writes_pngs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "figures"
    threads, used = torch.get_num_threads(), []
    run_checked = demo._run_checked

    def counted(*args):
        used.append(torch.get_num_threads())
        return run_checked(*args)

    monkeypatch.setattr(demo, "_run_checked", counted)
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--seed", "1"]) == 0
    assert used == [1] and torch.get_num_threads() == threads  # one thread, then the caller's
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
    assert sorted(path.name for path in out.iterdir()) == sorted(PNGS) == sorted(demo.FIGURES)
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


def test_an_unusable_device_is_a_usage_error(capsys, tmp_path):
    """Refused before the output folder is made: a refused command line leaves nothing."""
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--device", "tpu:7", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --device must be 'auto', 'cpu' or a CUDA dev")
    assert not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--epochs", "0"], "--epochs must be a positive int below 2**63, got 0"),
        (["--epochs", "-1"], "--epochs must be a positive int below 2**63, got -1"),
        (["--hidden", "0"], "--hidden must be a positive int below 2**63, got 0"),
        (["--hidden", "65"], "--hidden must be at most 64 (the digits' pixels), got 65"),
        (["--repeats", "0"], "--repeats must be a positive int below 2**63, got 0"),
        (["--seed", "-1"], "--seed must make seeds in [0, 4294967295], got -1..-1"),
        (["--seed", str(2**32 - 1), "--repeats", "2"], "got 4294967295..4294967296"),
        (["--out", "FILE"], "--out '"),
        (["--out", "FILE/inside"], "is not a folder that can be made"),
        (["--out", ""], "--out must name a folder, got ''"),
        (["--epochs", str(2**63)], f"--epochs must be a positive int below 2**63, got {2**63}"),
        (["--threads", "0"], "--threads must be a positive int below 2**63, got 0"),
        (["--threads", "100000"], "--threads must be at most "),
    ],
)
def test_bad_options_are_usage_errors_before_any_training(
    options, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(demo, "_warm_up", lambda device: pytest.fail("trained"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    options = [str(a_file) + o[4:] if o.startswith("FILE") else o for o in options]
    assert (
        main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "out"), *options]) == 2
    )
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error


def test_a_figure_name_taken_by_a_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Found before training, not when the figures are written at the run's end."""
    monkeypatch.setattr(demo, "_warm_up", lambda device: pytest.fail("trained"))
    (tmp_path / "codes_2d.png").mkdir()
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {str(tmp_path)!r} holds codes_2d.png, which is not a file that can be "
        "replaced\n"
    )


def test_the_demo_names_a_missing_extra_before_any_training(tmp_path, capsys, monkeypatch):
    """Without matplotlib (which the figures need) the demo says so instead of training."""
    find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args),
    )
    monkeypatch.setattr(demo, "_warm_up", lambda device: pytest.fail("trained"))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: the demo needs matplotlib: pip install 'fastae[apps]'\n"
    )


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(command, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo if command == "demo" else benchmark, "run", interrupted)
    assert main([command]) == 130
    assert capsys.readouterr().err == f"\npython -m fastae {command}: interrupted\n"


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_the_command_ends_by_sigint_after_ctrl_c():
    """As Python's own exit on an uncaught KeyboardInterrupt: a shell loop running the
    command sees SIGINT and stops too."""
    code = "import fastae.__main__ as m; m.main = lambda: m.INTERRUPTED; m.entry()"
    result = subprocess.run([sys.executable, "-c", code], timeout=120, check=False)
    assert result.returncode == -signal.SIGINT
    finished = "import fastae.__main__ as m; m.main = lambda: 0; m.entry()"
    assert subprocess.run([sys.executable, "-c", finished], timeout=120).returncode == 0


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_each_command_describes_itself_and_its_defaults(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal
    if command == "demo":
        assert "Train plain, sparse, denoising and contractive autoencoders" in text
        assert "(default: fastae-demo)" in text and "(default: 50, 5 with --quick)" in text
    else:
        assert "Time fastae's ops and training steps beside eager PyTorch" in text
        assert "(default: the training steps)" in text
