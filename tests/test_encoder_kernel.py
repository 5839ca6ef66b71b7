"""The Triton encoder (fastae.kernels.encoder) against the reference backend.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; on a CUDA machine the same tests run on the GPU, plus half precision.
"""

import math

import pytest
import torch
from precision import assert_within_twice_torchs_error

import fastae
from fastae import ops, reference
from fastae.benchmark import matmul_precision

pytest.importorskip("triton")
from fastae.kernels import common, encoder  # noqa: E402

FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = ["sigmoid", "tanh", "relu", "softplus"]
# float32 at matmul precision "high": our tf32 products read their inputs to 10 mantissa bits
# (the interpreter as the GPU: tests/conftest.py), the reference's are exact on the CPU, and
# on a GPU cuBLAS's round and sum differently
TF32_TOLERANCE = dict(rtol=2e-2, atol=2e-3)
# half precision against float64: B x d -> H
HALF_SHAPE = (512, 784, 1024) if DEVICE == "cuda" else (33, 70, 40)
NOISES = [
    fastae.GaussianNoise(0.3),
    fastae.MaskingNoise(0.4),
    fastae.MaskingNoise(0.25, rescale=True),
    fastae.SaltPepperNoise(0.3, low=-0.5, high=2.0),
]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(common, "poison_outputs", True)


def _inputs(batch, features, hidden, dtype, *, x_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = torch.rand(batch, features, generator=g, dtype=torch.float64).to(dtype)
    weight = rand(hidden, features, scale=features**-0.5 * 2)
    bias = rand(hidden, scale=0.5)
    upstream = (rand(batch, hidden), rand(hidden), rand(()))
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weight, bias)]
    leaves[0].requires_grad_(x_grad)
    return leaves, [u.to(DEVICE) for u in upstream]


def _run(backend, x, weight, bias, upstream, **kwargs):
    with fastae.use_backend(backend):
        h, rho_hat, jac = ops.encode(x, weight, bias, **kwargs)
        loss = (h * upstream[0]).sum() + (rho_hat * upstream[1]).sum() + jac * upstream[2]
        wrt = [t for t in (x, weight, bias) if t.requires_grad]
        grads = torch.autograd.grad(loss.float().sum(), wrt)
    return (h, rho_hat, jac, *grads)


def _assert_close(got, want, rtol, atol):
    names = ["h", "rho_hat", "jac", "grad 0", "grad 1", "grad 2"]
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), f"{name} has unwritten (NaN) elements"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch,features,hidden", [(1, 5, 17), (7, 70, 1), (33, 5, 40)])
def test_matches_reference_float64(activation, batch, features, hidden):
    leaves, upstream = _inputs(batch, features, hidden, torch.float64)
    got = _run("triton", *leaves, upstream, activation=activation)
    want = _run("reference", *leaves, upstream, activation=activation)
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


# float32 pre-activations where an activation or its slope is easy to get wrong: softplus
# past h = 87, where exp(-h) in the slope 1 - exp(-h) is subnormal; tanh near 0, where
# 1 - exp(-2|z|) cancels
EDGE_PRE_ACTIVATIONS = {
    "softplus": [17.0, 41.0, 87.0, 90.0, 100.0, 103.5, 103.9, 110.0, -20.0],
    "tanh": [1e-8, 1e-7, 1e-5, 1e-3, -1e-5, 0.0, 0.5],
}


def _edge_oracle(activation, z):
    """float64 h and slope a'(z) of the float32 values z."""
    if activation == "softplus":
        h = [max(v, 0.0) + math.log1p(math.exp(-abs(v))) for v in z]
        return h, [1 / (1 + math.exp(-v)) for v in z]
    h = [math.tanh(v) for v in z]
    return h, [1 - math.tanh(v) ** 2 for v in z]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("activation", sorted(EDGE_PRE_ACTIVATIONS))
