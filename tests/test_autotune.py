"""Autotuning must not change results: on a GPU the autotuner runs every candidate config
several times on the real buffers before the chosen one runs, so a kernel that overwrites an
input (or accumulates into an output) would be applied more than once.

Under the interpreter each kernel has one config and is never timed; here every autotuned
kernel gets two configs and a stand-in benchmark that runs each config three times, as the
GPU autotuner does, and whole training steps are compared with the reference backend. And
every config a GPU's autotuner chooses from runs here too, each kernel its own in turn.
"""

import copy

import pytest
import torch

import fastae
from fastae import ops

triton = pytest.importorskip("triton")
from fastae.kernels import common, decoder, encoder, noise, sparsity, vae  # noqa: E402
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


def _time_with(monkeypatch, kernel, bench):
    """``kernel``'s autotuner times its candidates with ``bench`` (Triton reads ``do_bench``,
    a property it caches in the instance: set there, it is put back afterwards)."""
    monkeypatch.setitem(vars(kernel), "do_bench", bench)


@pytest.fixture
def tuned_on_every_call(monkeypatch):
    """Two candidates a kernel, each run several times when timed, on the GPU too (the GPU
    check runs the tests with FASTAE_AUTOTUNE=0, where nothing is timed); compiled kernels
    the direct launch kept are dropped, so that every launch goes through the autotuner."""
    monkeypatch.setenv("FASTAE_AUTOTUNE", "1")
    monkeypatch.setattr(common, "_launches", {})
    kernels = _autotuned_kernels()
    assert len(kernels) >= 10
    for kernel in kernels:
        second = copy.copy(kernel.configs[0])
        monkeypatch.setattr(kernel, "configs", [kernel.configs[0], second])
        monkeypatch.setattr(kernel, "cache", {})
        _time_with(monkeypatch, kernel, _bench_each_config_several_times)
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
        _time_with(monkeypatch, kernel, bench_and_count(kernel))
    want = _step("reference", "gemm", monkeypatch)
    got = _step("triton", "gemm", monkeypatch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    used = [kernel for kernel in tuned_on_every_call if kernel.cache]
    assert len(used) >= 7
    # Triton 3.6 still times a lone candidate once; later versions skip timing it
    assert all(timed[id(kernel)] <= len(kernel.cache) for kernel in used)


def test_a_lone_candidate_is_not_timed(monkeypatch):
    """FASTAE_AUTOTUNE=0 leaves one candidate, which Triton 3.6's autotuner would still time
    (a warm-up and repetitions, some 0.1 s a kernel and shape; the GPU tests run so): every
    kernel's benchmark neither times nor runs it then. With autotuning on, the driver's
    benchmarker times each candidate, as Triton's default does."""
    assert all(kernel._do_bench is common.benchmark for kernel in _autotuned_kernels())
    calls = []
    monkeypatch.setenv("FASTAE_AUTOTUNE", "0")
    assert common.benchmark(lambda: calls.append(1), (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert not calls

    class Driver:
        def get_benchmarker(self):
            return lambda kernel_call, quantiles: [kernel_call(), 1.0][1:] * len(quantiles)

    monkeypatch.setenv("FASTAE_AUTOTUNE", "1")
    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    assert common.benchmark(lambda: calls.append(1), (0.5, 0.2)) == [1.0, 1.0] and calls == [1]


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


def test_every_gemm_kernel_tunes_each_precision_apart():
    """tf32 and IEEE float32 products of one shape are timed apart: a config tuned for one
    is not replayed for the other."""
    for kernel, _ in GEMM_KERNELS:
        assert list(kernel.keys) == ["B", "D", "H", "PRECISION"], kernel.fn.__name__
        assert set(kernel.keys) <= set(kernel.arg_names), kernel.fn.__name__  # none dropped


@pytest.mark.cuda  # the GPU's shared-memory limit
@pytest.mark.parametrize("kernel, names", GEMM_KERNELS)
def test_float32_gemm_configs_fit_this_gpu(kernel, names, monkeypatch):
    monkeypatch.setenv("FASTAE_AUTOTUNE", "1")
    limit = triton.runtime.driver.active.utils.get_device_properties(0)["max_shared_mem"]
    x = torch.empty(4, 4, device=DEVICE)
    # the kernel's own candidates, float32 operands; B, D and H as launches give them (ints),
    # at a shape where split-K candidates run (the weight gradients keep them all then)
    named_args = dict.fromkeys(kernel.arg_names, x) | {"B": 4096, "D": 128, "H": 128}
    candidates = list(kernel.configs)
    kept = kernel.early_config_prune(candidates, named_args)
    assert len(kept) == len(candidates)
    for m, n, k, stages, _ in (_shape(c, names) for c in kept):
        assert stages * (m + n) * k * 4 <= limit


def _gpu_candidates() -> dict:
    """Each autotuned kernel's candidate configs on a GPU (the interpreter has one small
    config a kernel): every GEMM tile with its split-K counts, every elementwise shape."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (common, vae):
            patch.setattr(module, "interpreting", lambda: False)
        table = {
            kernel: common.gemm_configs(names, split="SPLIT" in kernel.configs[0].kwargs)
            for kernel, names in GEMM_KERNELS
        }
        elementwise = common.elementwise_configs()
        for kernel in (
            encoder._encoder_statistics_kernel, encoder._encoder_grad_z_kernel,
            decoder._decoder_loss_kernel,
        ):  # fmt: skip
            table[kernel] = elementwise
        table[noise._corrupt_kernel] = noise._configs()
        table[vae._reparameterize_forward_kernel] = vae._forward_configs()
        table[vae._reparameterize_backward_kernel] = vae._backward_configs()
    return table


def _float64_steps(backend: str) -> list[torch.Tensor]:
    """Steps whose every kernel runs at a shape of several tiles with ragged edges for any
    candidate (B = 150, d = 144, H = 136; tiles up to 256 a side): an untied and a tied
    autoencoder with every regularizer and x~ regenerated inside the GEMMs, a VAE (B = 70,
    latent 40), corrupt."""
    torch.manual_seed(0)
    x = torch.rand(150, 144, dtype=torch.float64, device=DEVICE)
    results = []
    with fastae.use_backend(backend):
        for tied in (False, True):
            model = fastae.Autoencoder(
                144, 136, tied=tied, noise=fastae.MaskingNoise(0.3, seed=7), contractive=0.2,
                sparsity=fastae.KLSparsity(0.1, 0.5),
            ).double().to(DEVICE)  # fmt: skip
            loss = model(x).loss
            loss.backward()
            results += [loss, *(p.grad for p in model.parameters())]
        model = fastae.VAE(144, 136, 40).double().to(DEVICE)
        loss = model(x[:70], seed=5).loss  # the autoencoders ran the GEMMs at B = 150
        loss.backward()
        results += [loss, *(p.grad for p in model.parameters())]
        results.append(ops.corrupt(x, fastae.SaltPepperNoise(0.2, seed=3)))
    return results


GPU_CANDIDATES = _gpu_candidates() if DEVICE == "cpu" else {}
# the kernels the split boundaries (cuBLAS GEMMs) run: the elementwise ones
SPLIT_KERNELS = (
    encoder._encoder_statistics_kernel, encoder._encoder_grad_z_kernel,
    decoder._decoder_loss_kernel, noise._corrupt_kernel, vae._reparameterize_forward_kernel,
    vae._reparameterize_backward_kernel,
)  # fmt: skip


def _candidate_cases() -> list[tuple[str, int]]:
    def count(kernels):
        return max((len(GPU_CANDIDATES[k]) for k in kernels if k in GPU_CANDIDATES), default=0)

    gemm, split = count(GPU_CANDIDATES), count(SPLIT_KERNELS)
    return [("gemm", i) for i in range(gemm)] + [("split", i) for i in range(split)]


@pytest.mark.parametrize("fusion, index", _candidate_cases())
def test_every_gpu_candidate_matches_reference(fusion, index, monkeypatch):
    """The configs a GPU's autotuner picks from (tile sizes, split-K counts, elementwise
    shapes; the KL kernel's block of 1024) are the interpreter's too: each kernel runs its
    candidate ``index`` (cycling through its list), split-K allowed at any batch, in float64
    steps against the reference; through the fused GEMMs, then through the split boundaries
    (their elementwise kernels sum partials over however many row blocks a tile makes)."""
    assert set(GPU_CANDIDATES) == set(_autotuned_kernels())
    monkeypatch.setattr(common, "SPLIT_MIN_BATCH", 1)
    monkeypatch.setattr(sparsity, "interpreting", lambda: False)  # its GPU block: 1024
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
    for kernel, candidates in GPU_CANDIDATES.items():
        monkeypatch.setattr(kernel, "configs", [candidates[index % len(candidates)]])
        monkeypatch.setattr(kernel, "cache", {})
    want = _float64_steps("reference")
    got = _float64_steps("triton")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, i=i: f"#{i}: {m}")
