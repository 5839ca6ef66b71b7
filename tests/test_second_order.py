"""Second derivatives (double backward) of every op, on both backends: gradgradcheck in
float64, and a gradient penalty on a whole training step against a naive torch oracle.

The first-order gradients come from each backend's own backward; their derivatives are plain
torch ops on either backend, so the kernels need no second-order variants."""

import math

import pytest
import torch
from test_ops import ACTIVATIONS, DECODERS, NOISES, decoder_inputs, layer
from test_reference import ACT_FN, explicit_corrupt

import fastae
from fastae import ops

FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)

BACKENDS = ["reference", "triton"]


# the triton backend's tensors: CUDA where there is a GPU, else the CPU (interpreted kernels)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    device = TRITON_DEVICE if request.param == "triton" else "cpu"
    with fastae.use_backend(request.param), torch.device(device):
        yield request.param


def _gradgradcheck(fn, inputs):
    # random projections (fast mode): full Jacobians of a first-order gradient under the
    # interpreter take minutes
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize(
    "activation, kind",
    [(a, "none") for a in ACTIVATIONS] + [("tanh", k) for k in NOISES if k != "none"],
)
def test_gradgradcheck_encode(backend_name, activation, kind):
    x, weight, bias = layer(4, 5, 3)
    noise = NOISES[kind]
    _gradgradcheck(
        lambda x, weight, bias: ops.encode(x, weight, bias, activation=activation, noise=noise),
        (x, weight, bias),
    )


def test_gradgradcheck_encode_without_bias_and_input_grad(backend_name):
    x, weight, _ = layer(3, 4, 5, x_grad=False)
    noise = NOISES["salt_pepper"]
    _gradgradcheck(lambda weight: ops.encode(x, weight, noise=noise), (weight,))


def test_second_derivative_of_replaced_non_finite_entries(backend_name, monkeypatch):
    """Salt-and-pepper replaces an entry, inf or not, so its first and second derivatives
    are finite; with x~ regenerated (not stored) they equal the stored x~'s."""
    noise = fastae.SaltPepperNoise(0.5, seed=3)
    x = torch.rand(4, 6, dtype=torch.float64)
    kept = ops.corrupt(torch.full_like(x, 7.0), noise) == 7.0
    x[~kept] = torch.inf
    weight, grads = layer(4, 6, 3)[1], {}
    for mode in ("store", "regenerate"):
        monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", mode)
        h = ops.encode(x, weight, noise=noise)[0]
        (grad,) = torch.autograd.grad(h.square().sum(), weight, create_graph=True)
        grads[mode] = torch.autograd.grad(grad.square().sum(), weight)[0]
    assert (~kept).any() and grads["store"].isfinite().all()
    torch.testing.assert_close(grads["regenerate"], grads["store"])


@pytest.mark.parametrize("used", [(0,), (0, 1), (0, 2)])
def test_gradgradcheck_encode_with_unused_statistics(backend_name, used):
    """Outputs the loss leaves out reach backward as None gradients (no zero-fill); second
    derivatives stay exact."""
    x, weight, bias = layer(4, 5, 3)
    _gradgradcheck(
        lambda x, weight, bias: tuple(ops.encode(x, weight, bias)[i] for i in used),
        (x, weight, bias),
    )


@pytest.mark.parametrize("kind", ["gaussian", "masking_rescale"])
def test_gradgradcheck_corrupt(backend_name, kind):
    x = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    _gradgradcheck(lambda x: ops.corrupt(x, NOISES[kind]), (x,))


@pytest.mark.parametrize("target_grad", [True, False])
@pytest.mark.parametrize("output, loss", DECODERS)
def test_gradgradcheck_decode_loss(backend_name, output, loss, target_grad):
    h, weight, bias, target = decoder_inputs(3, 5, 4)
    target.requires_grad_(target_grad)

    def fn(h, weight, bias, *maybe_target):
        t = maybe_target[0] if maybe_target else target
        return ops.decode_loss(h, weight, bias, target=t, output=output, loss=loss)

    _gradgradcheck(fn, (h, weight, bias) + ((target,) if target_grad else ()))


