"""The Triton decoder + loss (fastae.kernels.decoder) against the reference backend."""

import math

import pytest
import torch
from precision import assert_within_twice_torchs_error

import fastae
from fastae import ops, reference
from fastae.benchmark import matmul_precision

pytest.importorskip("triton")
from fastae.kernels import common, decoder  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAIRS = [("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")]
# half precision against float64: B x H -> d
HALF_SHAPE = (512, 1024, 784) if DEVICE == "cuda" else (33, 40, 70)
# float32 at matmul precision "high": our tf32 products read their inputs to 10 mantissa bits
# (the interpreter as the GPU: tests/conftest.py), the reference's are exact on the CPU, and
# on a GPU cuBLAS's round and sum differently
TF32_TOLERANCE = dict(rtol=2e-2, atol=2e-3)
FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(common, "poison_outputs", True)


def _inputs(batch, hidden, features, dtype, *, tied, target_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    h = torch.rand(batch, hidden, generator=g, dtype=torch.float64).to(dtype)
    weight = randn(hidden, features, scale=hidden**-0.5 * 2)  # encoder layout (H, d)
    if not tied:
        weight = randn(features, hidden, scale=hidden**-0.5 * 2)
    bias = randn(features, scale=0.3)
    target = torch.rand(batch, features, generator=g, dtype=torch.float64).to(dtype)
    leaves = [t.to(DEVICE).requires_grad_() for t in (h, weight, bias, target)]
    leaves[3].requires_grad_(target_grad)
    upstream = randn(batch).to(DEVICE)
    return leaves, upstream


def _run(backend, h, weight, bias, target, upstream, *, tied, **kwargs):
    decoder_weight = weight.t() if tied else weight
    with fastae.use_backend(backend):
        loss, x_hat = ops.decode_loss(
            h, decoder_weight, bias, target=target, return_reconstruction=True, **kwargs
        )
        wrt = [t for t in (h, weight, bias, target) if t is not None and t.requires_grad]
        grads = torch.autograd.grad((loss * upstream).sum(), wrt)
    return (loss, x_hat, *grads)


def _assert_close(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(a).all(), f"output {i} has unwritten (NaN) elements"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"#{i}: {m}")


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch,hidden,features", [(1, 17, 5), (7, 1, 70), (33, 40, 5)])
def test_matches_reference(output, loss, tied, batch, hidden, features):
    leaves, upstream = _inputs(batch, hidden, features, torch.float64, tied=tied, target_grad=True)
    kw = dict(tied=tied, output=output, loss=loss)
    got = _run("triton", *leaves, upstream, **kw)
    want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("tied", [True, False])
def test_matches_reference_without_a_bias(output, loss, tied, fusion, monkeypatch):
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    (h, weight, _, target), upstream = _inputs(7, 17, 5, torch.float64, tied=tied, target_grad=True)
    kw = dict(tied=tied, output=output, loss=loss)
    got = _run("triton", h, weight, None, target, upstream, **kw)
    want = _run("reference", h, weight, None, target, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("output,loss", PAIRS)
def test_float32(output, loss):
    leaves, upstream = _inputs(20, 24, 37, torch.float32, tied=True)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        kw = dict(tied=True, output=output, loss=loss)
        got = _run("triton", *leaves, upstream, **kw)
        want = _run("reference", *leaves, upstream, **kw)
    finally:
        torch.set_float32_matmul_precision(previous)
    _assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output,loss", PAIRS)
def test_gradcheck_triton(output, loss):
    (h, weight, bias, target), _ = _inputs(3, 4, 5, torch.float64, tied=False, target_grad=True)
    with fastae.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.decode_loss(*a[:3], target=a[3], output=output, loss=loss),
            (h, weight, bias, target),
            fast_mode=True,
        )


def test_opcheck_triton():
    (h, weight, bias, target), _ = _inputs(4, 5, 6, torch.float64, tied=False)
    args = (h, weight, bias, target, "sigmoid", "bce", "triton", False, True)
    torch.library.opcheck(torch.ops.fastae.decode_loss.default, args)
    # without the gradient (what decode_loss passes when no input requires one)
    detached = tuple(t.detach() for t in (h, weight, bias, target))
    args = (*detached, "sigmoid", "bce", "triton", False, False)
    torch.library.opcheck(torch.ops.fastae.decode_loss.default, args)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("tied", [True, False])
def test_weight_gradient_in_the_weights_layout(backend_name, tied):
    """dV comes in V's layout, column-major for a tied V = W^T, so autograd puts the tied
    gradient into W.grad without copying it into W's layout (a new_empty_strided + copy_ of
    (H, d) per step); the backward op's fake implementation promises the same strides."""
    from fastae.benchmark import OpCounter

    (h, weight, bias, target), upstream = _inputs(7, 5, 6, torch.float64, tied=tied)
    decoder_weight = weight.t() if tied else weight
    with fastae.use_backend(backend_name):
        per_sample = ops.decode_loss(h, decoder_weight, bias, target=target)
        counter = OpCounter()
        with counter:
            (per_sample * upstream).sum().backward()
    assert counter.counts["fastae.decode_loss_backward"] == 1
    assert counter.counts["aten.new_empty_strided"] == 0
    assert weight.grad.stride() == weight.stride()
    fwd_args = (h, decoder_weight, bias, target, "sigmoid", "bce", backend_name, False, True)
    _, grad_z, _ = torch.ops.fastae.decode_loss.default(*fwd_args)
    bwd_args = (upstream, h, decoder_weight, grad_z, bias, None, "sigmoid", "bce", backend_name)
    grad_weight = torch.ops.fastae.decode_loss_backward.default(*bwd_args, True)[0]
    assert grad_weight.stride() == decoder_weight.stride()
    torch.library.opcheck(torch.ops.fastae.decode_loss_backward.default, (*bwd_args, True))


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("tied", [True, False])
def test_split_boundary_matches_reference(output, loss, tied, monkeypatch):
    """The other fusion boundary (torch's products, one loss pass over z^ writing G in place,
    the reference's backward) computes the same, x^ included."""
    monkeypatch.setenv("FASTAE_DECODER_FUSION", "split")
    leaves, upstream = _inputs(9, 13, 11, torch.float64, tied=tied, target_grad=True)
    kw = dict(tied=tied, output=output, loss=loss)
    got = _run("triton", *leaves, upstream, **kw)
    want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_split_boundary_opcheck(monkeypatch):
    monkeypatch.setenv("FASTAE_DECODER_FUSION", "split")
    (h, weight, bias, target), _ = _inputs(4, 5, 6, torch.float64, tied=False)
    for with_reconstruction in (False, True):
        args = (h, weight, bias, target, "sigmoid", "mse", "triton", with_reconstruction, True)
        torch.library.opcheck(torch.ops.fastae.decode_loss.default, args)
        detached = tuple(t.detach() for t in (h, weight, bias, target))
        args = (*detached, "sigmoid", "mse", "triton", with_reconstruction, False)
        torch.library.opcheck(torch.ops.fastae.decode_loss.default, args)


def test_fusion_choice_is_validated(monkeypatch):
    monkeypatch.setenv("FASTAE_DECODER_FUSION", "fastest")
    with pytest.raises(ValueError, match="FASTAE_DECODER_FUSION"):
        decoder.fusion(8, 8, 8, torch.float32)


def test_fusion_rule(monkeypatch):
    monkeypatch.delenv("FASTAE_DECODER_FUSION", raising=False)
    bf16 = torch.bfloat16
    assert decoder.fusion(4096, 784, 1024, bf16) == "gemm"
    assert decoder.fusion(8192, 4096, 4096, bf16) == "split"
    assert decoder.fusion(2**14, 2**10, 2**10, bf16) == "split"  # 2^34: from here
    assert decoder.fusion(2**14, 2**10, 2**10 - 16, bf16) == "gemm"
    assert decoder.fusion(4096, 784, 1000, bf16) == "split"  # H, d not multiples of 16: cuBLAS
    assert decoder.fusion(4096, 100, 1024, bf16) == "split"
    assert decoder.fusion(4095, 784, 1024, bf16) == "gemm"  # the batch size does not matter
    assert decoder.backward_fusion(4096, 784, 1024, bf16) == "gemm"
    assert decoder.backward_fusion(4096, 784, 1000, bf16) == "split"
    with matmul_precision("highest"):  # IEEE float32: CUDA cores, any layout
        assert decoder.fusion(4096, 784, 1024, torch.float32, k_major_operands=False) == "gemm"
        assert decoder.backward_fusion(4096, 784, 1024, torch.float32) == "gemm"
    with matmul_precision("high"):  # tf32: a tied V^T = W is not contiguous along H; dV never is
        assert decoder.fusion(4096, 784, 1024, torch.float32) == "gemm"
        assert decoder.fusion(4096, 784, 1024, torch.float32, k_major_operands=False) == "split"
        assert decoder.backward_fusion(4096, 784, 1024, torch.float32) == "split"
        assert decoder.fusion(4096, 784, 1024, bf16, k_major_operands=False) == "gemm"
        assert decoder.backward_fusion(4096, 784, 1024, bf16) == "gemm"
        monkeypatch.setenv("FASTAE_DECODER_FUSION", "gemm")
        assert decoder.fusion(8192, 4096, 4096, bf16) == "gemm"
        assert decoder.fusion(4096, 784, 1024, torch.float32, k_major_operands=False) == "gemm"
        assert decoder.backward_fusion(4096, 784, 1024, torch.float32) == "gemm"


def test_tf32_error_against_float64():
    """tf32 near 3e-4 relative (the contract): the untied fused path's loss, x^ and every
    gradient within 1.5e-3 of float64 in norm, by the fusion rules (the interpreter truncates
    the operands, a one-sided error that reaches 9.7e-4 in dh here, where a GPU rounds
    them; bfloat16's operands would give about four times as much)."""
    leaves, upstream = _inputs(32, 48, 64, torch.float32, tied=False, target_grad=True)
    kw = dict(tied=False, output="sigmoid", loss="bce")
    with matmul_precision("high"):
        got = _run("triton", *leaves, upstream, **kw)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    oracle = _run("reference", *exact, upstream.double(), **kw)
    pairs = zip(got, oracle, strict=True)
    errors = [
        float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in pairs
    ]
    assert max(errors) < 1.5e-3, errors


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("precision", ["high", "highest"])
def test_tf32_takes_cublas_products_where_an_operand_is_strided_along_k(
    tied, precision, monkeypatch, launched_kernels
):
    """float32 at an aligned shape, by the rules (none forced): the fused forward unless tf32
    meets a tied V (V^T = W strided along H: cuBLAS's product and the loss pass); in tf32
    the backward is torch's products (no launch), in IEEE float32 the fused dV and dh
    kernels; the values match the reference's."""
    monkeypatch.delenv("FASTAE_DECODER_FUSION", raising=False)
    leaves, upstream = _inputs(8, 32, 16, torch.float32, tied=tied)
    kw = dict(tied=tied, output="sigmoid", loss="bce")
    with matmul_precision(precision):
        got = _run("triton", *leaves, upstream, **kw)
        want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, **TF32_TOLERANCE)
    tf32 = precision == "high"
    forward = "_decoder_loss_kernel" if tf32 and tied else "_decoder_forward_kernel"
    backward = [] if tf32 else ["_decoder_grad_weight_kernel", "_decoder_grad_code_kernel"]
    assert launched_kernels == [forward, *backward]


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("wide", [True, False])
def test_both_index_widths_match_reference(monkeypatch, wide, fusion):
    """The epilogue's int64 offsets (taken for tensors past 2^31 elements) and its int32
    ones give the reference's values; the target is a transposed view (strided loads)."""
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    monkeypatch.setattr(decoder, "wide_index", lambda *tensors: wide)
    leaves, upstream = _inputs(9, 6, 11, torch.float64, tied=True, target_grad=True)
    leaves[3] = leaves[3].detach().t().contiguous().t().requires_grad_()
    assert not leaves[3].is_contiguous()
    kw = dict(tied=True, output="sigmoid", loss="bce")
    got = _run("triton", *leaves, upstream, **kw)
    want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_wide_index_threshold():
    def meta(shape, stride=None):
        t = torch.empty(shape, device="meta")
        return t if stride is None else t.as_strided(shape, stride)

    assert not common.wide_index(meta((2**16, 2**15)))  # last offset 2^31 - 1
    assert common.wide_index(meta((2**16 + 1, 2**15)))
    assert common.wide_index(meta((3, 5)), meta((2, 2), (2**31, 1)))  # any tensor counts
    assert not common.wide_index(meta((2**20, 4), (0, 1)))  # expanded: offsets stay small
    assert not common.wide_index(meta((0, 2**40)))


