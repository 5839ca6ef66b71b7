"""The VAE: ``fastae.ops.reparameterize`` (reference, Triton kernel, autograd, registration)
and ``fastae.VAE`` (shapes, determinism, training on digits, quality of its samples)."""

import importlib.util
import io
import math
import zlib

import numpy as np
import pytest
import torch
from guard_bands import guarded_input, guarded_outputs
from precision import assert_within_twice_torchs_error

import fastae
from fastae import ops, philox, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from fastae.kernels import common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])


@pytest.fixture(autouse=True)
def _seed_inputs(request, monkeypatch):
    """Fresh random inputs per test, reproducible from the test's id; poisoned kernel outputs
    (an element a kernel forgets to write shows up as NaN); one intra-op thread (the tensors
    are small)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    if HAS_TRITON:
        monkeypatch.setattr(common, "poison_outputs", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kernels():
    pytest.importorskip("triton")
    from fastae.kernels import vae

    return vae


def _posterior(batch, latent, dtype=torch.float32, device=DEVICE, grad=False):
    mu = torch.randn(batch, latent, dtype=torch.float64).to(dtype).to(device)
    logvar = (torch.randn(batch, latent, dtype=torch.float64) * 0.8).to(dtype).to(device)
    return mu.requires_grad_(grad), logvar.requires_grad_(grad)


def _naive(mu, logvar, eps):
    """The eager expression (autograd differentiates it)."""
    z = mu + torch.exp(logvar / 2) * eps
    kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)
    return z, kl


# one element; odd sizes inside one tile; several row tiles and column chunks (the
# interpreter's blocks are 16 x 32), with padding in both
SHAPES = [(1, 1), (7, 13), (37, 70)]
SEEDS = [0, 2**45 + 3]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_eps_is_the_philox_stream(seed):
    """eps = tl.randn(seed, row * k + col): Box-Muller of Philox words 0 and 1."""
    mu = torch.zeros(6, 11)
    z, kl = reference.reparameterize_forward(mu, torch.zeros_like(mu), seed)
    offsets = philox.element_offsets(6, 11, mu.device)
    torch.testing.assert_close(z, philox.randn(seed, offsets), rtol=0, atol=2e-6)
    assert torch.equal(kl, torch.zeros(6))
    other, _ = reference.reparameterize_forward(mu, torch.zeros_like(mu), seed + 1)
    assert not torch.equal(z, other)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_the_eager_expression(dtype):
    mu, logvar = _posterior(9, 6, dtype, device="cpu")
    z, kl = reference.reparameterize_forward(mu, logvar, 77)
    eps = reference.standard_normal(77, 9, 6, mu.device).to(dtype)
    want_z, want_kl = _naive(mu, logvar, eps)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(z, want_z, **tol)
    torch.testing.assert_close(kl, want_kl.to(kl.dtype), **tol)
    assert z.dtype == dtype and kl.dtype == reference.stat_dtype(dtype)


def test_reference_backward_matches_autograd():
    mu, logvar = _posterior(8, 5, torch.float64, device="cpu", grad=True)
    eps = reference.standard_normal(5, 8, 5, mu.device).double()
    z, kl = _naive(mu, logvar, eps)
    grad_z, grad_kl = torch.randn_like(z), torch.randn_like(kl)
    want = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl), retain_graph=True)
    got = reference.reparameterize_backward(grad_z, grad_kl, mu.detach(), logvar.detach(), 5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    only_kl = reference.reparameterize_backward(None, grad_kl, mu.detach(), logvar.detach(), 5)
    want_kl = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    for g, w in zip(only_kl, want_kl, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("shape, seed", [(s, seed) for s in SHAPES for seed in SEEDS])
def test_kernel_eps_equals_reference(shape, seed):
    """mu = logvar = 0 gives z = eps: bit for bit under the interpreter (same numpy float32
    Box-Muller), to libm rounding on a GPU."""
    vae = _kernels()
    mu = torch.zeros(shape, device=DEVICE)
    z, kl = vae.reparameterize_forward(mu, torch.zeros_like(mu), seed)
    want, _ = reference.reparameterize_forward(mu, torch.zeros_like(mu), seed)
    if INTERPRETED:
        assert torch.equal(z, want)
    else:
        torch.testing.assert_close(z, want, rtol=0, atol=4e-6)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize(
    "shape, dtype",
    [(shape, torch.float32) for shape in SHAPES]
    + [((7, 13), torch.float64), ((7, 13), torch.bfloat16)],
)
def test_kernel_forward_matches_reference(shape, dtype):
    vae = _kernels()
    mu, logvar = _posterior(*shape, dtype)
    z, kl = vae.reparameterize_forward(mu, logvar, 2024)
    want_z, want_kl = reference.reparameterize_forward(mu, logvar, 2024)
    assert z.dtype == dtype and kl.dtype == reference.stat_dtype(dtype) and z.is_contiguous()
    # eps equal bit for bit under the interpreter; to libm rounding (float32) on a GPU
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    tol = tol if INTERPRETED else max(tol, 2e-5)
    torch.testing.assert_close(z, want_z, rtol=tol, atol=tol)
    kl_tol = 1e-12 if dtype == torch.float64 else 1e-5  # no eps in the KL
    torch.testing.assert_close(kl, want_kl, rtol=kl_tol, atol=kl_tol)


def test_kernel_strided_inputs():
    """mu and logvar as column halves of one (B, 2k) tensor, and a transposed layout."""
    vae = _kernels()
    stats = torch.randn(9, 2 * 21, device=DEVICE)
    mu, logvar = stats[:, :21], stats[:, 21:]
    assert not mu.is_contiguous()
    got = vae.reparameterize_forward(mu, logvar, 3)
    want = vae.reparameterize_forward(mu.contiguous(), logvar.contiguous(), 3)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    transposed = logvar.t().contiguous().t()
    got = vae.reparameterize_forward(mu, transposed, 3)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    grad_z = torch.randn(21, 9, device=DEVICE).t()
    grad_kl = torch.randn(1, device=DEVICE).expand(9)  # stride 0, as from .sum()
    got = vae.reparameterize_backward(grad_z, grad_kl, mu, transposed, 3)
    want = vae.reparameterize_backward(
        grad_z.contiguous(), grad_kl.contiguous(), mu.contiguous(), logvar.contiguous(), 3
    )
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_kernel_wide_column_variant(monkeypatch):
    """The int64 column-index variant (chosen for strided inputs whose column offsets reach
    2^31) on small transposed views: with the threshold at 1 it is taken."""
    vae = _kernels()
    monkeypatch.setattr(common, "INDEX_LIMIT", 1)
    mu, logvar = _posterior(9, 21)
    views = [t.t().contiguous().t() for t in (mu, logvar, torch.randn_like(mu))]
    assert all(common.wide_columns(t) for t in views)
    got = vae.reparameterize_forward(*views[:2], 3)
    want = vae.reparameterize_forward(mu, logvar, 3)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    grad_kl = torch.randn(9, device=DEVICE)
    got = vae.reparameterize_backward(views[2], grad_kl, *views[:2], 3)
    want = vae.reparameterize_backward(views[2].contiguous(), grad_kl, mu, logvar, 3)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("which", ["both", "z", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_backward_matches_reference(which, dtype):
    vae = _kernels()
    mu, logvar = _posterior(19, 37, dtype)
    grad_z = torch.randn_like(mu) if which != "kl" else None
    grad_kl = torch.randn(19, device=DEVICE, dtype=reference.stat_dtype(dtype))
    grad_kl = grad_kl if which != "z" else None
    got = vae.reparameterize_backward(grad_z, grad_kl, mu, logvar, 2**40 + 9)
    want = reference.reparameterize_backward(grad_z, grad_kl, mu, logvar, 2**40 + 9)
    # float64 to rounding where eps is the reference's bit for bit (the interpreter); on a GPU
    # eps differs by libm's float32 rounding
    tol = 1e-12 if dtype == torch.float64 and INTERPRETED else 1e-5
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.is_contiguous()
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("which", ["kernel", "reference"])
def test_exp_minus_one_is_accurate_near_zero(which):
    """KL of a posterior close to the prior: exp(logvar) - 1 - logvar without cancellation."""
    mu = torch.full((2, 16), 1e-4, device=DEVICE, dtype=torch.float32)
    logvar = torch.full((2, 16), 3e-4, device=DEVICE, dtype=torch.float32)
    if which == "kernel":
        _, kl = _kernels().reparameterize_forward(mu, logvar, 0)
    else:
        kl = reference.gaussian_kl(mu, logvar)
    exact = 0.5 * 16 * (1e-8 + math.expm1(3e-4) - 3e-4)
    torch.testing.assert_close(kl, torch.full_like(kl, exact), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize(
    "backend_name, outputs",
    [("reference", "both"), ("reference", "z"), ("reference", "kl")]
    + [("triton", "both")] * HAS_TRITON,
)
def test_gradcheck(backend_name, outputs):
    mu, logvar = _posterior(2, 3, torch.float64, grad=True)

    def fn(mu, logvar):
        z, kl = ops.reparameterize(mu, logvar, seed=41)
        return {"both": (z, kl), "z": z, "kl": kl}[outputs]

    with fastae.use_backend(backend_name):
        assert torch.autograd.gradcheck(fn, (mu, logvar))


@pytest.mark.parametrize("wrt", ["mu", "logvar"])
@pytest.mark.parametrize("backend_name", ["reference"] + ["triton"] * HAS_TRITON)
def test_gradcheck_with_one_input_trained(backend_name, wrt):
    """Only mu (a fixed logvar) or only logvar requires a gradient: each gets its own, the
    backward reading each input's flag (mu and logvar of a model always share theirs)."""
    mu, logvar = _posterior(2, 3, torch.float64)
    {"mu": mu, "logvar": logvar}[wrt].requires_grad_()

    def fn(mu, logvar):
        return ops.reparameterize(mu, logvar, seed=41)

    with fastae.use_backend(backend_name):
        assert torch.autograd.gradcheck(fn, (mu, logvar))


