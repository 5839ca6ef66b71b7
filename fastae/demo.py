"""The main job: plain, sparse, denoising and contractive autoencoders on digits, compared.

``python -m fastae demo`` trains the four variants (and a deep autoencoder, a stacked
denoising autoencoder, DEC and a VAE) on scikit-learn's 8x8 digits (no download) and prints
one table: reconstruction error, linear-probe accuracy of the codes against raw pixels and PCA
of the same size, k-means NMI on codes (and after DEC refinement), anomaly AUROC (a held-out
digit class; breast_cancer with malignant as the anomaly) against PCA reconstruction error and
IsolationForest, semi-supervised accuracy with 10% of the labels against logistic regression
on those labels, and train time. It writes PNGs to ``--out``: learned filters,
reconstructions of clean and corrupted inputs, a 2-D code scatter, anomaly-score histograms,
the pixels behind the most abnormal digits' scores and samples of a VAE. ``--quick`` is the
CI smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .modules import KLSparsity
from .noise import MaskingNoise

VARIANTS = ("plain", "sparse", "denoising", "contractive")
# share of the training labels the semi-supervised task keeps
LABELED_FRACTION = 0.1
CANCER_CODE = 8  # code size on breast_cancer (30 features)
FULL_EPOCHS, QUICK_EPOCHS = 50, 5
DIGITS_PIXELS = 64  # the largest code PCA (and a useful autoencoder) can have on digits
FIGURES = (  # what write_figures writes under --out
    "filters.png",
    "reconstructions.png",
    "codes_2d.png",
    "anomaly_scores.png",
    "anomaly_pixels.png",
    "vae_samples.png",
)
SEED_MAX = 2**32 - 1  # scikit-learn's random_state range
# the VAE row: hidden units, latent dimensions and Adam's learning rate (batches of 64)
VAE_HIDDEN, VAE_LATENT, VAE_LR = 128, 8, 3e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fastae demo``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_EPOCHS} epochs instead of {FULL_EPOCHS}, one held-out digit (a smoke run)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of splits and training (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run seeds seed..seed+N-1, report mean and std"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if present, the default), cpu, cuda[:N]"
    )
    parser.add_argument(
        "--out", default="fastae-demo", help="folder for the PNGs (default: %(default)s)"
    )
    parser.add_argument(
        "--hidden", type=int, default=32, help="code size on digits (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs per model (default: {FULL_EPOCHS}, {QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch's CPU threads (default: %(default)s: the demo's models are too small to gain "
        "from more, and on a busy machine each extra thread waits for a core)",
    )


def regularizers(name: str) -> dict:
    """The keyword arguments that make each variant (one regularizer each)."""
    return {
        "plain": {},
        "sparse": {"sparsity": KLSparsity(rho=0.05, weight=0.1)},
        "denoising": {"noise": MaskingNoise(p=0.3)},
        "contractive": {"contractive": 0.1},
    }[name]


def autoencoder_rows(inputs: int, hidden: int) -> dict[str, dict]:
    """Table row -> estimator keyword arguments: the four one-layer variants, then a plain
    deep autoencoder (one hidden layer of 2 * hidden units before the code, sigmoid units,
    trained end to end) of the stacked row's sizes."""
    rows = {f"{name} AE": regularizers(name) for name in VARIANTS}
    rows[f"deep AE {inputs}-{2 * hidden}-{hidden}"] = {"hidden_layer_sizes": (2 * hidden,)}
    return rows


@dataclass
class Settings:
    seed: int
    device: str
    hidden: int
    epochs: int
    holdout_digits: tuple[int, ...]
    verbose: bool = True


