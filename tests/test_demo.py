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


@pytest.mark.parametrize(
    "options",
    [
        ["--hidden", "64"],  # every pixel: the largest code allowed
        ["--seed", str(demo.SEED_MAX)],  # the last seed scikit-learn takes
        ["--seed", "0"],
        ["--threads", "CORES"],  # all usable cores
    ],
)
def test_boundary_options_are_accepted(options, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_run_checked", lambda args, epochs, device: 0)
    options = [str(benchmark.usable_cores()) if o == "CORES" else o for o in options]
    argv = ["demo", "--quick", "--device", "cpu", "--out", str(tmp_path), *options]
    assert main(argv) == 0, capsys.readouterr().err


def _fake_runs(monkeypatch):
    """run_once replaced by a recorder: (settings, keep_figures) per seed, no training."""
    calls = []

    def run_once(settings, keep_figures):
        calls.append((settings, keep_figures))
        result = demo.Result()
        result.set("plain AE", "probe", 0.5)
        result.notes["holdout"] = "mean over held-out digits 0-9"
        result.figures = {"seed": settings.seed} if keep_figures else {}
        return result

    written = []
    monkeypatch.setattr(demo, "_warm_up", lambda device: None)
    monkeypatch.setattr(demo, "run_once", run_once)
    monkeypatch.setattr(
        demo, "write_figures", lambda figures, out, seed: written.append(figures) or [out / "a.png"]
    )
    return calls, written


@pytest.mark.parametrize(
    "options, epochs, holdouts",
    [
        (["--quick", "--seed", "12", "--repeats", "2"], 5, [(2,), (3,)]),
        (["--quick", "--epochs", "3"], 3, [(0,)]),
        ([], 50, [tuple(range(10))]),
        (["--epochs", "2", "--seed", "7"], 2, [tuple(range(10))]),
    ],
)
def test_each_seed_gets_its_epochs_holdout_and_figures(
    options, epochs, holdouts, tmp_path, capsys, monkeypatch
):
    calls, written = _fake_runs(monkeypatch)
    assert main(["demo", "--device", "cpu", "--out", str(tmp_path), *options]) == 0
    first = int(options[options.index("--seed") + 1]) if "--seed" in options else 0
    assert [s.seed for s, _ in calls] == [first + i for i in range(len(holdouts))]
    assert [s.epochs for s, _ in calls] == [epochs] * len(holdouts)
    assert [s.holdout_digits for s, _ in calls] == holdouts
    assert [keep for _, keep in calls] == [True] + [False] * (len(holdouts) - 1)
    assert written == [{"seed": first}]  # the first seed's figures
    text = capsys.readouterr().out
    assert text.count("mean over held-out digits 0-9") == 1  # the seeds' note, once
    assert f"\nwrote {tmp_path / 'a.png'}\n" in text


def test_mse_sums_over_pixels_and_averages_over_samples():
    x = np.zeros((3, 64))
    reconstruction = np.ones((3, 64))
    reconstruction[0] = 0.0
    assert demo._mse(reconstruction, x) == pytest.approx(64 * 2 / 3)


def test_probe_standardizes_features_of_any_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] > 0).astype(int)
    x[:, 0] *= 1e-4  # the informative feature is tiny: unscaled, L2 keeps its weight small
    assert demo._probe(x[:300], y[:300], x[300:], y[300:], seed=0) > 0.95


def test_nmi_clusters_into_ten_groups():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    codes = np.eye(10)[labels] * 10 + rng.normal(scale=0.01, size=(200, 10))
    assert demo._nmi(codes, labels, seed=0) == pytest.approx(1.0)


