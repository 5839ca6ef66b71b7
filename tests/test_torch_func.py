"""Under torch.func transforms (grad, vjp, jacrev, jacfwd, jvp, vmap, hessian) and forward-mode
AD the ops run their reference math in plain torch ops: the same values as a plain call, and
derivatives equal to the ops' hand-written backward (first and second order) and to
brute-force Jacobians."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastae
from fastae import ops
from fastae.noise import GaussianNoise, MaskingNoise, SaltPepperNoise

NOISES = {
    "none": None,
    "masking": MaskingNoise(0.3, rescale=True, seed=11),
    "gaussian": GaussianNoise(0.2, seed=12),
    "salt_pepper": SaltPepperNoise(0.2, seed=13),
}


def _rand(*shape, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, dtype=torch.float64)


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _assert_vjp_matches_backward(fn, primals):
    """torch.func.vjp against plain autograd, which runs the ops' own backward."""
    outputs, pullback = vjp(fn, *primals)
    outputs = _as_tuple(outputs)
    cotangents = tuple(torch.randn_like(o) for o in outputs)
    leaves = [p.detach().requires_grad_() for p in primals]
    expect = _as_tuple(fn(*leaves))
    assert "_eagerBackward" in type(expect[0].grad_fn).__name__  # the ops' own backward
    for got, want in zip(outputs, expect, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    expect_grads = torch.autograd.grad(expect, leaves, cotangents, allow_unused=True)
    grads = pullback(cotangents if len(cotangents) > 1 else cotangents[0])
    for got, want, leaf in zip(grads, expect_grads, leaves, strict=True):
        want = torch.zeros_like(leaf) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "softplus"])
@pytest.mark.parametrize("noise", list(NOISES))
def test_encode_vjp_matches_its_backward(activation, noise):
    x, weight, bias = _rand(6, 5), _rand(4, 5, low=-1), _rand(4, low=-0.5, high=0.5)

    def fn(x, weight, bias):
        return ops.encode(x, weight, bias, activation=activation, noise=NOISES[noise])

    _assert_vjp_matches_backward(fn, (x, weight, bias))


@pytest.mark.parametrize(
    ("output", "loss"), [("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")]
)
@pytest.mark.parametrize("tied", [True, False])
def test_decode_loss_vjp_matches_its_backward(output, loss, tied):
    h, target, bias = _rand(6, 4), _rand(6, 5), _rand(5, low=-0.5, high=0.5)
    weight = _rand(4, 5, low=-1) if tied else _rand(5, 4, low=-1)

    def fn(h, weight, bias, target):
        matrix = weight.t() if tied else weight
        return ops.decode_loss(h, matrix, bias, target=target, output=output, loss=loss)

    _assert_vjp_matches_backward(fn, (h, weight, bias, target))


def test_bce_derivatives_at_a_zero_logit():
    """Logits exactly 0 (dead relu codes and a zero decoder bias, as a model starts): torch.func
    gives BCE's d/dz = sigmoid(0) - t = 1/2 - t and d2/dz2 = 1/4, as the ops' backward."""
    h = torch.zeros(3, 4, dtype=torch.float64)
    weight = _rand(5, 4, low=-1)
    target = _rand(3, 5)

    def loss_of(bias):
        return ops.decode_loss(h, weight, bias, target=target).sum()

    bias = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(grad(loss_of)(bias), (0.5 - target).sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(hessian(loss_of)(bias), torch.eye(5).double() * 0.75)
    _assert_vjp_matches_backward(
        lambda bias: ops.decode_loss(h, weight, bias, target=target), (bias,)
    )


def test_corrupt_reparameterize_and_bernoulli_kl_vjps_match_their_backward():
    for noise in [n for n in NOISES.values() if n is not None]:
        _assert_vjp_matches_backward(lambda x, noise=noise: ops.corrupt(x, noise), (_rand(6, 5),))
    mu, logvar = _rand(6, 3, low=-1), _rand(6, 3, low=-1)
    _assert_vjp_matches_backward(lambda m, v: ops.reparameterize(m, v, seed=4), (mu, logvar))
    rho_hat = _rand(7, low=0.01, high=0.99)
    rho_hat[0] = 0.0  # clamped: a zero gradient on both routes
    _assert_vjp_matches_backward(lambda r: ops.bernoulli_kl(r, 0.1), (rho_hat,))


def test_jacrev_through_encode_gives_its_contractive_norm():
    """The brute-force Jacobian of h_i with respect to x_i through encode itself, per sample
    (vmap of jacrev): its mean squared Frobenius norm is encode's analytic ``jac``."""
    x, weight, bias = _rand(6, 5), _rand(4, 5, low=-1), _rand(4, low=-0.5, high=0.5)
    for activation in ("sigmoid", "tanh", "softplus"):

        def code(x_i, activation=activation):
            return ops.encode(x_i[None], weight, bias, activation=activation)[0][0]

        jacobians = vmap(jacrev(code))(x)  # (B, H, d)
        _, _, jac = ops.encode(x, weight, bias, activation=activation)
        torch.testing.assert_close(jacobians.square().sum((1, 2)).mean(), jac, rtol=1e-12, atol=0)


def test_forward_mode_matches_reverse_mode():
    """jvp and jacfwd (torch.func) and dual tensors (torch.autograd.forward_ad) give the
    Jacobian-vector products of the reverse-mode Jacobian."""
    x, weight, bias = _rand(6, 5), _rand(4, 5, low=-1), _rand(4, low=-0.5, high=0.5)
    direction = torch.randn_like(weight)

    def fn(weight):
        h, rho_hat, jac = ops.encode(x, weight, bias, noise=NOISES["masking"])
        per_sample = ops.decode_loss(h, weight.t(), bias=None, target=x)
        return per_sample.sum() + ops.bernoulli_kl(rho_hat, 0.1) + jac

    jacobian = jacrev(fn)(weight)
    want = (jacobian * direction).sum()
    value, tangent = jvp(fn, (weight,), (direction,))
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacfwd(fn)(weight), jacobian, rtol=1e-10, atol=1e-12)
    with forward_ad.dual_level():
        dual = fn(forward_ad.make_dual(weight, direction))
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, want)
    torch.testing.assert_close(value, fn(weight), rtol=0, atol=0)
    mu, logvar = _rand(6, 3, low=-1), _rand(6, 3, low=-1)
    _, z_tangent = jvp(lambda m: ops.reparameterize(m, logvar, seed=2)[0], (mu,), (mu,))
    torch.testing.assert_close(z_tangent, mu)  # dz/dmu is the identity