@dataclass
class Result:
    """Metrics per row of the table (NaN where a row has no such number)."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)

    def set(self, row: str, column: str, value: float) -> None:
        self.rows.setdefault(row, {})[column] = float(value)


COLUMNS = (
    ("loss", "train loss", "{:.2f}"),
    ("mse", "recon MSE", "{:.2f}"),
    ("probe", "probe acc", "{:.3f}"),
    ("nmi", "k-means NMI", "{:.3f}"),
    ("auroc_digit", "AUROC digit", "{:.3f}"),
    ("auroc_cancer", "AUROC cancer", "{:.3f}"),
    ("semi", "10% labels", "{:.3f}"),
    ("time", "time s", "{:.1f}"),
)


def _argument_error(args: argparse.Namespace) -> str | None:
    """What makes the command line unusable, found before anything trains (the output folder
    is made here: one that cannot be would otherwise fail the run at its end)."""
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        return f"the demo needs {' and '.join(missing)}: pip install 'fastae[apps]'"
    for name in ("repeats", "hidden", "epochs", "threads"):
        value = getattr(args, name)
        if value is not None and not 1 <= value < 2**63:
            return f"--{name} must be a positive int below 2**63, got {value}"
    from .benchmark import usable_cores

    cores = usable_cores()
    if args.threads is not None and args.threads > cores:
        return f"--threads must be at most {cores} (the cores it may run on), got {args.threads}"
    if args.hidden > DIGITS_PIXELS:
        return f"--hidden must be at most {DIGITS_PIXELS} (the digits' pixels), got {args.hidden}"
    last = args.seed + args.repeats - 1
    if args.seed < 0 or last > SEED_MAX:
        return f"--seed must make seeds in [0, {SEED_MAX}], got {args.seed}..{last}"
    from .sklearn import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as error:
        return f"--{error}"
    if not args.out:
        return "--out must name a folder, got ''"
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {args.out!r} is not a folder that can be made: {error.strerror}"
    if not os.access(out, os.W_OK):
        return f"--out {args.out!r} is not writable"
    for name in FIGURES:
        path = out / name
        if path.exists() and not (path.is_file() and os.access(path, os.W_OK)):
            return f"--out {args.out!r} holds {name}, which is not a file that can be replaced"
    return None


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)


def _tick(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _probe(train_x, train_y, test_x, test_y, seed: int) -> float:
    """Linear probe: standardize, then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    return clf.fit(train_x, train_y).score(test_x, test_y)


def _nmi(codes, labels, seed: int) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    from .applications import cluster_codes

    kmeans = cluster_codes(codes, 10, random_state=seed)
    return normalized_mutual_info_score(labels, kmeans.labels_)


def _mse(reconstruction, x) -> float:
    return float(((reconstruction - x) ** 2).sum(1).mean())