def test_float32_activations_at_their_edges(backend_name, fusion, activation, monkeypatch):
    """h, the slope (dh/dz) and jac = mean_i a'(z_i)^2 of z = x * 1 in float32 within a few
    ulps of float64: the slope of softplus is 1 past h = 87 (it was up to 1.006 there),
    tanh keeps its relative precision near 0 (tanh(1e-8) was 0)."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    z = torch.tensor(EDGE_PRE_ACTIVATIONS[activation], device=DEVICE).unsqueeze(1)
    x, weight = z.clone().requires_grad_(), torch.ones(1, 1, device=DEVICE)
    with fastae.use_backend(backend_name):
        h, _, jac = ops.encode(x, weight, activation=activation)
        (slope,) = torch.autograd.grad(h.sum(), x)
    want_h, want_slope = _edge_oracle(activation, z.squeeze(1).double().tolist())
    want_h = torch.tensor(want_h, dtype=torch.float64)
    want_slope = torch.tensor(want_slope, dtype=torch.float64)
    torch.testing.assert_close(h.squeeze(1).double().cpu(), want_h, rtol=4e-7, atol=0)
    torch.testing.assert_close(slope.squeeze(1).double().cpu(), want_slope, rtol=1e-6, atol=0)
    assert jac.item() == pytest.approx(want_slope.square().mean().item(), rel=1e-6)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_float32_softplus_curvature_in_the_contractive_gradient(backend_name, fusion, monkeypatch):
    """jac's input gradient (2 / B) ||W_j||^2 s a''(z) for softplus units, a'' = s (1 - s):
    with 1 - s taken as exp(-h) it keeps float32's relative precision for large z, where
    1 - s computed from s = 1 - exp(-h) cancels (off by 8% at z in [12, 15), wholly past 15)."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    z = torch.linspace(7.0, 30.0, 2001, device=DEVICE).unsqueeze(1)
    x, weight = z.clone().requires_grad_(), torch.ones(1, 1, device=DEVICE)
    with fastae.use_backend(backend_name):
        _, _, jac = ops.encode(x, weight, activation="softplus")
        (grad,) = torch.autograd.grad(jac, x)
    z64 = z.double().cpu()
    exact = 2 / len(z) * torch.sigmoid(z64).square() * torch.sigmoid(-z64)
    relative = ((grad.double().cpu() - exact) / exact).abs()
    assert relative.max() < 1e-4, relative.max()


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_float32_tanh_slope_where_tanh_saturates(backend_name, fusion, monkeypatch):
    """The slope 1 - h^2 comes from the stored float32 h: at |z| in (6, 7), 1 - h is 206 to
    28 of h's ulps (2^-24 below 1), so h's own rounding bounds the slope's relative error near
    1.75% (the reference's). tanh as 1 - 2v / (1 + v) (v = exp(-2|z|)) keeps h that close; the Kahan
    form 1 - exp(-2|z|) there, a few ulps off, gave slopes up to 11% off."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    z = torch.linspace(6.0, 7.0, 2001, device=DEVICE)
    z = torch.cat([z, -z]).unsqueeze(1)
    x, weight = z.clone().requires_grad_(), torch.ones(1, 1, device=DEVICE)
    with fastae.use_backend(backend_name):
        h, _, _ = ops.encode(x, weight, activation="tanh", statistics=False)
        (slope,) = torch.autograd.grad(h.sum(), x)
    exact = 1 - torch.tanh(z.double().cpu()).square()
    relative = ((slope.double().cpu() - exact) / exact).abs()
    assert relative.max() < 0.025, relative.max()


def test_threads_launching_at_once_get_their_own_results():
    """Four threads running forward and backward at once (the estimators' concurrent fits)
    get what each gets alone: under the interpreter, whose grids share one process-wide
    builder, launches take turns."""
    import threading

    problems = [_inputs(17, 12, 9, torch.float32, seed=seed) for seed in range(4)]
    alone = [_run("reference", *leaves, upstream) for leaves, upstream in problems]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [_run("triton", *problems[i][0], problems[i][1]) for _ in range(3)]
        except Exception as error:  # noqa: BLE001 (reported below, with its thread)
            errors.append((i, error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, runs in results.items():
        for got in runs:
            _assert_close(got, alone[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("features", [5, 70])
@pytest.mark.parametrize("hidden", [1, 17, 40])
def test_odd_shapes_float32(batch, features, hidden):
    leaves, upstream = _inputs(batch, features, hidden, torch.float32, seed=batch * hidden)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        got = _run("triton", *leaves, upstream, activation="sigmoid")
        want = _run("reference", *leaves, upstream, activation="sigmoid")
    finally:
        torch.set_float32_matmul_precision(previous)
    _assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: type(n).__name__ + str(n.params()[0]))
def test_fused_noise_matches_reference(noise):
    leaves, upstream = _inputs(9, 21, 18, torch.float64)
    noise = noise.with_seed(12345)
    got = _run("triton", *leaves, upstream, activation="tanh", noise=noise)
    want = _run("reference", *leaves, upstream, activation="tanh", noise=noise)
    # Gaussian eps comes from libm log/cos inside Box-Muller: equal to float32 rounding only
    tol = 1e-6 if noise.kind == "gaussian" else 1e-10
    _assert_close(got, want, rtol=tol, atol=tol)


def test_no_input_grad_and_no_bias():
    leaves, upstream = _inputs(6, 8, 9, torch.float64, x_grad=False)
    x, weight, _ = leaves
    for backend in ("triton", "reference"):
        with fastae.use_backend(backend):
            h, rho_hat, jac = ops.encode(x, weight, None, activation="softplus")
            (h * upstream[0]).sum().backward()
    assert x.grad is None
    assert torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("layout", ["x transposed", "weight transposed", "sliced"])
def test_strided_inputs(layout):
    leaves, upstream = _inputs(11, 13, 10, torch.float64)
    x, weight, bias = (t.detach() for t in leaves)
    if layout == "x transposed":
        x_view = x.t().contiguous().t()
        weight_view = weight
    elif layout == "weight transposed":
        x_view = x
        weight_view = weight.t().contiguous().t()
    else:  # every other column / row of a larger tensor
        x_view = torch.stack([x, -x], dim=2).reshape(x.shape[0], -1)[:, ::2]
        weight_view = torch.stack([weight, -weight], dim=1).reshape(-1, weight.shape[1])[::2]
    assert torch.equal(x_view, x) and torch.equal(weight_view, weight)
    assert not (x_view.is_contiguous() and weight_view.is_contiguous())
    views = [t.requires_grad_() for t in (x_view.detach(), weight_view.detach(), bias.clone())]
    got = _run("triton", *views, upstream, activation="sigmoid")
    plain = [t.clone().requires_grad_() for t in (x, weight, bias)]
    want = _run("reference", *plain, upstream, activation="sigmoid")
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_triton(activation):
    (x, weight, bias), _ = _inputs(3, 4, 5, torch.float64)
    noise = fastae.MaskingNoise(0.3, seed=7) if activation == "sigmoid" else None
    with fastae.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.encode(*a, activation=activation, noise=noise),
            (x, weight, bias),
            fast_mode=True,
        )


@pytest.mark.parametrize("mode", ["store", "regenerate"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize(
    "activation, noise",
    [
        ("tanh", fastae.GaussianNoise(0.4, seed=7)),
        ("relu", fastae.MaskingNoise(0.3, seed=7)),
        ("softplus", fastae.MaskingNoise(0.3, rescale=True, seed=7)),
        ("sigmoid", fastae.SaltPepperNoise(0.2, low=-1.0, high=2.0, seed=7)),
    ],
)
def test_gradcheck_triton_with_noise(activation, noise, fusion, mode, monkeypatch):
    """Every noise kind, through both fusion boundaries, x~ stored or regenerated."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", mode)
    (x, weight, bias), _ = _inputs(3, 4, 5, torch.float64)
    with fastae.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.encode(*a, activation=activation, noise=noise),
            (x, weight, bias),
            fast_mode=True,
        )