@pytest.mark.parametrize(
    "backend_name, dtype",
    [("reference", torch.float64)] + [("triton", torch.float32)] * HAS_TRITON,
)
def test_opcheck(backend_name, dtype):
    mu, logvar = _posterior(4, 6, dtype, grad=True)
    seed = torch.tensor(2**33 + 5, dtype=torch.int64)
    op = torch.ops.fastae.reparameterize.default
    torch.library.opcheck(op, (mu, logvar, seed, backend_name))
    grad_z = torch.randn(4, 6, dtype=dtype, device=DEVICE)
    grad_kl = torch.randn(4, dtype=reference.stat_dtype(dtype), device=DEVICE)
    backward = torch.ops.fastae.reparameterize_backward.default
    for gz, gkl in [(grad_z, grad_kl), (None, grad_kl), (grad_z, None)]:
        torch.library.opcheck(backward, (gz, gkl, mu.detach(), logvar.detach(), seed, backend_name))


def test_op_matches_eager_autograd():
    """z, kl and both input gradients of the op equal the eager expression's."""
    mu, logvar = _posterior(6, 9, torch.float64, device="cpu", grad=True)
    z, kl = ops.reparameterize(mu, logvar, seed=8)
    eps = reference.standard_normal(8, 6, 9, mu.device).double()
    want_z, want_kl = _naive(mu, logvar, eps)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(kl, want_kl)
    loss = (z.sin().sum() + kl.square().sum(), want_z.sin().sum() + want_kl.square().sum())
    got = torch.autograd.grad(loss[0], (mu, logvar))
    want = torch.autograd.grad(loss[1], (mu, logvar))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_kl_matches_monte_carlo_estimate():
    """KL(q || p) = E_q[log q(z) - log p(z)], estimated from 40000 draws per sample; each
    estimate lies within 5 standard errors. Also checks eps is standard normal."""
    draws = 40_000
    mu = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.7, 0.3], [-0.2, 2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 0.0], [-1.2, 0.4, 0.9], [1.1, -2.0, -0.3]])
    rows = mu.shape[0]
    mu_rep, logvar_rep = mu.repeat(draws, 1).to(DEVICE), logvar.repeat(draws, 1).to(DEVICE)
    z, kl = ops.reparameterize(mu_rep, logvar_rep, seed=123)
    z, kl, mu_rep, logvar_rep = (t.double().cpu() for t in (z, kl, mu_rep, logvar_rep))
    log_q = -0.5 * (logvar_rep + (z - mu_rep).square() / logvar_rep.exp()).sum(1)
    log_p = -0.5 * z.square().sum(1)
    sample = (log_q - log_p).view(draws, rows)
    estimate, stderr = sample.mean(0), sample.std(0) / math.sqrt(draws)
    exact = kl[:rows]
    assert torch.equal(kl.view(draws, rows), exact.expand(draws, rows))
    assert exact[0].item() == 0.0
    assert ((estimate - exact).abs() <= 5 * stderr).all(), (estimate, exact, stderr)


