"""fastae's outlier detector beside PyOD's AutoEncoder and IsolationForest, on the CPU.

    pip install pyod        # a peer to measure, not a dependency of fastae
    python bench/peers.py --seeds 0,1,2 --out bench/results/peers-cpu.md

The anomaly tasks of ``python -m fastae demo``: scikit-learn's 8x8 digits (pixels / 16, 75/25
stratified split), one class held out as the anomaly (trained on the other nine classes'
training rows, AUROC on the test split, mean over the ten classes), and breast_cancer
(trained on the benign training rows, malignant = anomaly). Per detector, AUROC and the
seconds to fit and score (digits: the mean over the ten), mean ± std over the seeds (each
seed splits the data and seeds every detector); the detectors take turns on each task, so a
busy machine slows them alike. Detectors:

- fastae: ``AutoencoderOutlierDetector`` as the demo trains it (one sigmoid layer of 32 units
  on digits, 8 on breast_cancer, standardized there; 50 epochs, batch 64, Adam 1e-2), plain
  and denoising (30% masking).
- PyOD: ``pyod.models.auto_encoder.AutoEncoder`` with its defaults (64-32 ReLU layers with
  batch norm and dropout 0.2, its own standardization, 10 epochs, batch 32, Adam 1e-3), and
  with fastae's 50 epochs and batch 64.
- scikit-learn's ``IsolationForest`` (defaults).

Without PyOD installed the PyOD rows are left out (said in the output).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from fastae import AutoencoderOutlierDetector, MaskingNoise

EPOCHS, BATCH, LR = 50, 64, 1e-2  # the demo's training
DIGITS_CODE, CANCER_CODE = 32, 8

# a detector: (fit on normal rows, then anomaly scores: higher = more abnormal)
Detector = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _fastae(code: int, scale: str | None, seed: int, epochs: int, noise=None) -> Detector:
    def run(normal, test):
        detector = AutoencoderOutlierDetector(
            code, scale=scale, epochs=epochs, batch_size=BATCH, lr=LR, noise=noise,
            random_state=seed,
        )  # fmt: skip
        return -detector.fit(normal).score_samples(test)

    return run


def _pyod(seed: int, epochs: int | None = None) -> Detector:
    from pyod.models.auto_encoder import AutoEncoder

    options = {} if epochs is None else {"epoch_num": epochs, "batch_size": BATCH}

    def run(normal, test):
        return (
            AutoEncoder(verbose=0, random_state=seed, **options).fit(normal).decision_function(test)
        )

    return run


def _forest(seed: int) -> Detector:
    def run(normal, test):
        return -IsolationForest(random_state=seed).fit(normal).score_samples(test)

    return run


def detectors(task: str, seed: int, epochs: int = EPOCHS, pyod: bool = True) -> dict:
    """The detectors by row name for ``task`` ("digits" or "cancer")."""
    code, scale = (DIGITS_CODE, None) if task == "digits" else (CANCER_CODE, "standard")
    rows = {
        "fastae plain": _fastae(code, scale, seed, epochs),
        "fastae denoising (30% masking)": _fastae(code, scale, seed, epochs, MaskingNoise(0.3)),
    }
    if pyod:
        rows["PyOD AutoEncoder, defaults (10 epochs)"] = _pyod(seed)
        rows[f"PyOD AutoEncoder, {EPOCHS} epochs, batch {BATCH}"] = _pyod(seed, EPOCHS)
    rows["IsolationForest"] = _forest(seed)
    return rows


def tasks(seed: int, held_out: list[int]):
    """(task, normal training rows, test rows, test labels: 1 = anomaly), digits first."""
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, stratify=digits.target,
        random_state=seed,
    )  # fmt: skip
    for digit in held_out:
        yield "digits", x_tr[y_tr != digit], x_te, (y_te == digit).astype(int)
    cancer = load_breast_cancer()
    malignant = (cancer.target == 0).astype(int)
    c_tr, c_te, m_tr, m_te = train_test_split(
        cancer.data, malignant, test_size=0.25, stratify=malignant, random_state=seed
    )
    yield "cancer", c_tr[m_tr == 0], c_te, m_te


def run(seeds: list[int], held_out: list[int], epochs: int = EPOCHS, pyod: bool = True):
    """{(task, row): {"auroc": [per seed], "seconds": [per seed]}}: digits values are means
    over the held-out classes."""
    per_seed: dict = {}
    for seed in seeds:
        for task, normal, test, anomaly in tasks(seed, held_out):
            for row, detect in detectors(task, seed, epochs, pyod).items():
                start = time.perf_counter()
                scores = detect(normal, test)
                seconds = time.perf_counter() - start
                cell = per_seed.setdefault((task, row, seed), {"auroc": [], "seconds": []})
                cell["auroc"].append(roc_auc_score(anomaly, scores))
                cell["seconds"].append(seconds)
    results: dict = {}
    for (task, row, _), cell in per_seed.items():
        out = results.setdefault((task, row), {"auroc": [], "seconds": []})
        out["auroc"].append(statistics.fmean(cell["auroc"]))
        out["seconds"].append(statistics.fmean(cell["seconds"]))
    return results


def _spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: dict) -> str:
    rows = list(dict.fromkeys(row for _, row in results))
    lines = [
        "| detector | digits AUROC | digits s | breast_cancer AUROC | breast_cancer s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = []
        for task in ("digits", "cancer"):
            found = results.get((task, row))
            cells += ["-", "-"] if found is None else [
                _spread(found["auroc"], 3), _spread(found["seconds"], 2)
            ]  # fmt: skip
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="held-out classes")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="fastae's epochs")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    held_out = [int(d) for d in args.digits.split(",")]
    try:
        import pyod

        pyod_line = f"PyOD {pyod.__version__}"
    except ImportError:
        pyod, pyod_line = None, "PyOD not installed: its rows left out"
    warnings.filterwarnings("ignore", category=UserWarning)
    results = run(seeds, held_out, args.epochs, pyod is not None)
    report = "\n".join([
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{pyod_line}; seeds {args.seeds}; held-out digits {args.digits}",
        "",
        table(results),
    ])  # fmt: skip
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