def test_dual_tensors_of_leaves_that_require_grad():
    """Forward-mode AD (torch.autograd.forward_ad) through a parameter that also requires a
    gradient, as a module's weight does: the tangent is jvp's."""
    x = torch.rand(5, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    direction = torch.randn_like(weight)
    _, want = jvp(lambda w: ops.encode(x, w)[0], (weight.detach(),), (direction,))
    with forward_ad.dual_level():
        h = ops.encode(x, forward_ad.make_dual(weight, direction))[0]
        got = forward_ad.unpack_dual(h).tangent
    torch.testing.assert_close(got, want)


def test_hessian_matches_double_backward():
    """Second order through torch.func equals double backward through the ops' formulas."""
    x, weight, bias = _rand(6, 5), _rand(4, 5, low=-1), _rand(4, low=-0.5, high=0.5)

    def fn(bias):
        h, rho_hat, jac = ops.encode(x, weight, bias, activation="tanh")
        per_sample = ops.decode_loss(h, weight.t(), target=x, output="identity", loss="mse")
        return per_sample.sum() + rho_hat.square().sum() + jac

    leaf = bias.clone().requires_grad_()
    (first,) = torch.autograd.grad(fn(leaf), leaf, create_graph=True)
    rows = [torch.autograd.grad(first[j], leaf, retain_graph=True)[0] for j in range(4)]
    torch.testing.assert_close(hessian(fn)(bias), torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_of_a_model():
    """vmap of grad over a model's loss (functional_call) gives each sample's gradient, as a
    loop of single-sample backward passes does."""
    model = fastae.Autoencoder(
        5, 4, noise=MaskingNoise(0.2, seed=3), sparsity=fastae.KLSparsity(0.1, 0.1),
        contractive=0.1, check_targets=False,
    ).double()  # fmt: skip
    x = _rand(6, 5)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x_i):
        return functional_call(model, params, (x_i[None],)).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i : i + 1]).loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)


def test_vmap_of_a_target_check_says_what_to_do():
    model = fastae.Autoencoder(5, 4).double()
    with pytest.raises(RuntimeError, match="check_targets=False"):
        vmap(lambda x_i: model(x_i[None]).loss)(_rand(3, 5))
    with pytest.raises(ValueError, match="^x must lie in"):  # grad can read values
        grad(lambda x: model(x).loss)(_rand(3, 5, high=2.0))