def test_run_once_feeds_each_task_its_data(monkeypatch):
    """One seed, tiny models: the anomaly detectors train on normal data only, the probe on
    the 75% split, the semi-supervised model sees 10% of the labels, the inputs are in [0, 1]."""
    import sklearn.metrics
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    from fastae.applications import SemiSupervisedAutoencoder
    from fastae.sklearn import AutoencoderOutlierDetector

    fits, semi, probes = [], [], []
    fit, semi_fit, probe = (
        AutoencoderOutlierDetector.fit,
        SemiSupervisedAutoencoder.fit,
        demo._probe,
    )

    def spy_fit(self, X, y=None):
        fits.append(np.asarray(X))
        return fit(self, X, y)

    def spy_semi(self, X, y):
        semi.append(np.asarray(y))
        return semi_fit(self, X, y)

    def spy_probe(train_x, train_y, test_x, test_y, seed):
        probes.append((len(train_x), len(test_x)))
        return probe(train_x, train_y, test_x, test_y, seed)

    monkeypatch.setattr(AutoencoderOutlierDetector, "fit", spy_fit)
    monkeypatch.setattr(SemiSupervisedAutoencoder, "fit", spy_semi)
    monkeypatch.setattr(demo, "_probe", spy_probe)
    aurocs, roc_auc_score = [], sklearn.metrics.roc_auc_score
    samples, score_samples = [], AutoencoderOutlierDetector.score_samples

    def spy_auroc(y_true, score):
        aurocs.append((np.asarray(y_true), np.asarray(score), roc_auc_score(y_true, score)))
        return aurocs[-1][2]

    def spy_samples(self, X):
        samples.append(score_samples(self, X))
        return samples[-1]

    monkeypatch.setattr(sklearn.metrics, "roc_auc_score", spy_auroc)
    monkeypatch.setattr(AutoencoderOutlierDetector, "score_samples", spy_samples)
    settings = demo.Settings(1, "cpu", 4, 1, (3, 5), verbose=False)
    result = demo.run_once(settings, keep_figures=True)

    digits = load_digits()
    _, _, y_tr, _ = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=1
    )
    cancer = load_breast_cancer()
    malignant = (cancer.target == 0).astype(int)
    _, _, m_tr, _ = train_test_split(
        cancer.data, malignant, test_size=0.25, stratify=malignant, random_state=1
    )
    normal_digits, benign = {(y_tr != 3).sum(), (y_tr != 5).sum()}, (m_tr == 0).sum()
    assert {len(x) for x in fits} == normal_digits | {benign}
    assert all(x.shape[1] == 64 for x in fits if len(x) in normal_digits)
    assert all(x.shape[1] == 30 for x in fits if len(x) == benign)
    labeled = sum(max(1, round(0.1 * (y_tr == d).sum())) for d in range(10))
    assert all((y >= 0).sum() == labeled and len(y) == len(y_tr) for y in semi) and semi
    assert (len(y_tr), len(digits.data) - len(y_tr)) in probes  # codes: the 75/25 split
    assert (labeled, len(digits.data) - len(y_tr)) in probes  # raw pixels on 10% of labels
    assert result.figures["x_te"].min() >= 0 and result.figures["x_te"].max() <= 1
    assert result.figures["digit_detector"].get_params()["noise"] is not None  # denoising AE
    # the first held-out digit's detectors (five autoencoders, the VAE scored two ways): the
    # held-out digit is the positive class, a larger reconstruction error the higher score
    y_te = result.figures["y_te"]
    for (y_true, score, _), kept in zip(aurocs[:7], samples[:7], strict=True):
        assert np.array_equal(y_true, y_te == 3) and np.array_equal(score, -kept)
    assert result.notes["holdout"] == "held-out digit 3,5"
    # the digit column: each row's mean over the two held-out digits
    per_digit = [value for y_true, _, value in aurocs if len(y_true) == len(y_te)]
    half = len(per_digit) // 2
    means = [(a + b) / 2 for a, b in zip(per_digit[:half], per_digit[half:], strict=True)]
    column = [cells["auroc_digit"] for cells in result.rows.values() if "auroc_digit" in cells]
    assert sorted(column) == pytest.approx(sorted(means))


def test_the_demo_trains_on_one_thread_then_gives_back_the_callers(tmp_path, monkeypatch):
    """conftest runs the tests on one thread, which would hide both halves: start from 2."""
    used = []
    monkeypatch.setattr(
        demo, "_run_checked", lambda args, epochs, device: used.append(torch.get_num_threads()) or 0
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
        assert used == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_unwritable_out_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """os.access stands in for the permission bits, which root (CI containers) ignores."""
    monkeypatch.setattr(demo, "_warm_up", lambda device: pytest.fail("trained"))
    access = demo.os.access
    monkeypatch.setattr(
        demo.os, "access", lambda path, mode: path != tmp_path and access(path, mode)
    )
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --out {str(tmp_path)!r} is not writable\n"


def test_the_demo_names_both_missing_extras(tmp_path, capsys, monkeypatch):
    find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util,
        "find_spec",
        lambda name, *args: None if name in ("sklearn", "matplotlib") else find_spec(name, *args),
    )
    monkeypatch.setattr(demo, "_warm_up", lambda device: pytest.fail("trained"))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: the demo needs sklearn and matplotlib: pip install 'fastae[apps]'\n"
    )


def test_table_rows_follow_row_order_whatever_order_they_were_set_in():
    result = demo.Result()
    names = ["IsolationForest", "raw pixels", "PCA (32)", "VAE 64-128-8", "DEC on contractive AE",
             "stacked DAE 64-64-32", "deep AE 64-64-32", "contractive AE", "denoising AE",
             "sparse AE", "plain AE"]  # fmt: skip
    for name in names:
        result.set(name, "time", 1.0)
    rows = [line.split("  ")[0] for line in demo.format_table([result]).splitlines()[2:]]
    assert rows == names[::-1]


def test_the_warm_up_leaves_the_global_torch_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    demo._warm_up(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
