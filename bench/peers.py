"""fastae beside what its users train today, on the CPU: PyOD's AutoEncoder and
IsolationForest as outlier detectors, and Keras's example autoencoders in training time.

    pip install pyod keras  # peers to measure, not dependencies of fastae
    python bench/peers.py --seeds 0,1,2 --out bench/results/peers-cpu.md

Anomaly detection (``--parts anomaly``), the tasks of ``python -m fastae demo``: scikit-learn's
8x8 digits (pixels / 16, 75/25 stratified split), one class held out as the anomaly (trained
on the other nine classes' training rows, AUROC on the test split, mean over the ten
classes), and breast_cancer (trained on the benign training rows, malignant = anomaly). Per
detector, AUROC and the seconds to fit and score (digits: the mean over the ten), mean ± std
over the seeds (each seed splits the data and seeds every detector); the detectors take turns
on each task, so a busy machine slows them alike, after an untimed fit of each on 128 rows
(one epoch, or the fixed epochs of a row that does not take ``--epochs``) that takes the
process's one-off costs. Detectors:

- fastae: ``AutoencoderOutlierDetector`` as the demo trains it (one sigmoid layer of 32 units
  on digits, 8 on breast_cancer, standardized there; 50 epochs, batch 64, Adam 1e-2), plain
  and denoising (30% masking); plain streamed (the normal rows in chunks of 256 to
  ``partial_fit``, as many passes as epochs, Adam's state carried: out-of-core training);
  and deep, with PyOD's widths (a ``DeepAutoencoder`` 64 -> 32 and back, ReLU, standardized
  inputs, squared error; the same training).
- PyOD: ``pyod.models.auto_encoder.AutoEncoder`` with its defaults (64-32 ReLU layers with
  batch norm and dropout 0.2, its own standardization, 10 epochs, batch 32, Adam 1e-3 with
  weight decay 1e-5), and with fastae's epochs and batch 64 (its own rate, 1e-3); each also
  on fastae's input (``preprocessing=False`` on digits, where fastae takes pixels / 16
  unscaled; breast_cancer is standardized on both sides).
- VAEs: PyOD's ``pyod.models.vae.VAE`` with its defaults (encoder 128-64-32 ReLU, latent 2,
  decoder mirrored, dropout 0.2, weight decay 1e-5, its own standardization; 30 epochs,
  batch 32, Adam 1e-3; its loss clamps the KL term to [0, capacity], capacity 0 by default,
  so it trains without one; the score: the distance of x to the reconstruction of a z it
  samples, so scores change from call to call), also with dropout 0, and fastae's
  ``AutoencoderOutlierDetector(2, model="vae", hidden=(128, 64, 32))`` at the same training
  (standardized, ReLU, no dropout or weight decay; the score: the negative ELBO at z = mu,
  deterministic).
- scikit-learn's ``IsolationForest`` (defaults).

Training (``--parts training``): the dense autoencoders of Keras's autoencoder tutorial
(784 -> 32 ReLU -> 784 sigmoid, binary cross-entropy, Adam 1e-3, 50 epochs, batch 256; sparse
with an L1 activity penalty of 1e-5; deep: 784 -> 128 -> 64 -> 32 -> 64 -> 128 -> 784, ReLU
but the output) and a denoising one with a ``GaussianNoise(0.5)`` layer
on the input (the tutorial's noise level; its denoising model is convolutional), in Keras 3 on
its PyTorch backend, beside the same models in fastae (untied, L1 weight
784e-5: fastae sums the loss over the 784 pixels where Keras averages, ``GaussianNoise(0.5)``;
``DeepAutoencoder(784, (128, 64, 32), activation="relu")``),
on the 8x8 digits upsampled to 28x28 (linear interpolation, 75/25 split). Per model: seconds
to train and the test reconstruction loss (binary cross-entropy summed over pixels, both
models' reconstructions scored by the same numpy code, probabilities clipped to [1e-7,
1 - 1e-7] as Keras does), after an untimed epoch of each library on 128 rows.

Out of core (``--parts streaming``): dimensionality reduction to 32 codes of the 8x8 digits
(pixels / 16, 75/25 split), the training rows streamed in chunks of 256 to ``partial_fit``:
scikit-learn's ``IncrementalPCA`` (one pass, as it needs) beside fastae's
``AutoencoderTransformer`` (its defaults but ``scale=None``: 32 sigmoid units, tied, BCE;
``--epochs`` (50) passes, one epoch each, Adam's state carried), and the same transformer
fitted in memory (``fit``, as many epochs) to show what streaming costs, then fitted in memory
untied (``tied=False``) and on squared error with tanh units (``loss="mse",
activation="tanh"``, tied) to show what the loss and tying cost in squared error (a one-layer
autoencoder with a linear output reconstructs inside an affine space of ``n_components``
dimensions, so on its training rows PCA's error is its floor); last, on standardized pixels,
PCA (``make_pipeline(StandardScaler(), PCA(32))``) beside the transformer with its defaults
(``scale="standard"``: squared error, sigmoid units, tied) and with them untied. Per model:
seconds to train and the test reconstruction error (squared error summed over pixels, mean
over rows, of ``inverse_transform(transform(x))``).

Without PyOD or Keras installed, their rows are left out (said in the output).
"""