def test_the_triton_backend_is_refused_under_torch_func(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the triton backend could run
    x, weight = _rand(3, 5), _rand(4, 5)
    refused = pytest.raises(RuntimeError, match="'triton' was requested for encode, but under")
    with fastae.use_backend("triton"), refused:
        grad(lambda w: ops.encode(x, w)[0].sum())(weight)
    # auto takes the reference math there, on any device
    grad(lambda w: ops.encode(x, w)[0].sum())(weight)


def test_reconstruction_under_torch_func_carries_no_gradient():
    h, weight, target = _rand(6, 4), _rand(5, 4, low=-1), _rand(6, 5)

    def fn(h):
        return ops.decode_loss(h, weight, target=target, return_reconstruction=True)

    (per_sample, x_hat), pullback = vjp(fn, h)
    want_loss, want_x_hat = fn(h)
    torch.testing.assert_close(per_sample, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(x_hat, want_x_hat, rtol=0, atol=0)
    (grad_h,) = pullback((torch.zeros_like(per_sample), torch.ones_like(x_hat)))
    assert torch.count_nonzero(grad_h) == 0


@pytest.mark.cuda
def test_cuda_tensors_take_the_reference_math():
    """On CUDA the Philox streams run in torch ops, which functorch wraps: values equal the
    reference backend's and derivatives its backward; the kernels' values agree to fp64
    rounding."""
    cuda = torch.device("cuda")
    x, weight = _rand(6, 5).to(cuda), _rand(4, 5, low=-1).to(cuda)
    mu, logvar = _rand(6, 3, low=-1).to(cuda), _rand(6, 3, low=-1).to(cuda)
    with fastae.use_backend("reference"):
        for noise in ("masking", "gaussian", "salt_pepper"):
            _assert_vjp_matches_backward(
                lambda x, w, noise=noise: ops.encode(x, w, noise=NOISES[noise]), (x, weight)
            )
        _assert_vjp_matches_backward(lambda m, v: ops.reparameterize(m, v, seed=4), (mu, logvar))
    h_func = vjp(lambda w: ops.encode(x, w, noise=NOISES["masking"])[0], weight)[0]
    torch.testing.assert_close(h_func, ops.encode(x, weight, noise=NOISES["masking"])[0])


def test_per_sample_gradients_of_a_vae_draw_one_seed():
    """A VAE draws its Philox seed from torch's generator: vmap with randomness='same' draws
    one for all samples (each sample's gradient is then a loop's, drawn from the same
    generator state); 'different' would need a seed per sample and says so."""
    model = fastae.VAE(5, 4, 2, check_targets=False).double()
    x = _rand(4, 5)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x_i):
        return functional_call(model, params, (x_i[None],)).loss

    torch.manual_seed(7)
    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="same")(params, x)
    for i in range(x.shape[0]):
        torch.manual_seed(7)
        model.zero_grad()
        model(x[i : i + 1]).loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="randomness='same'"):
        vmap(grad(loss), in_dims=(None, 0), randomness="different")(params, x)


def _batched_matches_a_loop(outputs, inputs, cotangents):
    """autograd's own vmap over cotangents (is_grads_batched) against one backward each."""
    batched = torch.autograd.grad(
        outputs, inputs, cotangents, retain_graph=True, is_grads_batched=True
    )
    for i in range(cotangents[0].shape[0]):
        one = torch.autograd.grad(
            outputs, inputs, tuple(c[i] for c in cotangents), retain_graph=True
        )
        for got, want in zip(batched, one, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_batched_by_autograd_take_any_backend(backend, kernel_device):
    """torch.autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run the
    backward under autograd's own vmap, whose batched gradients the kernels cannot read:
    the triton backend's backward takes the reference math for them."""
    if backend == "triton":
        pytest.importorskip("triton")
    # factories make the tensors and models where the backend runs
    with torch.device(kernel_device if backend == "triton" else "cpu"):
        x, weight, bias = _rand(3, 5), _rand(4, 5, low=-1), _rand(4, low=-1)
        weight.requires_grad_(), bias.requires_grad_()
        mu, logvar = _rand(3, 2, low=-1).requires_grad_(), _rand(3, 2, low=-1).requires_grad_()
        with fastae.use_backend(backend):
            h, rho_hat, jac = ops.encode(x, weight, bias, noise=MaskingNoise(0.3, seed=1))
            _batched_matches_a_loop((h, rho_hat, jac), (weight, bias), (
                torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64),
                torch.randn(2, dtype=torch.float64),
            ))  # fmt: skip
            per_sample = ops.decode_loss(h, weight.t(), None, target=x)
            _batched_matches_a_loop((per_sample,), (weight, bias), (torch.eye(3, dtype=x.dtype),))
            z, kl = ops.reparameterize(mu, logvar, seed=5)
            _batched_matches_a_loop((z, kl), (mu, logvar), (
                torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64),
            ))  # fmt: skip
            for model in (
                fastae.Autoencoder(5, 4, contractive=0.1, sparsity=fastae.KLSparsity(0.1, 0.1)),
                fastae.DeepAutoencoder(5, (4, 3)),
                fastae.VAE(5, 4, 2),
            ):
                model = model.double()
                params = tuple(model.parameters())
                out = model(x)
                _batched_matches_a_loop((out.per_sample,), params, (torch.eye(3, dtype=x.dtype),))
            jacobian = torch.autograd.functional.jacobian(
                lambda w: ops.encode(x, w, bias.detach())[2], weight.detach(), vectorize=True
            )
    assert jacobian.shape == weight.shape
