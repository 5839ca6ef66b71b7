"""Autotuning must not change results: on a GPU the autotuner runs every candidate config
several times on the real buffers before the chosen one runs, so a kernel that overwrites an
input (or accumulates into an output) would be applied more than once.

Under the interpreter each kernel has one config and is never timed; here every autotuned
kernel gets two configs and a stand-in benchmark that runs each config three times, as the
GPU autotuner does, and whole training steps are compared with the reference backend.
"""

import copy

import pytest
import torch

import fastae
from fastae import ops

triton = pytest.importorskip("triton")
from fastae.kernels import decoder, encoder, noise, vae  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TIMES_PER_CONFIG = 3


def _autotuned_kernels() -> list[Autotuner]:
    return [
        value
        for module in (encoder, noise, decoder, vae)
        for value in vars(module).values()
        if isinstance(value, Autotuner)
    ]


def _bench_each_config_several_times(kernel_call, quantiles):
    for _ in range(TIMES_PER_CONFIG):
        kernel_call()
    return [1.0] * len(quantiles)


@pytest.fixture
def tuned_on_every_call(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("on a GPU the real autotuner already times several configs")
    kernels = _autotuned_kernels()
    assert len(kernels) >= 10
    for kernel in kernels:
        second = copy.copy(kernel.configs[0])
        monkeypatch.setattr(kernel, "configs", [kernel.configs[0], second])
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_do_bench", _bench_each_config_several_times)
    return kernels


def _step(backend: str, fusion: str, monkeypatch):
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    torch.manual_seed(0)
    model = fastae.Autoencoder(
        23, 11, noise=fastae.SaltPepperNoise(0.3, seed=7), contractive=0.2,
        sparsity=fastae.KLSparsity(0.1, 0.5),
    ).double().to(DEVICE)  # fmt: skip
    x = torch.rand(19, 23, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with fastae.use_backend(backend):
        loss = model(x).loss
        loss.backward()
        corrupted = ops.corrupt(x.detach(), fastae.GaussianNoise(0.2, seed=3))
        mu = torch.randn(19, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
        logvar = (0.3 * torch.randn(19, 5, dtype=torch.float64, device=DEVICE)).requires_grad_()
        z, kl = ops.reparameterize(mu, logvar, seed=11)
        (z.sum() + kl.sum()).backward()
    grads = [p.grad for p in model.parameters()] + [x.grad, mu.grad, logvar.grad]
    return [loss, corrupted, z, kl, *grads]


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_autotuning_several_configs_keeps_results(tuned_on_every_call, monkeypatch, fusion):
    want = _step("reference", fusion, monkeypatch)
    got = _step("triton", fusion, monkeypatch)
    timed = [kernel for kernel in tuned_on_every_call if kernel.cache]
    assert len(timed) >= 7, [kernel.base_fn.__name__ for kernel in timed]  # tuning happened
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