from __future__ import annotations

import argparse
import importlib
import os
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
from fastae import benchmark as fb

EPOCHS, BATCH, LR = 50, 64, 1e-2  # the demo's training
DIGITS_CODE, CANCER_CODE = 32, 8
PYOD_VAE_WIDTHS, PYOD_VAE_LATENT, PYOD_VAE_EPOCHS = (128, 64, 32), 2, 30  # its defaults
STREAM_CODE, STREAM_CHUNK, STREAM_PASSES = 32, 256, 50  # out of core: rows per partial_fit

# a detector: (fit on normal rows, then anomaly scores: higher = more abnormal)
Detector = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _fastae(code: int, scale: str | None, seed: int, epochs: int, **options) -> Detector:
    def detect(normal, test):
        detector = AutoencoderOutlierDetector(
            code, scale=scale, epochs=epochs, batch_size=BATCH, lr=LR, random_state=seed,
            **options,
        )  # fmt: skip
        return -detector.fit(normal).score_samples(test)

    return detect


def _fastae_streamed(code: int, scale: str | None, seed: int, passes: int) -> Detector:
    def detect(normal, test):
        detector = AutoencoderOutlierDetector(
            code, scale=scale, batch_size=BATCH, lr=LR, random_state=seed
        )
        for _ in range(passes):
            for start in range(0, len(normal), STREAM_CHUNK):
                detector.partial_fit(normal[start : start + STREAM_CHUNK])
        return -detector.score_samples(test)

    return detect


def _pyod(seed: int, epochs: int | None = None, preprocessing: bool = True) -> Detector:
    from pyod.models.auto_encoder import AutoEncoder

    options = {} if epochs is None else {"epoch_num": epochs, "batch_size": BATCH}
    options["preprocessing"] = preprocessing

    def detect(normal, test):
        return (
            AutoEncoder(verbose=0, random_state=seed, **options).fit(normal).decision_function(test)
        )

    return detect


def _fastae_vae(seed: int) -> Detector:
    def detect(normal, test):
        detector = AutoencoderOutlierDetector(
            PYOD_VAE_LATENT, model="vae", hidden=PYOD_VAE_WIDTHS, activation="relu",
            scale="standard", epochs=PYOD_VAE_EPOCHS, batch_size=32, lr=1e-3, random_state=seed,
        )  # fmt: skip
        return -detector.fit(normal).score_samples(test)

    return detect


def _pyod_vae(seed: int, dropout: float = 0.2) -> Detector:
    from pyod.models.vae import VAE

    def detect(normal, test):
        vae = VAE(epoch_num=PYOD_VAE_EPOCHS, dropout_rate=dropout, verbose=0, random_state=seed)
        return vae.fit(normal).decision_function(test)

    return detect


def _forest(seed: int) -> Detector:
    def detect(normal, test):
        return -IsolationForest(random_state=seed).fit(normal).score_samples(test)

    return detect