def test_bce_target_outside_unit_interval_is_rejected():
    (h, weight, bias, target), _ = _inputs(4, 5, 6, torch.float64, tied=False)
    with fastae.use_backend("triton"), pytest.raises(ValueError, match="target"):
        ops.decode_loss(h, weight, bias, target=target.detach() * 3 - 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bce_keeps_the_loss_of_confident_logits_on_their_targets(backend):
    """Logits +-8 .. +-30 on their targets (1 for positive, 0 for negative): each element's
    BCE is log(1 + e^-|z|) exactly, 3e-4 down to 1e-13, and the per-sample loss keeps float32's
    relative precision where ``softplus(z) - t z`` loses every term from z = 15 on (t = 1) and
    ``F.binary_cross_entropy_with_logits`` from z = -15 down (t = 0)."""
    magnitudes = torch.tensor([[8.0, 15.5, 20.0, 30.0], [20.0, 20.0, 25.0, 30.0]])
    logits = torch.cat([magnitudes, -magnitudes], 1).to(DEVICE)
    target = (logits > 0).float()
    h = torch.eye(2, device=DEVICE)  # z^ = h V^T = the logits exactly
    with fastae.use_backend(backend):
        got = ops.decode_loss(h, logits.t().contiguous(), target=target)
    exact = [sum(math.log1p(math.exp(-abs(v))) for v in row) for row in logits.tolist()]
    torch.testing.assert_close(got.double().cpu(), torch.tensor(exact).double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bce_keeps_the_curvature_of_confident_logits(backend):
    """The double backward's d^2 ell / d z^2 = sigmoid'(z) = sigmoid(z) sigmoid(-z) at logits
    +-8 .. +-30 to float32's relative precision, where x^ (1 - x^) is 0 from |z| = 17 on."""
    magnitudes = torch.tensor([[8.0, 15.5, 20.0, 30.0], [20.0, 20.0, 25.0, 30.0]])
    logits = torch.cat([magnitudes, -magnitudes], 1).to(DEVICE)
    h = torch.eye(2, device=DEVICE)  # z^ = h V^T = the logits exactly
    weight = logits.t().contiguous().requires_grad_()
    with fastae.use_backend(backend):
        per_sample = ops.decode_loss(h, weight, target=(logits > 0).float())
        (grad,) = torch.autograd.grad(per_sample.sum(), weight, create_graph=True)
        (curvature,) = torch.autograd.grad(grad.sum(), weight)  # dV_ki / dV_ki
    z = logits.double().cpu()
    want = torch.sigmoid(z) * torch.sigmoid(-z)
    torch.testing.assert_close(curvature.t().double().cpu(), want, rtol=1e-5, atol=0)


def test_saves_one_batch_by_features_tensor():
    """Backward keeps h, V and c (alive anyway) plus one (B, d) tensor: d ell / d z^."""
    (h, weight, bias, target), _ = _inputs(8, 6, 10, torch.float64, tied=False)
    saved = []
    with (
        fastae.use_backend("triton"),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        ops.decode_loss(h, weight, bias, target=target)
    alive = (h.data_ptr(), weight.data_ptr(), bias.data_ptr())
    new = [t for t in saved if t.data_ptr() not in alive]
    assert [tuple(t.shape) for t in new] == [(8, 10)]


@pytest.mark.parametrize("tied", [True, False])
def test_full_step_matches_reference(tied):
    """encode + decode_loss, every regularizer: the loss and every parameter gradient."""
    got, want = _full_steps(tied, 30, 9, torch.float64)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


def _full_steps(tied, features, hidden, dtype):
    """(triton, reference): a step's loss and parameter gradients with every regularizer."""
    torch.manual_seed(0)
    x = torch.rand(12, features, dtype=dtype, device=DEVICE)
    model = fastae.Autoencoder(
        features, hidden, tied=tied, noise=fastae.MaskingNoise(0.3, seed=5),
        sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2,
    ).to(device=DEVICE, dtype=dtype)  # fmt: skip
    results = []
    for backend in ("triton", "reference"):
        model.zero_grad()
        with fastae.use_backend(backend):
            out = model(x)
            out.loss.backward()
        results.append([out.loss.detach()] + [p.grad.clone() for p in model.parameters()])
    return results


@pytest.mark.parametrize("tied", [True, False])
def test_full_step_by_the_tf32_rules_matches_reference(tied, monkeypatch, launched_kernels):
    """float32 in tf32, the fusion rules left to choose (d and H multiples of 16): fused
    forwards except a tied decoder's, the backward's products torch's; with every regularizer
    the loss and every parameter gradient (a tied W gets the encoder's dW and the decoder's
    dV^T) match the reference's."""
    for name in ("FASTAE_ENCODER_FUSION", "FASTAE_DECODER_FUSION", "FASTAE_CORRUPTED_INPUT"):
        monkeypatch.delenv(name, raising=False)
    with matmul_precision("high"):
        got, want = _full_steps(tied, 32, 16, torch.float32)
    _assert_close(got, want, **TF32_TOLERANCE)
    decoder_forward = "_decoder_loss_kernel" if tied else "_decoder_forward_kernel"
    assert launched_kernels == [
        "_corrupt_kernel", "_encoder_forward_kernel", "_encoder_finish_kernel", decoder_forward,
        "_bernoulli_kl_kernel", "_encoder_grad_z_kernel",
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("tied", [True, False])
def test_half_precision(dtype, output, loss, tied):
    """Within 2x of torch's own error at this dtype, both measured against float64 (on a GPU
    at the benchmark's size, in the interpreter at an odd small one)."""
    leaves, upstream = _inputs(*HALF_SHAPE, dtype, tied=tied)
    kw = dict(tied=tied, output=output, loss=loss)
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    oracle = _run("reference", *exact, upstream.double(), **kw)
    ours = _run("triton", *leaves, upstream, **kw)
    torch_ = _run("reference", *leaves, upstream, **kw)
    names = ["loss", "x^", *(f"grad {i}" for i in range(len(ours) - 2))]
    assert_within_twice_torchs_error(ours, torch_, oracle, dtype, names)


def _step(model, x, backend):
    """A training step's loss and parameter gradients on ``backend``."""
    model.zero_grad()
    with fastae.use_backend(backend):
        loss = model(x).loss
        loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [True, False])
def test_half_precision_full_step(dtype, tied):
    """A training step with every regularizer in half precision: the loss and each parameter
    gradient within 2x of torch's own error at the dtype (the reference backend), both
    against the reference in float64 from the same weights and noise mask (the loss, a sum:
    see ``precision``)."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(
        64, 32, tied=tied, noise=fastae.MaskingNoise(0.3, seed=5),
        sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2,
    ).to(DEVICE, dtype)  # fmt: skip
    x = torch.rand(33, 64, device=DEVICE, dtype=dtype)
    ours, torch_ = _step(model, x, "triton"), _step(model, x, "reference")
    oracle = _step(model.double(), x.double(), "reference")  # the same values, exact
    names = ["loss", *(name for name, _ in model.named_parameters())]
    assert_within_twice_torchs_error(ours, torch_, oracle, dtype, names, sums=["loss"])


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """The values of vector ``t`` at stride 2, NaN between them (a read at unit stride shows)."""
    spaced = torch.stack([t.detach(), torch.full_like(t, float("nan"))], dim=1)
    return spaced[:, 0].requires_grad_(t.requires_grad)


def test_strided_bias_matches_reference():
    leaves, upstream = _inputs(9, 6, 11, torch.float64, tied=False)
    h, weight, bias, target = leaves
    strided = _every_other(bias)
    assert strided.stride() == (2,) and torch.equal(strided, bias)
    kw = dict(tied=False, output="sigmoid", loss="bce")
    got = _run("triton", h, weight, strided, target, upstream, **kw)
    want = _run("reference", h, weight, bias, target, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


def _check_upstream_gradient(h, decoder_weight, weight, bias, target, upstream):
    """Triton against the reference for the per-sample upstream gradient ``upstream``:
    through autograd, and with the backward launcher called directly."""
    results = {}
    for backend in ("triton", "reference"):
        with fastae.use_backend(backend):
            loss = ops.decode_loss(h, decoder_weight, bias, target=target)
            results[backend] = torch.autograd.grad(loss, (h, weight, bias), grad_outputs=upstream)
    _assert_close(results["triton"], results["reference"], rtol=1e-10, atol=1e-12)
    h, decoder_weight = h.detach(), decoder_weight.detach()
    _, grad_z = reference.decode_forward(h, decoder_weight, bias.detach(), target, "sigmoid", "bce")
    got = decoder.decode_backward(upstream, h, decoder_weight, grad_z, True)
    want = reference.decode_backward(upstream, h, decoder_weight, grad_z, True)
    _assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_strided_upstream_gradient_matches_reference():
    """A per-sample upstream gradient at stride 2: through autograd and to the launcher."""
    (h, weight, bias, target), upstream = _inputs(9, 6, 11, torch.float64, tied=False)
    _check_upstream_gradient(h, weight, weight, bias, target, _every_other(upstream))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shape", [(1, 6, 11), (13, 6, 11), (37, 21, 40)])
def test_uniform_upstream_gradient_matches_reference(tied, shape, spy_launches):
    """One weight for every sample (the gradient of a sum of the per-sample losses: stride
    0), which the backward kernels apply after their sums: the launcher takes that variant,
    and it matches the reference, called directly and through autograd; with several row,
    output and hidden blocks, dc adds every row block's share once."""
    batch, features, hidden = shape
    (h, weight, bias, target), _ = _inputs(batch, features, hidden, torch.float64, tied=tied)
    uniform = torch.tensor(0.37, dtype=torch.float64, device=DEVICE).expand(batch)
    launched = spy_launches(decoder, "UNIFORM")
    decoder_weight = weight.t() if tied else weight
    _check_upstream_gradient(h, decoder_weight, weight, bias, target, uniform)
    assert launched[-2:] == [True, True]  # dV and dh kernels


@pytest.mark.parametrize(
    "split, tied, uniform", [(2, True, True), (3, False, False), (4, True, False), (4, False, True)]
)
def test_split_k_weight_gradient_matches_reference(split, tied, uniform, split_k):
    """dV and dc from SPLIT programs per tile, each over its share of the row blocks (under the
    interpreter 3 blocks of 16 over 2, 3 or 4 programs: shares of 2 and 1 blocks, one each, one
    empty; on a GPU 21 blocks of 16: the float64 tile fitted to its shared memory), the last to
    finish adding the partial tiles and dc's partials, then scaling by a uniform weight; twice
    in a row (the tickets must be back at zero)."""
    launched = split_k(decoder, decoder._decoder_grad_weight_kernel, split)
    batch = 37 if DEVICE == "cpu" else 333
    (h, weight, bias, target), upstream = _inputs(batch, 21, 40, torch.float64, tied=tied)
    if uniform:
        upstream = torch.tensor(0.37, dtype=torch.float64, device=DEVICE).expand(batch)
    decoder_weight = weight.t() if tied else weight
    for _ in range(2):
        _check_upstream_gradient(h, decoder_weight, weight, bias, target, upstream)
        assert launched.tickets and not launched.tickets[-1].any()
    assert set(launched.splits) == {split}


def test_wide_column_variants_match_reference(monkeypatch):
    """The kernels' int64 column-index variants (chosen for strided operands whose column
    offsets reach 2^31: a tied V = W^T with H * d >= 2^31, say) on small tensors: with the
    threshold at 1 every operand with a column stride above 1 takes them (and the epilogue
    its int64 offsets). Tied weights (V = W^T, column stride d), h and the target transposed
    views."""
    monkeypatch.setattr(common, "INDEX_LIMIT", 1)
    leaves, upstream = _inputs(10, 7, 12, torch.float64, tied=True, target_grad=True)
    h, weight, bias, target = leaves
    h_view, target_view = (t.detach().t().contiguous().t().requires_grad_() for t in (h, target))
    views = [h_view, weight, bias, target_view]
    assert all(common.wide_columns(t) for t in (h_view, weight.t(), target_view))
    kw = dict(tied=True, output="sigmoid", loss="mse")
    got = _run("triton", *views, upstream, **kw)
    want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_an_expanded_target_still_widens_the_written_offsets(fusion, monkeypatch, spy_launches):
    """G and x^ are (B, d) and contiguous whatever the target's strides: a target expanded
    from one row (its last offset d - 1) with B * d past the threshold takes int64 offsets."""
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    (h, weight, bias, target), _ = _inputs(10, 7, 12, torch.float64, tied=False)
    row = target[:1].detach().expand(10, 12)
    monkeypatch.setattr(common, "INDEX_LIMIT", 12)  # above the target's 11, below B * d
    wide = spy_launches(decoder, "WIDE_INDEX")
    with fastae.use_backend("triton"):
        got = ops.decode_loss(h, weight, bias, target=row, return_reconstruction=True)
    assert wide and all(wide)
    with fastae.use_backend("reference"):
        want = ops.decode_loss(h, weight, bias, target=row, return_reconstruction=True)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


def test_wide_columns_threshold():
    def meta(shape, stride):
        return torch.empty(shape, device="meta").as_strided(shape, stride)

    # column-major x (B, d): column offset (d - 1) * B
    assert not common.wide_columns(meta((2**16, 2**15), (1, 2**16)))  # 2^31 - 2^16
    assert common.wide_columns(meta((2**16, 2**15 + 1), (1, 2**16)))  # 2^31: int32 overflows
    assert not common.wide_columns(meta((2, 2), (1, 2**31 - 1)))  # 2^31 - 1
    # tied V = W^T, W (H, d) contiguous: V (d, H) has column stride d
    d, hidden = 2**12, 2**19
    assert common.wide_columns(meta((d, hidden + 1), (1, d)))
    assert not common.wide_columns(meta((d, hidden), (1, d)))  # (H - 1) d < 2^31
    # contiguous: the column stride is 1, however large the tensor
    assert not common.wide_columns(meta((2**40, 2**20), (2**20, 1)))
    assert not common.wide_columns(meta((3, 1), (1, 2**40)))  # one column: offset 0
    assert not common.wide_columns(meta((0, 5), (1, 2**40)))  # empty
    assert common.wide_columns(meta((3, 5), (5, 1)), meta((2, 2), (1, 2**31)))  # any tensor


def test_partial_sums_follow_the_launched_config(monkeypatch):
    """Another thread's launch may change the autotuner's best_config between this launch and
    the launcher's read: the per-sample loss must sum the partials this launch wrote."""
    from triton import Config

    kernel = decoder._decoder_forward_kernel
    run = kernel.run

    def run_then_clobber(*args, **kwargs):
        out = run(*args, **kwargs)
        kernel.best_config = Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 8})
        return out

    monkeypatch.setattr(kernel, "run", run_then_clobber)
    leaves, upstream = _inputs(6, 5, 40, torch.float64, tied=False, target_grad=False)
    kw = dict(tied=False, output="sigmoid", loss="bce")
    got = _run("triton", *leaves, upstream, **kw)
    want = _run("reference", *leaves, upstream, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("fusion", ["gemm", "split"])
@pytest.mark.parametrize("output,loss", PAIRS)
def test_no_gradient_is_written_where_none_can_be_asked(
    fusion, output, loss, spy_launches, monkeypatch
):
    """Under torch.no_grad (scoring, validation) the forward kernel leaves d loss / d x^
    unwritten and still gives the loss and x^ it gives with a gradient; with one it writes
    it."""
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    leaves, _ = _inputs(9, 7, 13, torch.float64, tied=False)
    launched = spy_launches(decoder, "WRITE_GRAD")
    with fastae.use_backend("triton"):
        kw = dict(target=leaves[3], output=output, loss=loss, return_reconstruction=True)
        with_grad = ops.decode_loss(*leaves[:3], **kw)
        with torch.no_grad():
            scored = ops.decode_loss(*leaves[:3], **kw)
    assert launched == [True, False]
    for a, b in zip(scored, with_grad, strict=True):
        assert torch.isfinite(a).all() and not a.requires_grad
        assert torch.equal(a, b.detach())