def run_once(settings: Settings, keep_figures: bool) -> Result:
    """Every task for one seed."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    from .applications import DECClustering, SemiSupervisedAutoencoder, StackedAutoencoder
    from .sklearn import AutoencoderOutlierDetector, AutoencoderTransformer, _seeded
    from .training import fit
    from .vae import VAE

    s, result = settings, Result()
    seed, hidden, epochs = s.seed, s.hidden, s.epochs
    common = {"epochs": epochs, "device": s.device, "random_state": seed}
    digits = load_digits()
    x_all, y_all = digits.data / 16.0, digits.target
    x_tr, x_te, y_tr, y_te = train_test_split(
        x_all, y_all, test_size=0.25, stratify=y_all, random_state=seed
    )

    # ------------------------------------------------------------ representation learning
    models = {}  # the one-layer variants, for the figures
    rows = autoencoder_rows(x_tr.shape[1], hidden)
    for row, params in rows.items():
        model = AutoencoderTransformer(hidden, scale=None, verbose=s.verbose, **common)
        model.set_params(**params)
        start = time.perf_counter()
        model.fit(x_tr)
        seconds = time.perf_counter() - start
        name = row.removesuffix(" AE")
        if name in VARIANTS:
            models[name] = model
        codes_tr, codes_te = model.transform(x_tr), model.transform(x_te)
        result.set(row, "loss", model.loss_curve_[-1])
        result.set(row, "mse", _mse(model.inverse_transform(codes_te), x_te))
        result.set(row, "probe", _probe(codes_tr, y_tr, codes_te, y_te, seed))
        result.set(row, "nmi", _nmi(codes_te, y_te, seed))
        result.set(row, "time", seconds)
        if s.verbose:
            print(
                f"  {row:<18} train loss {model.loss_curve_[-1]:8.3f}  "
                f"test recon MSE {result.rows[row]['mse']:6.3f}  {seconds:6.1f} s",
                flush=True,
            )

    start = time.perf_counter()
    pca = PCA(hidden, random_state=seed).fit(x_tr)
    pca_seconds = time.perf_counter() - start
    pca_row = f"PCA ({hidden})"
    codes_tr, codes_te = pca.transform(x_tr), pca.transform(x_te)
    result.set(pca_row, "mse", _mse(pca.inverse_transform(codes_te), x_te))
    result.set(pca_row, "probe", _probe(codes_tr, y_tr, codes_te, y_te, seed))
    result.set(pca_row, "nmi", _nmi(codes_te, y_te, seed))
    result.set(pca_row, "time", pca_seconds)
    result.set("raw pixels", "mse", 0.0)
    result.set("raw pixels", "probe", _probe(x_tr, y_tr, x_te, y_te, seed))
    result.set("raw pixels", "nmi", _nmi(x_te, y_te, seed))

    # stacked denoising autoencoder: greedy layer-wise pretraining, then the stack fine-tuned
    sizes = (2 * hidden, hidden)
    stacked = StackedAutoencoder(
        sizes, scale=None, noise=MaskingNoise(p=0.3), pretrain_epochs=epochs,
        finetune_epochs=epochs, device=s.device, random_state=seed, verbose=s.verbose,
    )  # fmt: skip
    start = time.perf_counter()
    stacked.fit(x_tr)
    stack_row = f"stacked DAE {x_tr.shape[1]}-{sizes[0]}-{sizes[1]}"
    codes_tr, codes_te = stacked.transform(x_tr), stacked.transform(x_te)
    result.set(stack_row, "loss", stacked.loss_curve_[-1])
    result.set(stack_row, "mse", _mse(stacked.inverse_transform(codes_te), x_te))
    result.set(stack_row, "probe", _probe(codes_tr, y_tr, codes_te, y_te, seed))
    result.set(stack_row, "nmi", _nmi(codes_te, y_te, seed))
    result.set(stack_row, "time", time.perf_counter() - start)
    # a 2-unit stack for the scatter plot (tanh: 2 sigmoid units saturate at the corners)
    flat = StackedAutoencoder(
        (hidden, 2), activation="tanh", scale=None, pretrain_epochs=epochs,
        finetune_epochs=epochs, device=s.device, random_state=seed,
    )  # fmt: skip
    flat_codes_te = flat.fit(x_tr).transform(x_te)

    # DEC refinement of the k-means clusters on the contractive autoencoder's codes
    dec = DECClustering(
        10,
        autoencoder=AutoencoderTransformer(hidden, scale=None, **common, contractive=0.1),
        refine_epochs=max(2, epochs // 5),
        random_state=seed,
    )
    start = time.perf_counter()
    dec.fit(x_tr)
    from sklearn.metrics import normalized_mutual_info_score

    result.set(
        "DEC on contractive AE", "nmi", normalized_mutual_info_score(y_te, dec.predict(x_te))
    )
    result.set("DEC on contractive AE", "time", time.perf_counter() - start)

    # variational autoencoder: its codes are the posterior means
    vae_row = f"VAE {x_tr.shape[1]}-{VAE_HIDDEN}-{VAE_LATENT}"
    vae_reconstruction_row = "VAE, reconstruction score"  # the same detectors, scored so
    vae_settings = {"model": "vae", "hidden": VAE_HIDDEN, "lr": VAE_LR}
    with _seeded(seed, torch.device(s.device)):
        vae = VAE(x_tr.shape[1], VAE_HIDDEN, VAE_LATENT).to(s.device)
        start = time.perf_counter()
        train = torch.tensor(x_tr, dtype=torch.float32, device=s.device)
        history = fit(vae, train, epochs=epochs, batch_size=64, lr=VAE_LR, seed=seed,
                      progress=s.verbose)  # fmt: skip
        seconds = time.perf_counter() - start
    with torch.no_grad():
        test = torch.tensor(x_te, dtype=torch.float32, device=s.device)
        codes_tr, codes_te = vae.encode(train).cpu().numpy(), vae.encode(test).cpu().numpy()
        result.set(vae_row, "mse", _mse(vae.reconstruct(test).cpu().numpy(), x_te))
    result.set(vae_row, "loss", history.loss[-1])
    result.set(vae_row, "probe", _probe(codes_tr, y_tr, codes_te, y_te, seed))
    result.set(vae_row, "nmi", _nmi(codes_te, y_te, seed))
    result.set(vae_row, "time", seconds)

    # ------------------------------------------------------------ anomaly detection
    digit_scores = {}
    bar = _progress(len(s.holdout_digits) * (len(rows) + 3), "held-out digits", s.verbose)
    aurocs: dict[str, list[float]] = {}
    for digit in s.holdout_digits:
        normal = x_tr[y_tr != digit]
        is_anomaly = (y_te == digit).astype(int)
        scores = {}
        for row, params in rows.items():
            detector = AutoencoderOutlierDetector(hidden, scale=None, **common)
            detector.set_params(**params)
            scores[row] = -detector.fit(normal).score_samples(x_te)
            if digit == s.holdout_digits[0] and row == "denoising AE":
                digit_detector = detector
            _tick(bar, 1)
        detector = AutoencoderOutlierDetector(VAE_LATENT, scale=None, **common, **vae_settings)
        scores[vae_row] = -detector.fit(normal).score_samples(x_te)
        # the same seed trains the same VAE, scored by its reconstruction loss alone
        detector.set_params(anomaly_score="reconstruction")
        scores[vae_reconstruction_row] = -detector.fit(normal).score_samples(x_te)
        _tick(bar, 1)
        forest = IsolationForest(random_state=seed).fit(normal)
        scores["IsolationForest"] = -forest.score_samples(x_te)
        digit_pca = PCA(hidden, random_state=seed).fit(normal)
        scores[pca_row] = (
            (digit_pca.inverse_transform(digit_pca.transform(x_te)) - x_te) ** 2
        ).sum(1)
        _tick(bar, 2)
        for row, score in scores.items():
            aurocs.setdefault(row, []).append(roc_auc_score(is_anomaly, score))
        if digit == s.holdout_digits[0]:
            digit_scores = {row: (score, is_anomaly) for row, score in scores.items()}
    if bar is not None:
        bar.close()
    for row, values in aurocs.items():
        result.set(row, "auroc_digit", np.mean(values))

    cancer = load_breast_cancer()
    malignant = (cancer.target == 0).astype(int)
    c_tr, c_te, m_tr, m_te = train_test_split(
        cancer.data, malignant, test_size=0.25, stratify=malignant, random_state=seed
    )
    benign = c_tr[m_tr == 0]
    cancer_scores = {}
    for row, params in rows.items():
        detector = AutoencoderOutlierDetector(CANCER_CODE, scale="standard", **common)
        detector.set_params(**params)
        cancer_scores[row] = -detector.fit(benign).score_samples(c_te)
    detector = AutoencoderOutlierDetector(CANCER_CODE, scale="standard", **common, **vae_settings)
    cancer_scores[vae_row] = -detector.fit(benign).score_samples(c_te)
    detector.set_params(anomaly_score="reconstruction")
    cancer_scores[vae_reconstruction_row] = -detector.fit(benign).score_samples(c_te)
    cancer_scores["IsolationForest"] = (
        -IsolationForest(random_state=seed).fit(benign).score_samples(c_te)
    )
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cancer_pca = make_pipeline(StandardScaler(), PCA(CANCER_CODE, random_state=seed)).fit(benign)
    scaled = cancer_pca[0].transform(c_te)
    projected = cancer_pca[1].inverse_transform(cancer_pca[1].transform(scaled))
    cancer_scores[pca_row] = ((projected - scaled) ** 2).sum(1)
    for row, score in cancer_scores.items():
        result.set(row, "auroc_cancer", roc_auc_score(m_te, score))

    # ------------------------------------------------------------ semi-supervised
    rng = np.random.default_rng(seed)
    labeled = np.zeros(len(y_tr), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(y_tr == digit)
        count = max(1, round(LABELED_FRACTION * len(members)))
        labeled[rng.choice(members, count, replace=False)] = True
    y_semi = np.where(labeled, y_tr, -1)
    for row, params in rows.items():
        model = SemiSupervisedAutoencoder(hidden, scale=None, **common)
        model.set_params(**params)
        result.set(row, "semi", model.fit(x_tr, y_semi).score(x_te, y_te))
    result.set("raw pixels", "semi", _probe(x_tr[labeled], y_tr[labeled], x_te, y_te, seed))

    result.notes["holdout"] = (
        "mean over held-out digits 0-9"
        if len(s.holdout_digits) == 10
        else "held-out digit " + ",".join(map(str, s.holdout_digits))
    )
    if keep_figures:
        result.figures = {
            "models": models,
            "x_te": x_te,
            "y_te": y_te,
            "stack_codes": flat_codes_te,
            "stack_name": f"stacked AE {x_tr.shape[1]}-{hidden}-2 (tanh)",
            "digit_scores": digit_scores,
            "digit": s.holdout_digits[0],
            "digit_detector": digit_detector,
            "cancer_scores": (cancer_scores, m_te),
            "vae": vae,
            "vae_name": vae_row,
        }
    return result


# ---------------------------------------------------------------------------- the table

ROW_ORDER = (
    "plain AE",
    "sparse AE",
    "denoising AE",
    "contractive AE",
    "deep AE",
    "stacked",
    "DEC",
    "VAE",
    "PCA",
    "raw pixels",
    "IsolationForest",
)


def _ordered(rows) -> list[str]:
    def key(row: str) -> int:
        for i, prefix in enumerate(ROW_ORDER):
            if row.startswith(prefix):
                return i
        return len(ROW_ORDER)

    return sorted(rows, key=key)


def format_table(results: list[Result]) -> str:
    """One table; with several results each cell is mean ± std over them."""
    rows = _ordered(results[0].rows)
    width = max(len(row) for row in rows) + 2
    cell = 15 if len(results) > 1 else 13
    header = "model".ljust(width) + "".join(title.rjust(cell) for _, title, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        text = row.ljust(width)
        for key, _, fmt in COLUMNS:
            values = [r.rows.get(row, {}).get(key, np.nan) for r in results]
            values = np.array(values, dtype=float)
            if np.all(np.isnan(values)):
                text += "-".rjust(cell)
            elif len(results) == 1:
                text += fmt.format(values[0]).rjust(cell)
            else:
                mean, std = np.nanmean(values), np.nanstd(values)
                text += f"{fmt.format(mean)}±{fmt.format(std)}".rjust(cell)
        lines.append(text)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- pictures


def _grid(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """Tile (n, 8, 8) images into one array, NaN gaps between them."""
    size = images.shape[1]
    canvas = np.full((rows * (size + pad) - pad, cols * (size + pad) - pad), np.nan)
    for i, image in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[
            r * (size + pad) : r * (size + pad) + size, c * (size + pad) : c * (size + pad) + size
        ] = image
    return canvas


def write_figures(figures: dict, out: Path, seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import ops

    out.mkdir(parents=True, exist_ok=True)
    models, x_te, y_te = figures["models"], figures["x_te"], figures["y_te"]
    written = []

    # learned filters: encoder weight rows as 8x8 images
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.2))
    for ax, (name, model) in zip(axes.ravel(), models.items(), strict=True):
        weight = model.module_.weight.detach().cpu().numpy()
        weight = weight / (np.abs(weight).max(1, keepdims=True) + 1e-12)
        cols = 8
        rows = -(-len(weight) // cols)
        grid = _grid(weight.reshape(-1, 8, 8), rows, cols)
        ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle("learned filters (encoder weights, one 8x8 image per hidden unit)", fontsize=10)
    written.append(_save(fig, out / "filters.png"))

    # reconstructions of clean and corrupted test digits
    picks = np.array([np.flatnonzero(y_te == digit)[0] for digit in range(10)])
    clean = x_te[picks]
    corrupted = (
        ops.corrupt(torch.tensor(clean, dtype=torch.float32), MaskingNoise(p=0.3, seed=seed))
        .numpy()
        .astype(np.float64)
    )
    panels = [("clean input", clean)]
    panels += [(name, m.inverse_transform(m.transform(clean))) for name, m in models.items()]
    panels += [("30% masked", corrupted)]
    panels += [(name, m.inverse_transform(m.transform(corrupted))) for name, m in models.items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.8 * len(panels)))
    for ax, (title, images) in zip(axes, panels, strict=True):
        grid = _grid(images.reshape(-1, 8, 8), 1, 10)
        ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("reconstructions: clean (top) and corrupted (bottom) inputs", fontsize=9)
    written.append(_save(fig, out / "reconstructions.png"))

    # 2-D codes of the stacked autoencoder vs the first two principal components
    from sklearn.decomposition import PCA

    codes = figures["stack_codes"]
    pixels_2d = PCA(2, random_state=seed).fit_transform(x_te)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4))
    for ax, (title, points) in zip(
        axes,
        ((figures["stack_name"] + " codes", codes), ("PCA, 2 components", pixels_2d)),
        strict=True,
    ):
        sc = ax.scatter(points[:, 0], points[:, 1], c=y_te, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes, ticks=range(10), label="digit")
    written.append(_save(fig, out / "codes_2d.png"))

    # anomaly-score histograms: the denoising AE vs IsolationForest on both tasks
    digit_scores, digit = figures["digit_scores"], figures["digit"]
    cancer_scores, malignant = figures["cancer_scores"]
    fig, axes = plt.subplots(2, 2, figsize=(8.5, 5.5))
    tasks = (
        (f"held-out digit {digit}", digit_scores, None),
        ("breast cancer (malignant)", cancer_scores, malignant),
    )
    for r, (task, scores, labels) in enumerate(tasks):
        for c, row in enumerate(("denoising AE", "IsolationForest")):
            if labels is None:
                score, labels_ = scores[row]
            else:
                score, labels_ = scores[row], labels
            ax = axes[r, c]
            name = "-score_samples"
            if row.endswith("AE"):
                score, name = np.log10(np.maximum(score, 1e-6)), "log10 reconstruction error"
            bins = np.histogram_bin_edges(score, bins=40)
            ax.hist(score[labels_ == 0], bins=bins, alpha=0.6, density=True, label="normal")
            ax.hist(score[labels_ == 1], bins=bins, alpha=0.6, density=True, label="anomaly")
            ax.set_title(f"{task}: {row}", fontsize=9)
            ax.set_xlabel(name, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "anomaly_scores.png"))

    # the most abnormal test digits and the pixels their scores come from
    detector, x_te = figures["digit_detector"], figures["x_te"]
    scores = -detector.score_samples(x_te)
    top = np.argsort(scores)[::-1][:10]
    shares = detector.feature_scores(x_te[top])
    fig, axes = plt.subplots(2, 1, figsize=(7, 1.9))
    panels = (
        ("input", x_te[top], "gray_r"),
        ("pixel scores", shares / shares.max(1, keepdims=True), "Reds"),
    )
    for ax, (title, images, cmap) in zip(axes, panels, strict=True):
        grid = _grid(images.reshape(-1, 8, 8), 1, 10)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"the 10 highest anomaly scores (denoising AE, digit {figures['digit']} held out) and "
        "each pixel's share (feature_scores, per image scaled to its largest)",
        fontsize=8,
    )
    written.append(_save(fig, out / "anomaly_pixels.png"))

    # new digits from the VAE: decoded means of z ~ N(0, I)
    from .vae import save_image_grid

    samples = figures["vae"].sample(64, generator=torch.Generator().manual_seed(seed))
    path = out / "vae_samples.png"
    save_image_grid(samples.cpu(), path, (8, 8), title=f"{figures['vae_name']}: 64 samples")
    written.append(path)
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- entry point


def _joined(notes) -> str:
    """The seeds' notes, each once, in order."""
    return "; ".join(dict.fromkeys(notes))


