"""The VAE estimators at several learning rates, on the CPU: the measurement behind
``lr="auto"`` (3e-3 for ``model="vae"``, 1e-2 for an autoencoder).

    python bench/vae_learning_rate.py --lrs 1e-2,3e-3,1e-3 --seeds 0,1,2,3

On scikit-learn's 8x8 digits with the estimators' defaults (standardized inputs), per
learning rate and seed: the detector's AUROC for a held-out 0 (``AutoencoderOutlierDetector(8,
model="vae")`` trained on the other digits, scored on all), the test accuracy of a
logistic-regression probe on a transformer's 16 posterior means (75/25 stratified split),
and that of ``SemiSupervisedAutoencoder(16, model="vae", epochs=25)`` given 10% of the
training labels. A fit whose loss turns NaN prints "nan".
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

import fastae
from fastae import benchmark as fb


def _or_nan(score) -> float:
    """``score()``, or NaN where training diverged."""
    try:
        return float(score())
    except ValueError as error:
        if "training diverged" not in str(error):
            raise
        return float("nan")


def measure(lr: float, seed: int, x, y, split) -> tuple[float, float, float]:
    x_train, x_test, y_train, y_test = split

    def detector():
        model = fastae.AutoencoderOutlierDetector(8, model="vae", lr=lr, random_state=seed)
        return roc_auc_score(y == 0, -model.fit(x[y != 0]).score_samples(x))

    def probe():
        model = fastae.AutoencoderTransformer(16, model="vae", lr=lr, random_state=seed)
        codes = model.fit(x_train)
        head = LogisticRegression(max_iter=2000).fit(codes.transform(x_train), y_train)
        return head.score(codes.transform(x_test), y_test)

    def semi_supervised():
        few = y_train.copy()
        few[np.random.RandomState(seed).rand(len(few)) > 0.1] = -1
        model = fastae.SemiSupervisedAutoencoder(
            16, model="vae", epochs=25, lr=lr, random_state=seed
        )
        return model.fit(x_train, few).score(x_test, y_test)

    return _or_nan(detector), _or_nan(probe), _or_nan(semi_supervised)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rates = fb.listed(float, "positive finite numbers", lambda lr: 0 < lr < float("inf"))
    seeds = fb.listed(int, "ints from 0 to 2**32 - 1", lambda seed: 0 <= seed < 2**32)
    parser.add_argument("--lrs", type=rates, default="1e-2,3e-3,1e-3")
    parser.add_argument("--seeds", type=seeds, default="0,1,2,3")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    x, y = load_digits(return_X_y=True)
    split = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    print("lr      seed  detector AUROC  probe acc  semi-supervised acc")
    for lr in args.lrs:
        for seed in args.seeds:
            auroc, probe, semi = measure(lr, seed, x, y, split)
            print(f"{lr:<7g} {seed:<5d} {auroc:14.3f} {probe:10.3f} {semi:20.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