def detectors(task: str, seed: int, epochs: int = EPOCHS, pyod: bool = True) -> dict:
    """The detectors by row name for ``task`` ("digits" or "cancer")."""
    code, scale = (DIGITS_CODE, None) if task == "digits" else (CANCER_CODE, "standard")
    rows = {
        "fastae plain": _fastae(code, scale, seed, epochs),
        "fastae denoising (30% masking)": _fastae(
            code, scale, seed, epochs, noise=MaskingNoise(0.3)
        ),
        f"fastae plain, streamed (partial_fit, chunks of {STREAM_CHUNK}, {epochs} passes)": (
            _fastae_streamed(code, scale, seed, epochs)
        ),
        "fastae deep (PyOD's 64-32 ReLU, standardized)": _fastae(
            32, "standard", seed, epochs, hidden_layer_sizes=(64,), activation="relu"
        ),
    }
    if pyod:
        rows["PyOD AutoEncoder, defaults (10 epochs)"] = _pyod(seed)
        rows[f"PyOD AutoEncoder, {epochs} epochs, batch {BATCH}"] = _pyod(seed, epochs)
        # fastae's input: pixels / 16 on digits, standardized on breast_cancer (as PyOD's own)
        same = task == "cancer"
        rows["PyOD AutoEncoder, defaults, fastae's scaling"] = _pyod(seed, preprocessing=same)
        rows[f"PyOD AutoEncoder, {epochs} epochs, batch {BATCH}, fastae's scaling"] = _pyod(
            seed, epochs, preprocessing=same
        )
    rows[f"fastae VAE (PyOD's 128-64-32, latent 2, {PYOD_VAE_EPOCHS} epochs)"] = _fastae_vae(seed)
    if pyod:
        rows[f"PyOD VAE, defaults ({PYOD_VAE_EPOCHS} epochs)"] = _pyod_vae(seed)
        rows[f"PyOD VAE, defaults but dropout 0 ({PYOD_VAE_EPOCHS} epochs)"] = _pyod_vae(seed, 0.0)
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


WARM_UP_ROWS = 128


def warm_up(seed: int, held_out: list[int], pyod: bool = True) -> None:
    """Untimed: each detector fits once on a few rows (one epoch where its epochs are ours),
    so the first one timed is not charged the process's one-off costs (imports, thread pools,
    first calls)."""
    task, normal, test, _ = next(tasks(seed, held_out))
    for detect in detectors(task, seed, 1, pyod).values():
        detect(normal[:WARM_UP_ROWS], test[:WARM_UP_ROWS])


def run(seeds: list[int], held_out: list[int], epochs: int = EPOCHS, pyod: bool = True):
    """{(task, row): {"auroc": [per seed], "seconds": [per seed]}}: digits values are means
    over the held-out classes."""
    warm_up(seeds[0], held_out, pyod)
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


KERAS_EPOCHS, KERAS_BATCH, KERAS_CODE, KERAS_L1, KERAS_NOISE = 50, 256, 32, 1e-5, 0.5
KERAS_DEEP = (128, 64, 32)  # the tutorial's deep autoencoder, mirrored in the decoder


def upsampled_digits(seed: int):
    """The 8x8 digits as 28x28 images in [0, 1], float32 rows: (train, test)."""
    from scipy.ndimage import zoom

    images = load_digits().images / 16.0
    rows = np.stack([zoom(image, 3.5, order=1) for image in images]).reshape(len(images), -1)
    rows = np.clip(rows, 0.0, 1.0).astype(np.float32)
    return train_test_split(rows, test_size=0.25, random_state=seed)


def bce(probabilities: np.ndarray, target: np.ndarray) -> float:
    """Binary cross-entropy summed over pixels, mean over rows (Keras's clip)."""
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    t = target.astype(np.float64)
    return float(-(t * np.log(p) + (1 - t) * np.log1p(-p)).sum(1).mean())


def _keras_model(kind: str):
    import keras

    inputs = keras.Input((784,))
    layer = keras.layers.GaussianNoise(KERAS_NOISE)(inputs) if kind == "denoising" else inputs
    regularizer = keras.regularizers.l1(KERAS_L1) if kind == "sparse" else None
    widths = KERAS_DEEP if kind == "deep" else (KERAS_CODE,)
    for width in widths[:-1]:
        layer = keras.layers.Dense(width, activation="relu")(layer)
    code = keras.layers.Dense(widths[-1], activation="relu", activity_regularizer=regularizer)
    layer = code(layer)
    for width in widths[-2::-1]:
        layer = keras.layers.Dense(width, activation="relu")(layer)
    outputs = keras.layers.Dense(784, activation="sigmoid")(layer)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _fastae_model(kind: str):
    import fastae

    if kind == "deep":
        return fastae.DeepAutoencoder(784, KERAS_DEEP, activation="relu", tied=False)
    options = {
        "sparse": {"sparsity": fastae.L1Sparsity(784 * KERAS_L1)},
        "denoising": {"noise": fastae.GaussianNoise(KERAS_NOISE)},
    }.get(kind, {})
    return fastae.Autoencoder(784, KERAS_CODE, activation="relu", tied=False, **options)