def test_unseeded_draws_follow_torch_manual_seed():
    mu, logvar = _posterior(4, 3)
    torch.manual_seed(5)
    first = ops.reparameterize(mu, logvar)[0]
    second = ops.reparameterize(mu, logvar)[0]
    torch.manual_seed(5)
    again = ops.reparameterize(mu, logvar)[0]
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_backward_regenerates_eps_instead_of_storing_it():
    mu, logvar = _posterior(8, 6, torch.float64, grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.reparameterize(mu, logvar, seed=1)
    assert {t.data_ptr() for t in saved} == {mu.data_ptr(), logvar.data_ptr()}


def test_meta_inputs_give_meta_outputs():
    mu = torch.empty(5, 3, device="meta")
    z, kl = ops.reparameterize(mu, torch.empty(5, 3, device="meta"), seed=0)
    assert z.is_meta and z.shape == (5, 3) and kl.shape == (5,) and kl.dtype == torch.float32


@pytest.mark.parametrize(
    "mu, logvar, kwargs, error, match",
    [
        ([[0.0]], torch.zeros(1, 1), {}, TypeError, "mu must be a torch.Tensor"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64), {}, TypeError, "logvar"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), {}, TypeError, "logvar"),
        (torch.zeros(3), torch.zeros(3), {}, ValueError, "mu must be 2-D"),
        (torch.zeros(2, 3), torch.zeros(2, 4), {}, ValueError, "logvar must have the shape"),
        (torch.zeros(2, 3), torch.zeros(3, 2), {}, ValueError, "logvar must have the shape"),
        (torch.zeros(0, 3), torch.zeros(0, 3), {}, ValueError, "at least one row"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"seed": -1}, ValueError, "seed"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"seed": 2**63}, ValueError, "seed"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"seed": 1.5}, TypeError, "seed"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"seed": True}, TypeError, "seed"),
    ],
)
def test_bad_arguments(mu, logvar, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.reparameterize(mu, logvar, **kwargs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed, error", [(-5, ValueError), ("abc", TypeError)])
def test_forward_checks_its_seed_in_either_mode(training, seed, error):
    model = fastae.VAE(5, 4, 2).train(training)
    with pytest.raises(error, match="seed"):
        model(torch.rand(3, 5), seed=seed)


def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logvar must be on the device of mu"):
        ops.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"))


# ----------------------------------------------------------------------------- the module


def test_forward_terms():
    model = fastae.VAE(10, 7, 3, beta=0.5)
    x = torch.rand(6, 10)
    out = model(x, seed=4)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (6, 3)
    for per_sample in (out.elbo, out.reconstruction, out.kl, out.per_sample):
        assert per_sample.shape == (6,) and torch.isfinite(per_sample).all()
    torch.testing.assert_close(out.loss, (out.reconstruction + 0.5 * out.kl).mean())
    torch.testing.assert_close(out.elbo, -(out.reconstruction + out.kl))
    torch.testing.assert_close(out.per_sample, -out.elbo)
    z, kl = ops.reparameterize(out.mu, out.logvar, seed=4)
    assert torch.equal(out.z, z) and torch.equal(out.kl, kl)
    assert out.code is out.mu
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _oracle_per_sample(model, x, z=None):
    """(reconstruction, kl) per sample of a float64 VAE, spelt out in plain torch: ReLU
    layers, BCE with logits summed over pixels, the closed-form Gaussian KL; z = mu unless
    given."""
    relu = torch.nn.functional.relu
    h = x
    for layer in [model.encoder, *model.encoder_stack]:
        h = relu(h @ layer.weight.T + layer.bias)
    posterior = h @ model.posterior.weight.T + model.posterior.bias
    mu, logvar = posterior[:, : model.latent], posterior[:, model.latent :]
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
    g = mu if z is None else z
    for layer in [model.decoder_hidden, *model.decoder_stack]:
        g = relu(g @ layer.weight.T + layer.bias)
    logits = g @ model.decoder.weight.T + model.decoder.bias
    reconstruction = (torch.nn.functional.softplus(logits) - x * logits).sum(1)
    return reconstruction, kl


def test_eval_mode_gradients_match_a_float64_oracle():
    """Gradients of the eval-mode negative ELBO (z = mu; an anomaly score's saliency), into
    the input and every layer, are autograd's through the plain-torch oracle."""
    torch.manual_seed(0)
    model = fastae.VAE(10, 7, 3).double().eval()
    x = torch.rand(6, 10, dtype=torch.float64, requires_grad=True)
    inputs = [x, *model.parameters()]
    got = torch.autograd.grad(model(x).per_sample.sum(), inputs)
    reconstruction, kl = _oracle_per_sample(model, x)
    want = torch.autograd.grad((reconstruction + kl).sum(), inputs)
    for name, grad, expected in zip(["x", *dict(model.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(grad, expected, msg=name)


def test_deep_vae_matches_a_float64_oracle():
    model = fastae.VAE(10, (8, 7, 5), 3, beta=0.5).double()
    assert model.hidden == model.hidden_sizes == (8, 7, 5)
    assert [layer.weight.shape for layer in model.decoder_stack] == [(7, 5), (8, 7)]
    assert "10 -> 8 -> 7 -> 5 -> 3" in repr(model)
    x = torch.rand(6, 10, dtype=torch.float64)
    out = model(x, seed=4)
    z, kl = ops.reparameterize(out.mu, out.logvar, seed=4)
    assert torch.equal(out.z, z)
    reconstruction, kl = _oracle_per_sample(model, x, z.detach())
    torch.testing.assert_close(out.reconstruction, reconstruction)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.loss, (reconstruction + 0.5 * kl).mean())
    # gradients of every layer: the fused ops' backward against autograd's through the oracle
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    mu, logvar = model.posterior_parameters(x)
    eps = (z - mu) / (logvar / 2).exp()  # the draw, recovered
    reconstruction, kl = _oracle_per_sample(model, x, (mu + (logvar / 2).exp() * eps.detach()))
    want = torch.autograd.grad((reconstruction + 0.5 * kl).mean(), list(model.parameters()))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)
    model.eval()
    reconstruction, kl = _oracle_per_sample(model, x)
    torch.testing.assert_close(model.negative_elbo(x), reconstruction + kl)
    torch.testing.assert_close(model.reconstruction_error(x), reconstruction)
    assert model.sample(4).shape == (4, 10) and model.decode(torch.zeros(2, 3).double()).shape


def _log_likelihood_by_quadrature(model, x):
    """Oracle: log p(x) = log integral p(x | z) N(z; 0, 1) dz for one latent dimension, by the
    trapezoid rule on [-12, 12] in float64 (the integrand's tails past 12 are below e^-72)."""
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    h = torch.relu(grid[:, None] * model.decoder_hidden.weight.T + model.decoder_hidden.bias)
    logits = h @ model.decoder.weight.T + model.decoder.bias  # (G, d)
    if model.loss_name == "bce":
        log_p_x = -(torch.nn.functional.softplus(logits)[:, None] - logits[:, None] * x).sum(
            2
        )  # (G, B)
    else:
        d = x.shape[1]
        log_p_x = -(logits[:, None] - x).square().sum(2) - 0.5 * d * math.log(math.pi)
    log_prior = -0.5 * grid.square() - 0.5 * math.log(2 * math.pi)
    log_terms = log_p_x + log_prior[:, None]
    step = float(grid[1] - grid[0])
    return torch.logsumexp(log_terms, 0) + math.log(step)  # ends' half weights: negligible


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_log_likelihood_approaches_a_quadrature_oracle(loss):
    """Importance weighting: the K = 100,000 estimate is within 0.01 nats of log p(x) (its
    standard deviation over seeds: at most 0.0016 nats here); single draws average below it
    (the ELBO, a bound), and K = 10 lies in between."""
    output = "sigmoid" if loss == "bce" else "identity"
    torch.manual_seed(0)
    model = fastae.VAE(6, 8, 1, output=output, loss=loss).double()
    x = (torch.rand(40, 1, dtype=torch.float64) > torch.linspace(0.2, 0.8, 6)).double()
    fastae.fit(model, x, epochs=60, batch_size=40, lr=2e-2, seed=0, progress=False)
    x = x[:5]
    with torch.no_grad():
        exact = _log_likelihood_by_quadrature(model, x)
    generator = torch.Generator().manual_seed(1)
    estimate = model.log_likelihood(x, 100_000, generator=generator)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-2)
    single = torch.stack([model.log_likelihood(x, 1, generator=generator) for _ in range(2000)])
    ten = torch.stack([model.log_likelihood(x, 10, generator=generator) for _ in range(400)])
    margin = 4 * single.std(0) / math.sqrt(2000)
    assert (single.mean(0) < exact + margin).all()
    assert (single.mean(0) <= ten.mean(0) + margin).all() and (ten.mean(0) < exact + margin).all()
    # a seeded generator repeats the estimate (its draws in several passes)
    again = model.log_likelihood(x, 100_000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, estimate, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_log_likelihood_weights_in_float32(dtype):
    """A half-precision model decodes its draws of z rounded to its dtype; each importance
    weight is then log p(x | z) + log N(z; 0, I) - log q(z | x) at that z, summed in float32:
    against the same weights in float64 (torch.distributions' densities) for the same draws.
    (In the model's dtype a bfloat16 log-ratio of -100 is rounded to 0.5 nats.)"""
    torch.manual_seed(0)
    d, latent, rows, samples = 20, 32, 4, 50
    model = fastae.VAE(d, 16, latent)
    with torch.no_grad():  # a narrow posterior (sigma 0.05) away from 0: z rounds coarsely
        model.posterior.weight.mul_(0.1)
        model.posterior.bias[:latent], model.posterior.bias[latent:] = 1.5, -6.0
    model.to(dtype)
    x = (torch.rand(rows, d) > 0.5).to(dtype)
    got = model.log_likelihood(x, samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, logvar = (t.float() for t in model.posterior_parameters(x))
        eps = torch.randn(samples, rows, latent, generator=torch.Generator().manual_seed(0))
        z = (mu + torch.exp(0.5 * logvar) * eps).to(dtype)
        log_p_x = -model._reconstruction(z.flatten(0, 1), x.repeat(samples, 1)).double()
        z, mu, sigma = z.double(), mu.double(), torch.exp(0.5 * logvar.double())
        normal = torch.distributions.Normal
        log_prior = normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(2)
        log_q = normal(mu, sigma).log_prob(z).sum(2)
        weights = log_p_x.view(samples, rows) + log_prior - log_q
        expected = torch.logsumexp(weights, 0) - math.log(samples)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_log_likelihood_arguments():
    model = fastae.VAE(6, 8, 2)
    x = torch.rand(3, 6)
    for samples, error in [(0, ValueError), (1.5, ValueError), (True, ValueError)]:
        with pytest.raises(error, match="samples"):
            model.log_likelihood(x, samples)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.log_likelihood(x + 1.0)
    assert model.log_likelihood(x).shape == (3,) and model.log_likelihood(x).dtype == x.dtype


def test_one_hidden_width_keeps_the_one_layer_model():
    names = [
        "encoder.weight", "encoder.bias", "posterior.weight", "posterior.bias",
        "decoder_hidden.weight", "decoder_hidden.bias", "decoder.weight", "decoder.bias",
    ]  # fmt: skip
    for hidden in (7, (7,), np.int64(7)):
        model = fastae.VAE(10, hidden, 3)
        assert list(model.state_dict()) == names and model.hidden_sizes == (7,)
    assert fastae.VAE(10, 7, 3).hidden == 7 and fastae.VAE(10, (7,), 3).hidden == (7,)
    assert len(fastae.VAE(10, (7, 6), 3).state_dict()) == len(names) + 4


def test_training_draws_and_inference_is_deterministic():
    model = fastae.VAE(12, 8, 4, loss="mse", output="identity")
    x = torch.randn(9, 12)
    assert torch.equal(model(x, seed=1).z, model(x, seed=1).z)
    assert not torch.equal(model(x).z, model(x).z)
    model.eval()
    first, second = model(x), model(x)
    assert torch.equal(first.z, first.mu) and torch.equal(first.loss, second.loss)
    assert torch.equal(model.encode(x), first.mu)
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))
    torch.testing.assert_close(model.negative_elbo(x), first.per_sample)
    torch.testing.assert_close(model.reconstruction_error(x), first.reconstruction)
    # the same input scores the same wherever it sits, whatever else is in the batch
    score = model.anomaly_score(x)
    alone = torch.cat([model.anomaly_score(x[i : i + 1]) for i in range(9)])
    shuffled = model.anomaly_score(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, score, rtol=1e-5, atol=1e-5)
    recon = model.anomaly_score(x, kind="reconstruction")
    assert (score >= recon).all()  # the KL term is nonnegative


def test_sample_and_decode():
    model = fastae.VAE(16, 8, 2)
    samples = model.sample(7, generator=torch.Generator().manual_seed(3))
    again = model.sample(7, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (7, 16) and torch.equal(samples, again)
    assert ((samples >= 0) & (samples <= 1)).all() and not samples.requires_grad
    assert model.decode(torch.zeros(3, 2)).shape == (3, 16)
    # the prior's draws, z ~ N(0, I) from the generator, decoded as they are (a scaled or
    # shifted z gives other pixels, by about 0.09 here)
    z = torch.randn(7, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(samples, model.decode(z))


@pytest.mark.cuda
def test_a_cpu_generator_samples_alike_on_any_device():
    """sample draws z on the generator's device: a CUDA model with a CPU generator decodes the
    CPU model's draws."""
    model = fastae.VAE(16, 8, 2)
    on_cpu = model.sample(5, generator=torch.Generator().manual_seed(3))
    on_gpu = model.cuda().sample(5, generator=torch.Generator().manual_seed(3))
    assert on_gpu.device.type == "cuda"
    # the same z (other draws differ by tenths); the GPU's decoder products may be tf32
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-3)


def test_bce_targets_are_checked_per_call_or_once_by_fit(monkeypatch):
    with pytest.raises(ValueError, match="^x must lie in"):
        fastae.VAE(6, 5, 2)(torch.rand(4, 6) * 3)
    fastae.VAE(6, 5, 2, check_targets=False)(torch.rand(4, 6) * 3)  # unchecked
    checked = []
    check = ops.check_unit_interval

    def counted(name, values, advice=""):
        checked.append(name)
        check(name, values, advice)

    monkeypatch.setattr(fastae.ops, "check_unit_interval", counted)
    monkeypatch.setattr(fastae.training, "check_unit_interval", counted)
    model = fastae.VAE(6, 5, 2)
    fastae.fit(model, torch.rand(40, 6), epochs=2, batch_size=8, progress=False)
    assert checked == ["data"]  # the data once, no batch (a device sync each on GPUs)
    assert model.check_targets
    with pytest.raises(ValueError, match="data must lie in"):
        fastae.fit(model, torch.rand(40, 6) * 3, epochs=1, progress=False)
    # batches: each checked where it arrives (a DataLoader's on the host, before their copy
    # to the device: no sync; in [0, 1] while the model checks its targets, finite always),
    # the model's own check (named x) paused meanwhile
    batches_checked = []
    check_batch = fastae.training._check_batch_values

    def counted_batch(name, x, in_unit_interval, finite):
        assert finite  # (not data-parallel)
        batches_checked.append((name, in_unit_interval))
        check_batch(name, x, in_unit_interval, finite)

    monkeypatch.setattr(fastae.training, "_check_batch_values", counted_batch)
    checked.clear()
    loader = torch.utils.data.DataLoader(torch.rand(40, 6), batch_size=8)
    val = [torch.rand(5, 6), torch.rand(3, 6)]
    fastae.fit(model, loader, epochs=2, validation_data=val, progress=False)
    in_unit = [("data", True)] * 5 + [("validation_data", True)] * 2
    assert checked == [] and batches_checked == in_unit * 2 and model.check_targets

    def stop_checking(epoch, history):
        model.check_targets = False

    batches_checked.clear()
    fastae.fit(model, loader, epochs=2, callback=stop_checking, progress=False)
    assert batches_checked == [("data", True)] * 5 + [("data", False)] * 5
    assert checked == [] and not model.check_targets
    model.check_targets = True
    bad = [torch.rand(8, 6), torch.rand(8, 6) * 3]
    with pytest.raises(ValueError, match=r"^data must lie in \[0, 1\] .*MinMaxScaler"):
        fastae.fit(model, bad, epochs=1, progress=False)
    assert model.check_targets
    # each source as it is: tensor data whole and once, a list of batches batch by batch
    checked.clear()
    batches_checked.clear()
    fastae.fit(
        model, torch.rand(40, 6), epochs=2, batch_size=8, validation_data=val, progress=False
    )
    assert checked == ["data"] and batches_checked == [("validation_data", True)] * 4
    # a subclass's forward may change its input first: its own check judges it
    checked.clear()

    class Scaled(fastae.VAE):
        def forward(self, x, seed=None):
            return super().forward(x / 255, seed)

    scaled = Scaled(6, 5, 2)
    fastae.fit(scaled, torch.rand(40, 6) * 255, epochs=1, batch_size=8, progress=False)
    fastae.fit(scaled, [torch.rand(8, 6) * 255], epochs=1, progress=False)
    assert checked == ["x"] * 6 and scaled.check_targets


def test_a_callback_anneals_beta_between_epochs():
    """fit's callback sets beta for the next epoch: the forward reads it at every step."""
    model = fastae.VAE(8, 6, 2, beta=0.0)
    x = torch.rand(64, 8)

    def anneal(epoch, history):
        model.beta = 1e4 * epoch

    history = fastae.fit(model, x, epochs=2, batch_size=64, seed=0, callback=anneal, progress=False)
    assert model.beta == 2e4
    assert history.loss[1] > 10 * history.loss[0]  # epoch 2 weighs the KL term by 1e4


def test_numpy_integers_are_sizes():
    model = fastae.VAE(np.int64(16), np.int32(8), np.int64(2), beta=np.float32(0.5))
    assert (model.in_features, model.hidden, model.latent) == (16, 8, 2)
    assert all(type(v) is int for v in (model.in_features, model.hidden, model.latent))
    assert model.sample(np.int64(3)).shape == (3, 16)


@pytest.mark.parametrize("hidden", [6, (6, 5)])
def test_module_on_triton_matches_reference(hidden):
    _kernels()
    model = fastae.VAE(9, hidden, 3).double().to(DEVICE)
    x = torch.rand(5, 9, dtype=torch.float64, device=DEVICE)
    results = []
    for name in ("reference", "triton"):
        model.zero_grad()
        with fastae.use_backend(name):
            out = model(x, seed=17)
            out.loss.backward()
            generator = torch.Generator(DEVICE).manual_seed(2)
            log_likelihood = model.log_likelihood(x, 7, generator=generator)
        results.append([out.loss.detach(), log_likelihood, *(p.grad.clone() for p in
                                                             model.parameters())])  # fmt: skip
    tol = 1e-6 if INTERPRETED else 1e-4  # eps equal bit for bit only under the interpreter
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_half_precision(dtype):
    """A VAE step in half precision (d, H and k multiples of 16: the fused kernels): the loss
    and each parameter gradient within 2x of torch's own error at the dtype (the reference
    backend), both against the reference in float64 from the same weights and seed (the
    loss, a sum: see ``precision``)."""
    _kernels()

    def step(model, x, backend):
        model.zero_grad()
        with fastae.use_backend(backend):
            loss = model(x, seed=17).loss
            loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    model = fastae.VAE(64, 48, 16).to(DEVICE, dtype)
    x = torch.rand(33, 64, device=DEVICE, dtype=dtype)
    ours, torch_ = step(model, x, "triton"), step(model, x, "reference")
    oracle = step(model.double(), x.double(), "reference")  # the same values, exact
    names = ["loss", *(name for name, _ in model.named_parameters())]
    assert_within_twice_torchs_error(ours, torch_, oracle, dtype, names, sums=["loss"])


HIDDEN = "^hidden must be a positive int or a non-empty sequence"


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 4, 2), {}, ValueError, "in_features"),
        ((8, 4, 0), {}, ValueError, "latent"),
        ((8, 4, 2), {"beta": -1.0}, ValueError, "beta"),
        ((8, 4, 2), {"beta": float("nan")}, ValueError, "beta"),
        ((8, 4, 2), {"beta": 1e39}, ValueError, "beta"),
        ((8, 4, 2), {"check_targets": "no"}, TypeError, "^check_targets must be a bool, got str$"),
        ((8, 4, 2), {"output": "identity"}, ValueError, "bce"),
        ((8, 4, 2), {"activation": "gelu"}, ValueError, "activation"),
        ((8, 0, 2), {}, ValueError, r"^hidden must be a positive int"),
        ((8, (4, 0), 2), {}, ValueError, r"^hidden\[1\] must be a positive int"),
        ((8, (), 2), {}, TypeError, HIDDEN + " of positive ints"),
        ((8, "4", 2), {}, TypeError, HIDDEN),
        ((8, True, 2), {}, TypeError, HIDDEN),
        ((8, 4.0, 2), {}, TypeError, HIDDEN),
        ((8, {8, 4}, 2), {}, TypeError, HIDDEN + r" \(a tuple or li"),
    ],
)
def test_bad_module_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastae.VAE(*args, **kwargs)


