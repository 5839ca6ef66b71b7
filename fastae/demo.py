"""The main job: train plain, sparse, denoising and contractive autoencoders on digits."""

from __future__ import annotations

import argparse
import time

import torch

from . import Autoencoder, KLSparsity, MaskingNoise, fit
from .data import load_digits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="few epochs (CI smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=32)


def variants(d: int, hidden: int) -> dict[str, Autoencoder]:
    return {
        "plain": Autoencoder(d, hidden),
        "sparse": Autoencoder(d, hidden, sparsity=KLSparsity(0.05, 0.1)),
        "denoising": Autoencoder(d, hidden, noise=MaskingNoise(0.3)),
        "contractive": Autoencoder(d, hidden, contractive=0.1),
    }


def run(args: argparse.Namespace) -> int:
    x, _ = load_digits()
    epochs = 5 if args.quick else 60
    torch.manual_seed(args.seed)
    print(f"{'model':<12} {'train loss':>11} {'recon error':>12} {'||J||_F^2':>10} {'time s':>7}")
    for name, model in variants(x.shape[1], args.hidden).items():
        model = model.to(args.device)
        data = x.to(args.device)
        start = time.perf_counter()
        history = fit(model, data, epochs=epochs, batch_size=64, lr=3e-3, seed=args.seed)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            recon = model.reconstruction_error(data).mean().item()
            jac = model(data).jacobian_norm.item()
        print(f"{name:<12} {history.loss[-1]:>11.4f} {recon:>12.4f} {jac:>10.3f} {seconds:>7.2f}")
    return 0