@pytest.mark.parametrize("statistics", [True, False])
def test_opcheck_triton(statistics):
    (x, weight, bias), _ = _inputs(4, 6, 5, torch.float64)
    seed = torch.tensor(99)
    args = (x, weight, bias, "tanh", "salt_pepper", 0.2, 0.0, 1.0, seed, "triton", statistics)
    torch.library.opcheck(torch.ops.fastae.encode.default, args)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_half_precision_bias_gradient_sums_before_rounding(backend_name):
    """db = sum_i dz_i is summed from the float32 dz_i = g_h_i s_i + g_rho / B and rounded
    once: ReLU units all on, g_h rows 1, -1 and 0, g_rho = 0.003, so db = 0.003 (rounded row by
    row to bfloat16, 1 + 0.001 is 1 and db would be 0.001)."""
    x = torch.rand(3, 5).to(torch.bfloat16).to(DEVICE)
    weight = (torch.randn(2, 5) * 0.01).to(torch.bfloat16).to(DEVICE)
    bias = torch.ones(2, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with fastae.use_backend(backend_name):
        h, rho_hat, _ = ops.encode(x, weight, bias, activation="relu")
        assert (h > 0).all()
        g_h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]], dtype=torch.bfloat16)
        g_rho = torch.full((2,), 0.003, device=DEVICE)
        torch.autograd.backward((h, rho_hat), (g_h.to(DEVICE), g_rho))
    want = torch.full((2,), 0.003, dtype=torch.bfloat16)
    torch.testing.assert_close(bias.grad.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_half_precision(dtype, activation):
    """Within 2x of torch's own error at this dtype, both measured against float64 (on a GPU
    at the benchmark's size, in the interpreter at an odd small one; jac, a sum: see
    ``precision``)."""
    leaves, upstream = _inputs(*HALF_SHAPE, dtype)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    oracle = _run("reference", *exact, [u.double() for u in upstream], activation=activation)
    ours = _run("triton", *leaves, upstream, activation=activation)
    torch_ = _run("reference", *leaves, upstream, activation=activation)
    names = ["h", "rho", "jac", "dx", "dW", "db"]
    assert_within_twice_torchs_error(ours, torch_, oracle, dtype, names, sums=["jac"])


@pytest.mark.cuda
def test_tf32_cuda():
    leaves, upstream = _inputs(1024, 784, 1000, torch.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = _run("triton", *leaves, upstream, activation="sigmoid")
    finally:
        torch.set_float32_matmul_precision(previous)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = _run("reference", *exact, [u.double() for u in upstream], activation="sigmoid")
    for a, b in zip(got, want, strict=True):
        assert ((a.double() - b).norm() / b.norm()) < 3e-3


@pytest.mark.parametrize("features", [23, 130])  # ||W_j||^2 in one block of 64 and in three
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_split_boundary_matches_reference(activation, features, monkeypatch):
    """The other fusion boundary (torch GEMMs + one fused statistics pass) computes the same."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", "split")
    leaves, upstream = _inputs(10, features, 19, torch.float64)
    noise = fastae.SaltPepperNoise(0.2, seed=4) if activation == "relu" else None
    got = _run("triton", *leaves, upstream, activation=activation, noise=noise)
    want = _run("reference", *leaves, upstream, activation=activation, noise=noise)
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_float16_contractive_gradient_under_a_loss_scale(fusion, monkeypatch):
    """dW's contractive term (2/B) g_jac c_j W_j, with c_j up to B (ReLU units all on) and a
    GradScaler-sized g_jac: finite on both boundaries, as the reference's."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 5, generator=gen).half().to(DEVICE)
    weight = torch.rand(3, 5, generator=gen).half().to(DEVICE).requires_grad_()
    bias = torch.ones(3, dtype=torch.float16, device=DEVICE)
    grads = {}
    for name in ("reference", "triton"):
        with fastae.use_backend(name):
            _, _, jac = ops.encode(x, weight, bias, activation="relu")
            (grads[name],) = torch.autograd.grad(5000.0 * jac, weight)
    exact = 5000.0 * 2.0 * weight.detach().double()  # (2/B) c_j with c_j = B
    assert torch.isfinite(grads["triton"]).all()
    torch.testing.assert_close(grads["triton"].double(), exact, rtol=2e-3, atol=0)
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=2e-3, atol=0)


def test_fusion_choice_is_validated(monkeypatch):
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", "fastest")
    with pytest.raises(ValueError, match="FASTAE_ENCODER_FUSION"):
        encoder.fusion(8, 8, 8, torch.float32)


def test_fusion_rules_in_tf32(monkeypatch):
    """Forward: as ``test_fusion_rule``, except tf32 with x or W not contiguous along d;
    backward: the forward's rule, except that tf32 takes cuBLAS's products unless x~ is
    regenerated inside the dW product."""
    monkeypatch.delenv("FASTAE_ENCODER_FUSION", raising=False)
    f32, bf16 = torch.float32, torch.bfloat16
    with matmul_precision("highest"):  # IEEE float32: CUDA cores, any layout
        assert encoder.fusion(4096, 784, 1024, f32, k_major_operands=False) == "gemm"
        assert encoder.backward_fusion(4096, 784, 1024, f32, "none") == "gemm"
        assert encoder.backward_fusion(8192, 4096, 4096, f32, "none") == "split"
        assert encoder.backward_fusion(4096, 784, 1000, bf16, "none") == "split"
    with matmul_precision("high"):  # tf32
        assert encoder.fusion(4096, 784, 1024, f32) == "gemm"
        assert encoder.fusion(4096, 784, 1024, f32, k_major_operands=False) == "split"
        assert encoder.backward_fusion(4096, 784, 1024, f32, "none") == "split"
        assert encoder.backward_fusion(4096, 784, 1024, f32, "masking") == "gemm"
        assert encoder.backward_fusion(8192, 4096, 4096, f32, "masking") == "split"
        for dtype in (bf16, torch.float16, torch.float64):
            assert encoder.fusion(4096, 784, 1024, dtype, k_major_operands=False) == "gemm"
            assert encoder.backward_fusion(4096, 784, 1024, dtype, "none") == "gemm"
        for forced in ("gemm", "split"):
            monkeypatch.setenv("FASTAE_ENCODER_FUSION", forced)
            assert encoder.fusion(4096, 784, 1024, f32, k_major_operands=False) == forced
            assert encoder.backward_fusion(4096, 784, 1024, f32, "none") == forced


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_tf32_backward_takes_cublas_products(precision, monkeypatch, launched_kernels):
    """float32 at an aligned shape, contractive and sparsity statistics used, by the rules
    (none forced): the fused forward either way; in tf32 the backward's products are
    torch's (only the dz pass launches), in IEEE float32 the fused dW and dx kernels; the
    values match the reference's."""
    monkeypatch.delenv("FASTAE_ENCODER_FUSION", raising=False)
    monkeypatch.delenv("FASTAE_CORRUPTED_INPUT", raising=False)
    leaves, upstream = _inputs(8, 16, 32, torch.float32)
    with matmul_precision(precision):
        got = _run("triton", *leaves, upstream, activation="sigmoid")
        want = _run("reference", *leaves, upstream, activation="sigmoid")
    ieee = dict(rtol=1e-5, atol=1e-5)  # as test_odd_shapes_float32
    _assert_close(got, want, **(TF32_TOLERANCE if precision == "high" else ieee))
    backward = ["_encoder_grad_z_kernel"]
    if precision == "highest":
        backward += ["_encoder_grad_weight_kernel", "_encoder_grad_input_kernel"]
    assert launched_kernels == ["_encoder_forward_kernel", "_encoder_finish_kernel", *backward]


def _relative_errors(got, exact) -> list[float]:
    pairs = zip(got, exact, strict=True)
    return [float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in pairs]


@pytest.fixture
def precision_settings():
    """torch's float32 precision settings, restored afterwards (the newer per-backend ones
    back to "none", which hands over to the legacy setting)."""
    legacy = torch.get_float32_matmul_precision()
    yield torch.backends.cuda.matmul
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    torch.set_float32_matmul_precision(legacy)


def test_the_kernels_follow_torchs_newer_precision_settings(precision_settings, monkeypatch):
    """tl.dot's float32 precision is that of torch's CUDA matmuls, set through the legacy
    call or the newer per-backend and generic settings (with which the legacy getter raises);
    other dtypes multiply exactly."""
    matmul, f32 = precision_settings, torch.float32
    torch.set_float32_matmul_precision("high")
    assert common.dot_precision(f32) == "tf32" and common.dot_precision(torch.float64) == "ieee"
    matmul.fp32_precision = "ieee"  # the backend's own setting wins over the legacy one
    assert common.dot_precision(f32) == "ieee"
    matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # the generic one, inherited
    assert common.dot_precision(f32) == "tf32"
    torch.backends.fp32_precision = "none"
    matmul.fp32_precision = "tf32"
    assert common.dot_precision(f32) == "tf32"
    (x, weight, bias), _ = _inputs(6, 16, 16, f32)
    with fastae.use_backend("triton"):
        h, _, _ = ops.encode(x, weight, bias)
    assert torch.isfinite(h).all()
    matmul.fp32_precision = "none"

    def mixed():
        raise RuntimeError("PyTorch is checking the matmul precision without a specific ...")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", mixed)
    assert common.dot_precision(f32) == "ieee"


def test_tf32_error_against_float64():
    """tf32 (10-bit operands) near 3e-4 relative, as the contract says: every output and
    gradient within 1e-3 of float64 in norm (2.1e-4 to 6.7e-4 with the interpreter's
    truncated operands, a one-sided error where a GPU rounds; bfloat16's 8-bit ones would
    give about four times as much), by the fusion rules."""
    leaves, upstream = _inputs(32, 64, 48, torch.float32)
    with matmul_precision("high"):
        got = _run("triton", *leaves, upstream, activation="sigmoid")
    exact = [t.detach().double().requires_grad_() for t in leaves]
    oracle = _run("reference", *exact, [u.double() for u in upstream], activation="sigmoid")
    errors = _relative_errors(got, oracle)
    assert max(errors) < 1e-3, errors


@pytest.mark.parametrize("x_grad", [True, False])
def test_input_gradient_only_where_x_requires_it(x_grad, monkeypatch, launched_kernels):
    """The dx = dz W kernel runs only for an x that requires a gradient (a first layer's
    input data does not)."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", "gemm")
    x = torch.rand(6, 20, dtype=torch.float64, device=DEVICE, requires_grad=x_grad)
    weight = torch.randn(9, 20, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with fastae.use_backend("triton"):
        h, rho_hat, jac = ops.encode(x, weight)
        launched_kernels.clear()
        (h.sum() + rho_hat.sum() + jac).backward()
    backward = ["_encoder_grad_z_kernel", "_encoder_grad_weight_kernel"]
    assert launched_kernels == backward + ["_encoder_grad_input_kernel"] * x_grad
    assert (x.grad is not None) == x_grad and weight.grad is not None


def test_tf32_forward_of_a_transposed_input_takes_cublas(monkeypatch, launched_kernels):
    """A float32 x that is a transposed view (d strided) in tf32: cuBLAS's product and the
    statistics pass, no copy of x, the reference's values."""
    monkeypatch.delenv("FASTAE_ENCODER_FUSION", raising=False)
    (x, weight, bias), upstream = _inputs(16, 16, 32, torch.float32)
    x_t = x.detach().t().contiguous().t().requires_grad_()  # the same values, d strided
    with matmul_precision("high"):
        got = _run("triton", x_t, weight, bias, upstream, activation="tanh")
        want = _run("reference", x, weight, bias, upstream, activation="tanh")
    _assert_close(got, want, **TF32_TOLERANCE)
    assert launched_kernels[:2] == ["_encoder_statistics_kernel", "_encoder_finish_kernel"]


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """The values of vector ``t`` at stride 2, NaN between them (a read at unit stride shows)."""
    spaced = torch.stack([t.detach(), torch.full_like(t, float("nan"))], dim=1)
    return spaced[:, 0].requires_grad_(t.requires_grad)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_strided_bias_matches_reference(fusion, monkeypatch):
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    leaves, upstream = _inputs(9, 11, 13, torch.float64)
    x, weight, bias = leaves
    strided = _every_other(bias)
    assert strided.stride() == (2,) and torch.equal(strided, bias)
    got = _run("triton", x, weight, strided, upstream, activation="softplus")
    want = _run("reference", x, weight, bias, upstream, activation="softplus")
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_wide_column_variants_match_reference(fusion, monkeypatch):
    """The kernels' int64 column-index variants (chosen for strided operands whose column
    offsets reach 2^31: a column-major x with B * d >= 2^31, say) on small tensors: with the
    threshold at 1 every operand with a column stride above 1 takes them."""
    monkeypatch.setattr(common, "INDEX_LIMIT", 1)
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    leaves, upstream = _inputs(10, 13, 11, torch.float64)
    x, weight, bias = leaves
    views = [t.detach().t().contiguous().t().requires_grad_() for t in (x, weight)]
    assert common.wide_columns(views[0]) and common.wide_columns(views[1])
    noise = fastae.MaskingNoise(0.3, seed=8)
    got = _run("triton", *views, bias, upstream, activation="tanh", noise=noise)
    want = _run("reference", x, weight, bias, upstream, activation="tanh", noise=noise)
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wide", [False, True])
def test_backward_launcher_strided_upstream(wide, monkeypatch):
    """encode_backward called directly with a transposed g_h and a strided g_rho (the op
    passes contiguous ones), in both column-index widths."""
    if wide:
        monkeypatch.setattr(common, "INDEX_LIMIT", 1)
    (x, weight, bias), _ = _inputs(9, 7, 12, torch.float64)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    params = ("sigmoid", "none", 0.0, 0.0, 0.0, 0)
    h, _, _, stats = reference.encode_forward(x, weight, bias, *params)
    grad_h = torch.randn(12, 9, dtype=torch.float64, device=DEVICE).t()
    grad_rho = _every_other(torch.randn(12, dtype=torch.float64, device=DEVICE))
    grad_jac = torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    args = (grad_h, grad_rho, grad_jac, x, weight, h, stats, *params, True)
    got = encoder.encode_backward(*args)
    want = reference.encode_backward(*args)
    for name, a, b in zip(["dW", "db", "dx"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("unused", ["rho", "jac", "both"])
def test_backward_without_statistics_gradients(fusion, unused, monkeypatch):
    """A None g_rho or g_jac (rho_hat or jac unused by the loss) gives what a zero one gives,
    on both fusion boundaries, with the kernels' terms for it compiled out."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    (x, weight, bias), (grad_h, grad_rho, grad_jac) = _inputs(9, 7, 12, torch.float64)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    params = ("softplus", "none", 0.0, 0.0, 0.0, 0)
    h, _, _, stats = reference.encode_forward(x, weight, bias, *params)
    zeros = {"rho": torch.zeros_like(grad_rho), "jac": torch.zeros_like(grad_jac)}
    none_rho, none_jac = unused in ("rho", "both"), unused in ("jac", "both")
    with_none = (None if none_rho else grad_rho, None if none_jac else grad_jac)
    with_zeros = (zeros["rho"] if none_rho else grad_rho, zeros["jac"] if none_jac else grad_jac)
    rest = (x, weight, h, stats, *params, True)
    got = encoder.encode_backward(grad_h, *with_none, *rest)
    want = reference.encode_backward(grad_h, *with_zeros, *rest)
    assert reference.encode_backward(grad_h, *with_none, *rest)[0].shape == weight.shape
    for name, a, b in zip(["dW", "db", "dx"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("noise", [None, fastae.MaskingNoise(0.4, seed=7)])
def test_without_statistics(fusion, activation, noise, monkeypatch, spy_launches):
    """``statistics=False``: h and the gradients of a loss on h as with statistics, from one
    Triton launch forward (no finishing launch), and rho_hat and jac come back None."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    (x, weight, bias), (grad_h, _, _) = _inputs(11, 9, 13, torch.float64)
    launched = spy_launches(encoder, "STATISTICS")
    results = {}
    for backend in ("triton", "reference"):
        for statistics in (True, False):
            with fastae.use_backend(backend):
                launched.clear()
                h, rho_hat, jac = ops.encode(
                    x, weight, bias, activation=activation, noise=noise, statistics=statistics
                )
                forward_launches = list(launched)
                grads = torch.autograd.grad((h * grad_h).sum(), (x, weight, bias))
            assert (rho_hat is None) == (jac is None) == (not statistics)
            results[backend, statistics] = (h, *grads)
            if backend == "triton":
                # the GEMM (or the statistics pass), then the finish kernel with statistics
                assert forward_launches == ([True, None] if statistics else [False])
    want = results["reference", True]
    for got in (results["triton", False], results["reference", False], results["triton", True]):
        for name, a, b in zip(["h", "dx", "dW", "db"], got, want, strict=True):
            assert torch.isfinite(a).all(), f"{name} has unwritten (NaN) elements"
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: n + m)


SPLIT_K_BATCH = 37 if DEVICE == "cpu" else 333  # 3 row blocks of 16 (21 on a GPU)


@pytest.mark.parametrize(
    "split, noise", [(2, None), (3, fastae.MaskingNoise(0.3, seed=5)), (4, None)]
)
def test_split_k_weight_gradient_matches_reference(split, noise, split_k):
    """dW and db from SPLIT programs per tile, each over its share of the row blocks (under the
    interpreter 3 blocks of 16 over 2, 3 or 4 programs: shares of 2 and 1 blocks, one each, one
    empty; on a GPU 21 blocks of 16: the float64 tile fitted to its shared memory), the last to
    finish adding the partials and writing the contractive term and db; twice in a row (the
    tickets must be back at zero)."""
    launched = split_k(encoder, encoder._encoder_grad_weight_kernel, split)
    leaves, upstream = _inputs(SPLIT_K_BATCH, 21, 40, torch.float64)
    for _ in range(2):
        got = _run("triton", *leaves, upstream, activation="tanh", noise=noise)
        want = _run("reference", *leaves, upstream, activation="tanh", noise=noise)
        _assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert launched.tickets and not launched.tickets[-1].any()  # back at zero
    assert set(launched.splits) == {split}


def test_split_k_candidates_only_where_they_can_pay():
    assert common.split_k_possible(4096, 1024, 784)  # 56 tiles of 128 x 128, 4096 rows
    assert not common.split_k_possible(512, 1024, 784)  # too few rows to share out
    assert not common.split_k_possible(8192, 4096, 4096)  # 1024 tiles fill the GPU
    x = torch.zeros(2, 2)
    assert common.split_k_buffers(x, 512, 1024, 784) == (x, x)
    assert common.split_k_buffers(x, 512, 1024, 784, vector=True) == (x, x, x)
    work, vector, tickets = common.split_k_buffers(x, 4096, 48, 40, vector=True)
    assert work.numel() >= max(common.SPLITS) * 48 * 40 and vector.numel() >= 48
    assert tickets.dtype == torch.int32 and not tickets.any()
    assert len(common.split_k_buffers(x, 4096, 48, 40)) == 2  # no vector partials asked for
    # placeholders: what keys a launch as the buffers do, one element each, made once
    stand_ins = common.split_k_buffers(x, 4096, 48, 40, vector=True, placeholders=True)
    assert [t.dtype for t in stand_ins] == [work.dtype, vector.dtype, tickets.dtype]
    assert all(t.numel() == 1 for t in stand_ins)
    again = common.split_k_buffers(x, 4096, 48, 40, vector=True, placeholders=True)
    assert all(a is b for a, b in zip(stand_ins, again, strict=True))
    assert common.split_k_buffers(x.double(), 4096, 48, 40)[0].dtype == torch.float64
    configs = common.gemm_configs(("BLOCK_N", "BLOCK_K", "BLOCK_M"), split=True)
    assert configs[0].kwargs["SPLIT"] == 1  # FASTAE_AUTOTUNE=0 runs the unsplit kernel


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("hidden", [40, 65])
def test_finish_across_programs(fusion, hidden, monkeypatch):
    """The finish kernel over several column blocks (16 columns each) whose shares of jac the
    last program adds two at a time, each summing the row tiles' partial sums two at a time
    (70 rows: 5 tiles of 16 rows in the interpreter): rho_hat, jac and the gradients match
    the reference, twice in a row (each launch's ticket starts nonzero under poisoned outputs,
    so the first kernel must zero it)."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setattr(encoder, "FINISH_BLOCK", 16)
    monkeypatch.setattr(encoder, "FINISH_SHARES", 2)
    monkeypatch.setattr(encoder, "FINISH_ROWS", 2)
    leaves, upstream = _inputs(70, 6, hidden, torch.float64)
    for _ in range(2):
        got = _run("triton", *leaves, upstream, activation="softplus")
        want = _run("reference", *leaves, upstream, activation="softplus")
        _assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_finish_ticket_under_concurrency_cuda(monkeypatch):
    """256 finish programs running at once on the GPU, the last reading every share: jac
    matches the float64 reference on every one of 20 calls, bit for bit the same each time."""
    monkeypatch.setattr(encoder, "FINISH_BLOCK", 16)
    monkeypatch.setattr(encoder, "FINISH_SHARES", 64)
    leaves, _ = _inputs(64, 8, 4096, torch.float32)
    x, weight, bias = (t.detach() for t in leaves)
    want = reference.encode_forward(x.double(), weight.double(), bias.double(), "sigmoid", "none",
                                    0.0, 0.0, 0.0, 0)[2]  # fmt: skip
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with fastae.use_backend("triton"):
            jacs = [ops.encode(x, weight, bias)[2] for _ in range(20)]
    finally:
        torch.set_float32_matmul_precision(previous)
    for jac in jacs:
        torch.testing.assert_close(jac.double(), want, rtol=1e-5, atol=0)
        assert torch.equal(jac, jacs[0])


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_partial_sums_follow_the_launched_config(fusion, monkeypatch):
    """Another thread's launch at another shape may change an autotuner's best_config between
    a launch and the launcher's read: the partial-sum count must come from the launch."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    from triton import Config

    def clobbering(kernel):
        run = kernel.run

        def run_then_clobber(*args, **kwargs):
            out = run(*args, **kwargs)
            kernel.best_config = Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 8})
            return out

        return run_then_clobber

    for kernel in (
        encoder._encoder_forward_kernel,
        encoder._encoder_statistics_kernel,
        encoder._encoder_grad_z_kernel,
    ):
        monkeypatch.setattr(kernel, "run", clobbering(kernel))
    leaves, upstream = _inputs(40, 6, 5, torch.float64)  # 3 row tiles of 16 (the test config)
    got = _run("triton", *leaves, upstream, activation="sigmoid")
    want = _run("reference", *leaves, upstream, activation="sigmoid")
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fusion_rule(monkeypatch):
    monkeypatch.delenv("FASTAE_ENCODER_FUSION", raising=False)
    assert encoder.fusion(4096, 784, 1024, torch.float32) == "gemm"
    assert encoder.fusion(8192, 4096, 4096, torch.float32) == "split"
    assert encoder.fusion(2**14, 2**10, 2**10, torch.float32) == "split"  # 2^34: from here
    assert encoder.fusion(2**14, 2**10, 2**10 - 16, torch.float32) == "gemm"
    assert encoder.fusion(8192, 4096, 4096, torch.bfloat16) == "gemm"
    for dtype in (torch.bfloat16, torch.float32):  # H, d not multiples of 16: cuBLAS
        assert encoder.fusion(4096, 784, 1000, dtype) == "split"
        assert encoder.fusion(4096, 100, 1024, dtype) == "split"
        assert encoder.fusion(4095, 784, 1024, dtype) == "gemm"  # any batch size
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", "gemm")
    assert encoder.fusion(8192, 4096, 4096, torch.float32) == "gemm"


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_relu_keeps_a_nan_pre_activation_nan(fusion, monkeypatch):
    """h = relu(z) propagates NaN as torch.relu (tl.maximum with PropagateNan.ALL; the
    default maxnum would give 0)."""
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    x = torch.tensor([[1.0, math.nan], [0.5, -2.0]], device=DEVICE)
    weight = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], device=DEVICE)
    with fastae.use_backend("triton"):
        h, _, _ = ops.encode(x, weight, activation="relu", statistics=False)
    want = torch.relu(x @ weight.t())
    assert want.isnan().sum() == 2
    torch.testing.assert_close(h, want, rtol=0, atol=0, equal_nan=True)