@pytest.mark.parametrize(
    "value, error", [(-1.0, ValueError), (float("nan"), ValueError), ("2", TypeError)]
)
def test_beta_set_later_is_checked(value, error):
    """KL annealing sets beta between epochs: a bad value is refused when set, not trained
    on (a negative beta would reward a large KL; NaN would make the loss NaN)."""
    model = fastae.VAE(8, 4, 2)
    model.beta = 0.25
    with pytest.raises(error, match="^beta must be"):
        model.beta = value
    assert model.beta == 0.25


def test_bad_module_inputs():
    model = fastae.VAE(8, 4, 2)
    with pytest.raises(
        ValueError, match=r"x must have size 8 in dim 1 \(the model's in_features\)"
    ):
        model(torch.rand(3, 5))
    with pytest.raises(TypeError, match=r"x must have the dtype of the model's parameters"):
        model.encode(torch.rand(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="z must have 2 columns"):
        model.decode(torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"^z must have the dtype of the model's parameters"):
        model.decode(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be a positive int"):
        model.sample(0)
    with pytest.raises(TypeError, match="^generator must be a torch.Generator or None"):
        model.sample(3, generator=5)
    with pytest.raises(TypeError, match="^generator must be a torch.Generator or None"):
        model.log_likelihood(torch.rand(3, 8), generator=5)
    with pytest.raises(ValueError, match="kind"):
        model.anomaly_score(torch.rand(3, 8), kind="likelihood")


def test_save_image_grid(tmp_path):
    pytest.importorskip("matplotlib")
    from fastae.vae import save_image_grid

    model = fastae.VAE(12, 8, 2)
    path = tmp_path / "samples.png"
    save_image_grid(model.sample(10), path, (3, 4), columns=4, title="samples")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="images must have 12 columns"):
        save_image_grid(torch.zeros(2, 5), path, (3, 4))
    with pytest.raises(ValueError, match="^images must have at least one row"):
        save_image_grid(torch.zeros(0, 12), path, (3, 4))
    with pytest.raises(ValueError, match=r"^image_shape\[0\] must be a positive int"):
        save_image_grid(torch.zeros(2, 4), path, (-2, -2))
    with pytest.raises(TypeError, match="^image_shape must be"):
        save_image_grid(torch.zeros(2, 4), path, 4)
    with pytest.raises(TypeError, match="^path must be a str, os.PathLike or binary file, got No"):
        save_image_grid(torch.zeros(2, 4), None, (2, 2))
    with pytest.raises(TypeError, match="^title must be a str or None, got int$"):
        save_image_grid(torch.zeros(2, 4), path, (2, 2), title=0)
    with pytest.raises(ValueError, match="^images is on the meta device"):
        save_image_grid(torch.zeros(2, 4, device="meta"), path, (2, 2))
    with pytest.raises(ValueError, match="^images holds NaN or inf"):
        save_image_grid(torch.tensor([[0.0, 1.0, float("nan"), 0.5]]), path, (2, 2))
    save_image_grid(torch.zeros(2, 4), str(path), (2, 2))  # a path as a str
    in_memory = io.BytesIO()
    save_image_grid(torch.zeros(2, 4), in_memory, (2, 2))
    assert in_memory.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def trained_on_digits():
    """A VAE trained on the 8x8 digits (reference backend, a few seconds)."""
    pytest.importorskip("sklearn")
    from fastae.data import load_digits

    x, y = load_digits()
    torch.manual_seed(0)
    model = fastae.VAE(64, 128, 4)
    with fastae.use_backend("reference"), torch.no_grad():
        model.eval()
        before = model.negative_elbo(x).mean().item()
        untrained_samples = model.sample(500, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fastae.use_backend("reference"):
            history = fastae.fit(
                model, x, epochs=50, batch_size=512, lr=1e-2, seed=0, progress=False
            )
            with torch.no_grad():
                after = model.negative_elbo(x).mean().item()
    finally:
        torch.set_num_threads(threads)
    return model, x, y, history, before, after, untrained_samples


@pytest.mark.slow
def test_elbo_improves_on_digits(trained_on_digits):
    model, x, _, history, before, after, _ = trained_on_digits
    assert all(math.isfinite(v) for v in history.loss)
    assert history.loss[-1] < history.loss[0] - 5.0, history.loss
    # mean negative ELBO in nats per image: about 44 at initialization, about 24 trained
    assert math.isfinite(after) and after < before - 10.0, (before, after)
    assert after < 26.0  # a collapsed posterior (samples all alike) stays near 27


@pytest.mark.slow
def test_samples_look_like_digits(trained_on_digits):
    """A logistic regression trained on real digits labels the VAE's samples with more
    confidence than structureless images with the same pixel range (uniform noise) or the
    same pixel marginals (each pixel shuffled across images), and as many kinds of digit."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    model, x, y, *_, untrained_samples = trained_on_digits
    real = x.numpy()
    with threadpool_limits(1):  # a small problem: BLAS threads would only contend
        classifier = LogisticRegression(C=0.1, max_iter=3000).fit(real, y.numpy())
    rng = np.random.default_rng(0)

    def confidence(images):
        return classifier.predict_proba(np.asarray(images)).max(1).mean()

    samples = model.sample(500, generator=torch.Generator().manual_seed(1)).numpy()
    uniform = rng.random((500, real.shape[1]))
    shuffled = np.stack([rng.permutation(column) for column in real.T], 1)
    baseline = max(confidence(uniform), confidence(shuffled), confidence(untrained_samples))
    got = confidence(samples)
    assert got > 0.1 + 0.25 and got > baseline + 0.05, (got, baseline)
    labels = classifier.predict(samples)
    assert len(np.unique(labels)) >= 8, np.bincount(labels, minlength=10)


def test_sample_and_log_likelihood_draw_on_the_generators_device():
    """A model elsewhere (meta here, CUDA in use) draws z from a CPU generator on the CPU:
    the generator advances as it does for a CPU model, and the draws reach the model."""
    cpu = fastae.VAE(6, 5, 2, check_targets=False)
    meta = fastae.VAE(6, 5, 2, check_targets=False).to("meta")
    x = torch.rand(3, 6)
    for call in (
        lambda m, g: m.sample(4, generator=g),
        lambda m, g: m.log_likelihood(x.to(m.encoder.weight.device), 7, generator=g),
    ):
        g_cpu, g_meta = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        call(cpu, g_cpu)
        out = call(meta, g_meta)
        assert out.is_meta
        assert torch.equal(g_meta.get_state(), g_cpu.get_state())


def test_log_likelihood_decodes_in_several_passes_when_rows_fill_one(monkeypatch):
    """A batch of more rows than a pass holds is decoded whole, one draw a pass."""
    model = fastae.VAE(6, 5, 2)
    x = torch.rand(5, 6)
    monkeypatch.setattr(fastae.vae, "LOG_LIKELIHOOD_ROWS", 2)
    got = model.log_likelihood(x, 3, generator=torch.Generator().manual_seed(0))
    assert got.shape == (5,) and torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_log_likelihood_of_a_collapsed_posterior_is_finite(dtype):
    """sigma = exp(logvar / 2) underflows to 0 in float32 (logvar = -300): z = mu, rounded to
    the dtype, is not mu, and (z - mu) / sigma would be infinite; the draw eps is kept."""
    torch.manual_seed(0)
    model = fastae.VAE(8, 6, 3)
    with torch.no_grad():
        model.posterior.weight.zero_()
        model.posterior.bias[:3] = torch.tensor([0.1, 0.3, 0.7])  # not exact in half precision
        model.posterior.bias[3:] = -300.0
    model.to(dtype)
    x = (torch.rand(4, 8) > 0.5).to(dtype)
    got = model.log_likelihood(x, 5, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()


def test_anomaly_score_defaults_to_the_negative_elbo():
    model = fastae.VAE(6, 5, 2).eval()
    x = torch.rand(4, 6)
    torch.testing.assert_close(model.anomaly_score(x), model.negative_elbo(x), rtol=0, atol=0)


def test_save_image_grid_draws_on_a_fixed_unit_gray_scale(monkeypatch, tmp_path):
    """Pixels in [0, 1] are drawn on the scale [0, 1] (0 blank, 1 full ink), not stretched
    to the images' own range; a wider range widens it. Image i sits at row i // columns."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from fastae.vae import save_image_grid

    drawn = []
    imshow = Axes.imshow

    def recording(self, array, **kwargs):
        drawn.append((array.copy(), kwargs["vmin"], kwargs["vmax"]))
        return imshow(self, array, **kwargs)

    monkeypatch.setattr(Axes, "imshow", recording)
    images = torch.tensor([[0.2, 0.3], [0.4, 0.6], [0.5, 0.5]])  # three 1x2 images
    save_image_grid(images, tmp_path / "a.png", (1, 2), columns=2)
    mosaic, low, high = drawn[-1]
    assert (low, high) == (0.0, 1.0)
    assert mosaic.shape == (5, 7) and (mosaic[0] == 0.0).all()  # blank border at low
    assert mosaic[1, 1:3].tolist() == pytest.approx([0.2, 0.3])
    assert mosaic[1, 4:6].tolist() == pytest.approx([0.4, 0.6])
    assert mosaic[3, 1:3].tolist() == pytest.approx([0.5, 0.5])
    save_image_grid(images * 4 - 1, tmp_path / "b.png", (1, 2), columns=2)
    assert drawn[-1][1:] == (pytest.approx(-0.2), pytest.approx(1.4))


def test_repr_shows_beta():
    model = fastae.VAE(8, 4, 2, beta=0.5)
    assert "8 -> 4 -> 2, activation='relu', output='sigmoid', loss='bce', beta=0.5" in repr(model)


def test_log_likelihood_carries_no_gradient():
    model = fastae.VAE(6, 5, 2)
    estimate = model.log_likelihood(torch.rand(3, 6), 4)
    assert not estimate.requires_grad and estimate.grad_fn is None


def test_backward_exp_minus_one_is_accurate_near_zero():
    """dlogvar's KL term g_kl (exp(logvar) - 1) / 2 without cancellation near logvar = 0 (as
    the forward's KL: test_exp_minus_one_is_accurate_near_zero); exp(lv) - 1 is 2e-4 off at
    lv = 3e-4 in float32."""
    vae = _kernels()
    mu = torch.zeros(2, 16, device=DEVICE)
    logvar = torch.full((2, 16), 3e-4, device=DEVICE)
    grad_kl = torch.ones(2, device=DEVICE)
    dmu, dlogvar = vae.reparameterize_backward(None, grad_kl, mu, logvar, 0)
    exact = 0.5 * math.expm1(torch.tensor(3e-4, dtype=torch.float32).item())
    torch.testing.assert_close(dlogvar, torch.full_like(dlogvar, exact), rtol=1e-5, atol=0)
    assert torch.equal(dmu, torch.zeros_like(dmu))


def test_reparameterize_stores_nothing_past_its_outputs(monkeypatch):
    """The tail masks of both kernels: z, kl, dmu and dlogvar store nothing past their ends
    (a stray store would crash the interpreter or, on a GPU, corrupt memory silently)."""
    vae = _kernels()
    guards = guarded_outputs(monkeypatch, vae, common)  # vae.empty: z, dmu, dlv; kl: common
    mu, logvar = (guarded_input(torch.randn(7, 13, device=DEVICE)) for _ in range(2))
    z, kl = vae.reparameterize_forward(mu, logvar, 5)
    want_z, want_kl = reference.reparameterize_forward(mu, logvar, 5)
    torch.testing.assert_close(z, want_z, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(kl, want_kl, rtol=1e-5, atol=1e-5)
    g_z = guarded_input(torch.randn(7, 13, device=DEVICE))
    g_kl = guarded_input(torch.randn(7, device=DEVICE))
    got = vae.reparameterize_backward(g_z, g_kl, mu, logvar, 5)
    want = reference.reparameterize_backward(g_z, g_kl, mu, logvar, 5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(guards) == 4 and all(g.isnan().all() for g in guards)