@pytest.mark.parametrize("outputs", ["both", "z", "kl"])
def test_gradgradcheck_reparameterize(backend_name, outputs):
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = (0.5 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()

    def fn(mu, logvar):
        z, kl = ops.reparameterize(mu, logvar, seed=2**40 + 3)
        return {"both": (z, kl), "z": z, "kl": kl}[outputs]

    _gradgradcheck(fn, (mu, logvar))


def _naive_step(x, weight, bias, c, noise):
    """A tied sparse + denoising + contractive step in plain torch (slopes by autograd)."""
    z = explicit_corrupt(x, noise) @ weight.t() + bias
    h = ACT_FN["sigmoid"](z)
    (slope,) = torch.autograd.grad(h, z, torch.ones_like(h), create_graph=True)
    jac = (slope.square() * weight.square().sum(1)).sum(1).mean()
    p = torch.sigmoid(h @ weight + c)
    bce = -(x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum(1)
    return bce.mean() + h.mean(0).square().sum() + 0.3 * jac


def _fastae_step(x, weight, bias, c, noise):
    h, rho_hat, jac = ops.encode(x, weight, bias, noise=noise)
    bce = ops.decode_loss(h, weight.t(), c, target=x)
    return bce.mean() + rho_hat.square().sum() + 0.3 * jac


def test_gradient_penalty_matches_naive_oracle(backend_name):
    """d/dtheta [L + |dL/dtheta|^2] for a whole step: second derivatives through encode and
    decode_loss (tied weights), against autograd of the naive composition."""
    x, weight, bias = layer(6, 5, 4, x_grad=False)
    c = (0.3 * torch.randn(5, dtype=torch.float64)).requires_grad_()
    params = (weight, bias, c)

    def penalized(step):
        loss = step(x, *params, NOISES["masking"])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        total = loss + sum(g.square().sum() for g in grads)
        return torch.autograd.grad(total, params)

    for got, want in zip(penalized(_fastae_step), penalized(_naive_step), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _naive_decode_loss(h, weight, bias, target, output, loss):
    z = h @ weight.t() + bias
    if loss == "bce":
        p = torch.sigmoid(z)
        return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).sum(1)
    x_hat = torch.sigmoid(z) if output == "sigmoid" else z
    return (x_hat - target).square().sum(1)


@pytest.mark.parametrize("output, loss", DECODERS)
def test_decode_loss_hessian_vector_products_match_naive_oracle(backend_name, output, loss):
    """torch.autograd.functional.hvp differentiates decode_loss's double backward in its
    upstream gradient (the double-backward trick): exact, unlike a third derivative."""
    inputs = decoder_inputs(3, 5, 4)
    vectors = tuple(torch.randn_like(t) for t in inputs)

    def fastae_loss(h, weight, bias, target):
        return ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss).sum()

    def naive_loss(*args):
        return _naive_decode_loss(*args, output, loss).sum()

    _, got = torch.autograd.functional.hvp(fastae_loss, inputs, vectors)
    _, want = torch.autograd.functional.hvp(naive_loss, inputs, vectors)
    for got_product, want_product in zip(got, want, strict=True):
        torch.testing.assert_close(got_product, want_product, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decode_loss_bce_curvature_in_the_sigmoid_tails(backend_name, dtype):
    """d^2 BCE / dc^2 = sum over rows of sigmoid'(z), at saturated logits too: sigmoid'(20) is
    2.06e-9 and sigmoid'(40) 4.2e-18, which sigmoid(z) (1 - sigmoid(z)) rounds to 0 (in
    float32 from z = 17, in float64 from z = 37)."""
    logits = [40.0, -40.0, 20.0, -20.0, 0.5]
    rows = 3
    h = torch.zeros(rows, 2, dtype=dtype)
    weight = torch.zeros(len(logits), 2, dtype=dtype)
    bias = torch.tensor(logits, dtype=dtype, requires_grad=True)
    target = torch.rand(rows, len(logits), dtype=dtype)
    loss = ops.decode_loss(h, weight, bias, target=target).sum()
    (grad,) = torch.autograd.grad(loss, bias, create_graph=True)
    (curvature,) = torch.autograd.grad(grad.sum(), bias)
    exact = [rows * math.exp(-abs(z)) / (1 + math.exp(-abs(z))) ** 2 for z in logits]
    want = torch.tensor(exact, dtype=torch.float64)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(curvature.double().cpu(), want, rtol=rtol, atol=0)


def test_decode_loss_third_derivative_is_refused(backend_name):
    h, weight, bias, target = decoder_inputs(3, 4, 2)
    loss = ops.decode_loss(h, weight, bias, target=target.detach()).sum()
    (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
    (grad_grad_h,) = torch.autograd.grad(grad_h.square().sum(), h, create_graph=True)
    with pytest.raises(
        RuntimeError, match="third derivatives in h, weight, bias or target are not"
    ):
        torch.autograd.grad(grad_grad_h.sum(), h)
    # a Hessian-vector product kept differentiable: its derivative in h is a third one too
    # (through the upstream-gradient part as well), refused rather than partly dropped
    vector = torch.randn_like(h)

    def fn(h):
        return ops.decode_loss(h, weight, bias, target=target.detach()).sum()

    _, product = torch.autograd.functional.hvp(fn, h, vector, create_graph=True)
    assert product.requires_grad
    with pytest.raises(RuntimeError, match="third derivatives in h, weight, bias or target"):
        torch.autograd.grad((product * vector).sum(), h)