def _warm_up(device: torch.device) -> None:
    """One tiny training step, so one-time set-up is not billed to the first model's time."""
    from .modules import Autoencoder
    from .training import fit
    from .vae import VAE

    with torch.random.fork_rng(devices=[]):
        model = Autoencoder(4, 2, noise=MaskingNoise(p=0.1), contractive=0.1).to(device)
        fit(model, torch.rand(8, 4, device=device), epochs=1, batch_size=8, progress=False)
        fit(VAE(4, 2, 2).to(device), torch.rand(8, 4, device=device), epochs=1, batch_size=8,
            progress=False)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``python -m fastae demo``: train, print the table, write the figures; the exit
    status."""
    problem = _argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    epochs = args.epochs
    if epochs is None:
        epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    from .sklearn import resolve_device

    device = resolve_device(args.device)  # checked above
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run_checked(args, epochs, device)
    finally:
        torch.set_num_threads(threads)


def _run_checked(args: argparse.Namespace, epochs: int, device: torch.device) -> int:
    print(
        f"fastae demo: digits (1797 x 64), code size {args.hidden}, {epochs} epochs, "
        f"device {device}, seed{'s' if args.repeats > 1 else ''} "
        + ", ".join(str(args.seed + i) for i in range(args.repeats)),
        flush=True,
    )
    _warm_up(device)
    results, start = [], time.perf_counter()
    for i in range(args.repeats):
        seed = args.seed + i
        holdout = (seed % 10,) if args.quick else tuple(range(10))
        settings = Settings(seed, str(device), args.hidden, epochs, holdout)
        results.append(run_once(settings, keep_figures=(i == 0)))
        if args.repeats > 1:
            print(f"\nseed {seed}\n{format_table(results[-1:])}\n", flush=True)
    if args.repeats > 1:
        print(f"mean ± std over {args.repeats} seeds")
    else:
        print()
    print(format_table(results))
    holdout = _joined(result.notes["holdout"] for result in results)
    print(
        f"\nprobe acc: logistic regression on standardized codes (test split, 25%). "
        f"AUROC digit: {holdout}, trained on the other classes. AUROC cancer: "
        f"trained on benign, code size {CANCER_CODE}. 10% labels: SemiSupervisedAutoencoder "
        f"(raw pixels row: logistic regression on the labelled 10% only). recon MSE: squared "
        f"error summed over the 64 pixels in [0, 1]. VAE: codes are posterior means, train "
        f"loss the negative ELBO, anomaly score the negative ELBO (model='vae' detector; "
        f"the next row scores the same detectors by reconstruction loss alone). "
        f"time: training seconds."
    )
    written = write_figures(results[0].figures, Path(args.out), args.seed)
    print("\nwrote " + ", ".join(str(path) for path in written))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