def training(seeds: list[int], epochs: int = KERAS_EPOCHS, keras: bool = True) -> dict:
    """{(kind, library): {"seconds": [per seed], "test_bce": [per seed]}}."""
    import fastae

    # untimed: one epoch of each library on a few rows, so the first model timed is not
    # charged the process's one-off costs (imports, thread pools, first calls)
    x_tr, _ = upsampled_digits(seeds[0])
    if keras:
        _keras_model("plain").fit(x_tr[:WARM_UP_ROWS], x_tr[:WARM_UP_ROWS], epochs=1, verbose=0)
    rows = torch.from_numpy(x_tr[:WARM_UP_ROWS])
    fastae.fit(_fastae_model("plain"), rows, epochs=1, progress=False)
    results: dict = {}
    for seed in seeds:
        x_tr, x_te = upsampled_digits(seed)
        for kind in ("plain", "sparse", "denoising", "deep"):
            if keras:
                import keras as keras_module

                keras_module.utils.set_random_seed(seed)
                model = _keras_model(kind)
                start = time.perf_counter()
                model.fit(x_tr, x_tr, epochs=epochs, batch_size=KERAS_BATCH, verbose=0)
                seconds = time.perf_counter() - start
                loss = bce(np.asarray(model.predict(x_te, verbose=0)), x_te)
                cell = results.setdefault((kind, "Keras"), {"seconds": [], "test_bce": []})
                cell["seconds"].append(seconds)
                cell["test_bce"].append(loss)
            torch.manual_seed(seed)
            model = _fastae_model(kind)
            start = time.perf_counter()
            fastae.fit(
                model, torch.from_numpy(x_tr), epochs=epochs, batch_size=KERAS_BATCH, lr=1e-3,
                seed=seed, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            with torch.no_grad():
                loss = bce(model.reconstruct(torch.from_numpy(x_te)).numpy(), x_te)
            cell = results.setdefault((kind, "fastae"), {"seconds": [], "test_bce": []})
            cell["seconds"].append(seconds)
            cell["test_bce"].append(loss)
    return results


def training_table(results: dict) -> str:
    lines = [
        "| model | Keras s | fastae s | Keras s / fastae s | Keras test BCE | fastae test BCE |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in dict.fromkeys(kind for kind, _ in results):
        ours, theirs = results[(kind, "fastae")], results.get((kind, "Keras"))
        ratio = "-"
        if theirs is not None:
            ratios = [k / f for k, f in zip(theirs["seconds"], ours["seconds"], strict=True)]
            ratio = _spread(ratios, 2) + "x"
        cells = [
            "-" if theirs is None else _spread(theirs["seconds"], 2),
            _spread(ours["seconds"], 2),
            ratio,
            "-" if theirs is None else _spread(theirs["test_bce"], 1),
            _spread(ours["test_bce"], 1),
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _streamed(seed: int, passes: int) -> dict:
    """{model: (seconds, test error)} for one seed's split."""
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fastae import AutoencoderTransformer

    x_tr, x_te = train_test_split(load_digits().data / 16.0, test_size=0.25, random_state=seed)
    chunks = [x_tr[i : i + STREAM_CHUNK] for i in range(0, len(x_tr), STREAM_CHUNK)]
    options = {"scale": None, "random_state": seed}

    def stream(model, rounds: int):
        for _ in range(rounds):
            for chunk in chunks:
                model.partial_fit(chunk)
        return model

    runs = {
        "IncrementalPCA, partial_fit (1 pass)": lambda: stream(IncrementalPCA(STREAM_CODE), 1),
        f"fastae transformer, partial_fit ({passes} passes)": lambda: stream(
            AutoencoderTransformer(STREAM_CODE, **options), passes
        ),
        f"fastae transformer, fit in memory ({passes} epochs)": lambda: AutoencoderTransformer(
            STREAM_CODE, epochs=passes, **options
        ).fit(x_tr),
        f"fastae transformer, untied, fit in memory ({passes} epochs)": lambda: (
            AutoencoderTransformer(STREAM_CODE, epochs=passes, tied=False, **options).fit(x_tr)
        ),
        f"fastae transformer, squared error, tanh, fit in memory ({passes} epochs)": lambda: (
            AutoencoderTransformer(
                STREAM_CODE, epochs=passes, loss="mse", activation="tanh", **options
            ).fit(x_tr)
        ),
        "PCA on standardized pixels": lambda: make_pipeline(
            StandardScaler(), PCA(STREAM_CODE, random_state=seed)
        ).fit(x_tr),
        f"fastae transformer, its defaults (standardized), fit in memory ({passes} epochs)": (
            lambda: AutoencoderTransformer(STREAM_CODE, epochs=passes, random_state=seed).fit(x_tr)
        ),
        f"fastae transformer, its defaults but untied, fit in memory ({passes} epochs)": (
            lambda: AutoencoderTransformer(
                STREAM_CODE, epochs=passes, tied=False, random_state=seed
            ).fit(x_tr)
        ),
    }
    measured = {}
    for name, train in runs.items():
        start = time.perf_counter()
        model = train()
        seconds = time.perf_counter() - start
        error = np.square(model.inverse_transform(model.transform(x_te)) - x_te).sum(1).mean()
        measured[name] = (seconds, float(error))
    return measured


def streaming(seeds: list[int], passes: int = STREAM_PASSES) -> dict:
    """{model: {"seconds": [per seed], "test_error": [per seed]}}."""
    _streamed(seeds[0], 1)  # untimed: the first calls pay one-off costs (imports, allocations)
    results: dict = {}
    for seed in seeds:
        for name, (seconds, error) in _streamed(seed, passes).items():
            cell = results.setdefault(name, {"seconds": [], "test_error": []})
            cell["seconds"].append(seconds)
            cell["test_error"].append(error)
    return results


def streaming_table(results: dict) -> str:
    lines = ["| model | seconds | test squared error |", "| --- | --- | --- |"]
    for name, cell in results.items():
        lines.append(
            f"| {name} | {_spread(cell['seconds'], 2)} | {_spread(cell['test_error'], 3)} |"
        )
    return "\n".join(lines)


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


def _installed(module: str, name: str):
    """(the module or None, a line saying which version or that it is missing)."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None, f"{name} not installed: its rows left out"
    return found, f"{name} {found.__version__}"


PARTS = ("anomaly", "training", "streaming")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # scikit-learn's random_state: below 2**32
    seeds = fb.listed(int, "ints from 0 to 2**32 - 1", lambda seed: 0 <= seed < 2**32)
    digits = fb.listed(int, "ints from 0 to 9", lambda digit: 0 <= digit <= 9)
    parser.add_argument("--seeds", type=seeds, default="0", help="comma-separated")
    parser.add_argument("--digits", type=digits, default="0,1,2,3,4,5,6,7,8,9", help="held out")
    parser.add_argument(
        "--epochs", type=fb.positive_int, default=EPOCHS, help="fastae's epochs (passes)"
    )
    parser.add_argument(
        "--keras-epochs", type=fb.positive_int, default=KERAS_EPOCHS, help="training part"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    seeds, held_out = args.seeds, args.digits
    try:
        parts = fb.parse_list(args.parts, PARTS, "--parts")
        if args.out is not None:  # before the run: one that cannot be written would lose it
            fb.check_writable_file("--out", args.out)
    except ValueError as error:
        parser.error(str(error))
    pyod, pyod_line = _installed("pyod", "PyOD")
    os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported
    keras, keras_line = _installed("keras", "Keras")
    if keras is not None and keras.backend.backend() != "torch":
        keras, keras_line = None, f"Keras on {keras.backend.backend()}, not torch: left out"
    elif keras is not None:
        keras_line += " (PyTorch backend)"
    warnings.filterwarnings("ignore", category=UserWarning)
    lines = [
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{pyod_line}, {keras_line}; seeds {','.join(map(str, seeds))}"
    ]
    if "anomaly" in parts:
        results = run(seeds, held_out, args.epochs, pyod is not None)
        digits = ",".join(map(str, held_out))
        lines += ["", f"Anomaly detection (held-out digits {digits}):", "", table(results)]
    if "training" in parts:
        results = training(seeds, args.keras_epochs, keras is not None)
        lines += [
            "", f"Training ({args.keras_epochs} epochs, 28x28 digits):", "",
            training_table(results),
        ]  # fmt: skip
    if "streaming" in parts:
        results = streaming(seeds, args.epochs)
        lines += [
            "",
            f"Out of core and in memory (8x8 digits, chunks of {STREAM_CHUNK} rows, 32 codes):",
            "", streaming_table(results),
        ]  # fmt: skip
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
