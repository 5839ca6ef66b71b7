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
from fastae.kernels import common, decoder, encoder, noise, vae  # noqa: E402
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
    monkeypatch.setenv("FASTAE_AUTOTUNE", "1")  # the GPU check runs the tests with 0
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
    monkeypatch.setenv("FASTAE_DECODER_FUSION", "gemm")  # its kernels, at any shape
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


def test_autotune_off_times_one_config_per_shape(tuned_on_every_call, monkeypatch):
    monkeypatch.setenv("FASTAE_AUTOTUNE", "0")
    timed = {id(kernel): 0 for kernel in tuned_on_every_call}

    def bench_and_count(kernel):
        def bench(kernel_call, quantiles):
            timed[id(kernel)] += 1
            return _bench_each_config_several_times(kernel_call, quantiles)

        return bench

    for kernel in tuned_on_every_call:
        monkeypatch.setattr(kernel, "_do_bench", bench_and_count(kernel))
    want = _step("reference", "gemm", monkeypatch)
    got = _step("triton", "gemm", monkeypatch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    used = [kernel for kernel in tuned_on_every_call if kernel.cache]
    assert len(used) >= 7
    # Triton 3.6 still times a lone candidate once; later versions skip timing it
    assert all(timed[id(kernel)] <= len(kernel.cache) for kernel in used)


def test_autotune_setting_is_checked(monkeypatch):
    monkeypatch.setenv("FASTAE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="FASTAE_AUTOTUNE"):
        common.autotuning()


SM90_SHARED = 232_448  # bytes of shared memory a block may opt in to on an H100
GEMM_BLOCKS = [("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("BLOCK_N", "BLOCK_K", "BLOCK_M")]


def _shape(config, names):
    m, n, k = (config.kwargs[name] for name in names)
    return m, n, k, config.num_stages, config.num_warps


def _gemm_candidates(names, accumulator_per_thread=None):
    # the GPU list, which the interpreter replaces by one small config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "interpreting", lambda: False)
        return common.gemm_configs(names, accumulator_per_thread)


def test_an_accumulator_limit_drops_the_larger_tiles():
    """The decoder forward's limit (64 float32 values a thread): the tiles that spilled its
    loss epilogue (128 a thread) go, the others stay in order."""
    names = GEMM_BLOCKS[0]
    every = [_shape(c, names) for c in _gemm_candidates(names)]
    kept = [_shape(c, names) for c in _gemm_candidates(names, accumulator_per_thread=64)]
    assert kept == [s for s in every if s[0] * s[1] <= 64 * 32 * s[4]]
    assert kept[0] == (128, 128, 64, 4, 8) and len(kept) == 4


@pytest.mark.parametrize("names", GEMM_BLOCKS)
def test_16_bit_gemm_configs_all_fit_an_h100(names):
    configs = _gemm_candidates(names)
    kept = common.fit_shared_memory(configs, names, 2, SM90_SHARED)
    assert [_shape(c, names) for c in kept] == [_shape(c, names) for c in configs]


@pytest.mark.parametrize("names", GEMM_BLOCKS)
@pytest.mark.parametrize("element_size", [4, 8])
def test_wide_dtypes_keep_every_tile_with_a_shorter_k_block(names, element_size):
    configs = _gemm_candidates(names)
    kept = [
        _shape(c, names)
        for c in common.fit_shared_memory(configs, names, element_size, SM90_SHARED)
    ]
    for m, n, k, stages, _ in kept:
        assert stages * (m + n) * k * element_size <= SM90_SHARED
    # the 128x128x64, 4-stage tile needs 262,144 B in float32: it is kept with BLOCK_K = 32
    assert (128, 128, 32, 4, 8) in kept or element_size == 8
    assert {(m, n, s, w) for m, n, _, s, w in kept} == {
        (m, n, s, w) for m, n, _, s, w in (_shape(c, names) for c in configs)
    }
    assert len(kept) == len(set(kept))


@pytest.mark.parametrize("names", GEMM_BLOCKS)
def test_float64_starts_from_the_smallest_tile(names):
    configs = _gemm_candidates(names)
    kept = [_shape(c, names) for c in common.fit_shared_memory(configs, names, 8, SM90_SHARED)]
    assert kept[0][:2] == (64, 64)
    assert [m * n for m, n, *_ in kept] == sorted(m * n for m, n, *_ in kept)
    narrow = common.fit_shared_memory(configs, names, 4, SM90_SHARED)
    assert _shape(narrow[0], names)[:2] == (128, 128)  # other dtypes keep the list's order


def test_when_nothing_fits_the_smallest_config_is_kept():
    names = GEMM_BLOCKS[0]
    kept = common.fit_shared_memory(_gemm_candidates(names), names, 4, limit=1024)
    assert [_shape(c, names) for c in kept] == [(64, 64, 16, 4, 4)]


# each GEMM kernel's (M, N, K) block names
GEMM_KERNELS = [
    (encoder._encoder_forward_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    (encoder._encoder_grad_weight_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    (encoder._encoder_grad_input_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    (decoder._decoder_forward_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    (decoder._decoder_grad_weight_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    (decoder._decoder_grad_code_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
]


def test_every_gemm_kernel_prunes_by_shared_memory():
    assert all(kernel.early_config_prune is not None for kernel, _ in GEMM_KERNELS)


@pytest.mark.cuda  # the GPU's shared-memory limit
@pytest.mark.parametrize("kernel, names", GEMM_KERNELS)
def test_float32_gemm_configs_fit_this_gpu(kernel, names, monkeypatch):
    monkeypatch.setenv("FASTAE_AUTOTUNE", "1")
    limit = triton.runtime.driver.active.utils.get_device_properties(0)["max_shared_mem"]
    x = torch.empty(4, 4, device=DEVICE)
    kept = kernel.early_config_prune(_gemm_candidates(names), dict.fromkeys(kernel.arg_names, x))
    assert len(kept) == len(_gemm_candidates(names))
    for m, n, k, stages, _ in (_shape(c, names) for c in kept):
        assert stages * (m + n) * k * 4 <= limit
