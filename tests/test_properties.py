"""Property-based tests: random shapes (down to 1), dtypes, strides, activations, noise kinds
and levels, losses — the triton backend against the reference for every op and for whole
autoencoder and VAE training steps (regularizers, tying and fusion boundaries drawn), the
reference against a naive float64 autograd oracle. Profile: FASTAE_HYPOTHESIS_PROFILE=ci
(default) or long."""

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastae
from fastae import ops, reference
from fastae.benchmark import matmul_precision

pytest.importorskip("triton")

FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
# eps of the VAE is float32 Box-Muller: bit-equal to the interpreted kernel's on the CPU, within
# about an ulp of the compiled kernel's on a GPU (libm rounding), so float32's tolerance there
EPS_TOL_DTYPE = torch.float32 if DEVICE == "cuda" else None
NOISE = st.one_of(
    st.none(),
    st.builds(fastae.GaussianNoise, st.floats(0, 2), seed=st.integers(0, 2**63 - 1)),
    st.builds(
        fastae.MaskingNoise, st.floats(0, 0.95), rescale=st.booleans(),
        seed=st.integers(0, 2**63 - 1),
    ),
    st.builds(
        fastae.SaltPepperNoise, st.floats(0, 0.95), low=st.floats(-2, 0), high=st.floats(0, 2),
        seed=st.integers(0, 2**63 - 1),
    ),
)  # fmt: skip


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` stored contiguously, transposed (a matrix), or as a strided
    slice (NaN between the elements)."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    return t


@st.composite
def _matrix(draw, rows, cols, dtype, low=-1.0, high=1.0):
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(rows, cols, generator=g, dtype=torch.float64) * (high - low) + low
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    return _layout(t.to(dtype).to(DEVICE), layout)


@st.composite
def _vector(draw, size, dtype):
    """A random vector (a bias), contiguous or every other element of a longer one."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = torch.randn(size, generator=g, dtype=torch.float64)
    layout = draw(st.sampled_from(["contiguous", "sliced"]))
    return _layout(t.to(dtype).to(DEVICE), layout)


def _grads(fn, inputs, weights):
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def _both_backends(fn, inputs, weights):
    """Outputs and gradients on the triton and reference backends, IEEE float32 products."""
    results = {}
    with matmul_precision("highest"):
        for backend in ("triton", "reference"):
            with fastae.use_backend(backend):
                results[backend] = _grads(fn, inputs, weights)
    return results


def _noise_tol_dtype(noise, dtype: torch.dtype) -> torch.dtype:
    """The tolerance's dtype: Gaussian noise's eps is bit-equal to the kernel's on the CPU,
    within about an ulp of float32 on a GPU (as the VAE's, :data:`EPS_TOL_DTYPE`)."""
    gaussian = noise is not None and noise.kind == "gaussian"
    return (EPS_TOL_DTYPE or dtype) if gaussian else dtype


def _close(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=TOL[dtype], atol=TOL[dtype])


@given(data=st.data())
def test_encode_triton_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, features, hidden = (data.draw(st.integers(1, 24)) for _ in range(3))
    x = data.draw(_matrix(batch, features, dtype, 0.0, 1.0))
    weight = data.draw(_matrix(hidden, features, dtype))
    bias = data.draw(st.one_of(st.none(), _vector(hidden, dtype)))
    activation = data.draw(st.sampled_from(reference.ACTIVATIONS))
    noise = data.draw(NOISE)
    weights = [torch.randn(batch, hidden, dtype=torch.float64, device=DEVICE),
               torch.randn(hidden, dtype=torch.float64, device=DEVICE), 0.7]  # fmt: skip
    inputs = [x, weight] + ([bias] if bias is not None else [])

    def run(*args):
        return ops.encode(*args[:2], args[2] if len(args) > 2 else None,
                          activation=activation, noise=noise)  # fmt: skip

    results = _both_backends(run, inputs, weights)
    tol_dtype = _noise_tol_dtype(noise, dtype)
    _close(results["triton"], results["reference"], tol_dtype)


@given(data=st.data())
def test_decode_loss_triton_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, hidden, features = (data.draw(st.integers(1, 24)) for _ in range(3))
    h = data.draw(_matrix(batch, hidden, dtype, 0.0, 1.0))
    tied = data.draw(st.booleans())
    weight = data.draw(
        _matrix(hidden, features, dtype) if tied else _matrix(features, hidden, dtype)
    )
    target = data.draw(_matrix(batch, features, dtype, 0.0, 1.0))
    output, loss = data.draw(
        st.sampled_from([("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")])
    )
    bias = data.draw(_vector(features, dtype))
    weights = [torch.randn(batch, dtype=torch.float64, device=DEVICE)]

    def run(h, weight, bias, target):
        decoder = weight.t() if tied else weight
        return ops.decode_loss(h, decoder, bias, target=target, output=output, loss=loss)

    results = _both_backends(run, [h, weight, bias, target], weights)
    _close(results["triton"], results["reference"], dtype)


@given(data=st.data())
def test_corrupt_kernel_masks_are_the_reference_masks(data):
    from fastae.kernels import noise as noise_kernels

    rows, cols = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    x = data.draw(_matrix(rows, cols, torch.float32))
    kind = data.draw(st.sampled_from(["masking", "masking_rescale", "salt_pepper"]))
    level = data.draw(st.floats(0, 0.99))
    seed = data.draw(st.integers(0, 2**63 - 1))
    base = data.draw(st.sampled_from([0, 2**31 - 5, 2**32 + 3, 2**50]))
    got = noise_kernels.corrupt(x, kind, level, -1.0, 1.0, seed, base)
    assert torch.equal(got, reference.corrupt(x, kind, level, -1.0, 1.0, seed, base))


@given(data=st.data())
def test_reference_encode_matches_naive_autograd_oracle(data):
    """The analytic forward/backward against autograd through the naive float64 composition."""
    batch, features, hidden = (data.draw(st.integers(1, 16)) for _ in range(3))
    activation = data.draw(st.sampled_from(reference.ACTIVATIONS))
    x = data.draw(_matrix(batch, features, torch.float64, 0.0, 1.0))
    weight = data.draw(_matrix(hidden, features, torch.float64))
    bias = torch.randn(hidden, dtype=torch.float64, device=DEVICE)
    weights = [torch.randn(batch, hidden, dtype=torch.float64, device=DEVICE),
               torch.randn(hidden, dtype=torch.float64, device=DEVICE), 1.3]  # fmt: skip

    def naive(x, weight, bias):
        z = x @ weight.t() + bias
        h = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
             "softplus": torch.nn.functional.softplus}[activation](z)  # fmt: skip
        slope = torch.autograd.grad(h.sum(), z, create_graph=True)[0]
        jac = (slope.square() * weight.square().sum(1)).sum() / x.shape[0]
        return h, h.mean(0), jac

    with fastae.use_backend("reference"):
        got = _grads(lambda *a: ops.encode(*a, activation=activation), [x, weight, bias], weights)
    want = _grads(naive, [x, weight, bias], weights)
    _close(got, want, torch.float64)


@contextlib.contextmanager
def _kernel_choices(data):
    """Each fusion boundary and both ways of keeping x~, drawn (the env vars dispatch reads)."""
    choices = {
        "FASTAE_ENCODER_FUSION": data.draw(st.sampled_from(["gemm", "split"])),
        "FASTAE_DECODER_FUSION": data.draw(st.sampled_from(["gemm", "split"])),
        "FASTAE_CORRUPTED_INPUT": data.draw(st.sampled_from(["store", "regenerate"])),
    }
    with mock.patch.dict(os.environ, choices):
        yield


def _step_on_both_backends(model, step, use):
    """Every output of ``step()`` (a training step of ``model``) and every parameter's gradient
    of ``use(output)``, on the triton and on the reference backend (the same parameters, IEEE
    float32 products)."""
    results = {}
    with matmul_precision("highest"):
        for backend in ("triton", "reference"):
            model.zero_grad(set_to_none=True)
            with fastae.use_backend(backend):
                out = step()
                use(out).backward()
            values = [v for v in vars(out).values() if isinstance(v, torch.Tensor)]
            values += list(getattr(out, "penalties", {}).values())
            results[backend] = [v.detach() for v in values] + [p.grad for p in model.parameters()]
    return results


@given(data=st.data())
def test_autoencoder_step_triton_matches_reference(data):
    """A whole training step (one autograd node, or the ops composed where the model takes
    them) with every regularizer, tying, output and loss drawn."""
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, features, hidden = (data.draw(st.integers(1, 20)) for _ in range(3))
    activation = data.draw(st.sampled_from(reference.ACTIVATIONS))
    output, loss = data.draw(
        st.sampled_from([("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")])
    )
    sparsity = data.draw(
        st.one_of(
            st.none(),
            st.builds(fastae.L1Sparsity, st.floats(0, 1)),
            *([st.builds(fastae.KLSparsity, st.floats(0.01, 0.99), st.floats(0, 1))]
              if activation == "sigmoid" else []),
        )
    )  # fmt: skip
    noise = data.draw(NOISE)
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    model = fastae.Autoencoder(
        features, hidden, activation=activation, output=output, loss=loss,
        tied=data.draw(st.booleans()), noise=noise, sparsity=sparsity,
        contractive=data.draw(st.sampled_from([0.0, 0.3])),
    ).to(dtype=dtype, device=DEVICE)  # fmt: skip
    x = data.draw(_matrix(batch, features, dtype, 0.0, 1.0))
    code_weight = torch.randn(batch, hidden, dtype=dtype, device=DEVICE)
    use_code = data.draw(st.booleans())

    def use(out):
        return out.loss + (out.code * code_weight).sum() if use_code else out.loss

    with _kernel_choices(data):
        results = _step_on_both_backends(model, lambda: model(x), use)
    tol_dtype = _noise_tol_dtype(noise, dtype)
    _close(results["triton"], results["reference"], tol_dtype)


@given(data=st.data())
def test_vae_step_triton_matches_reference(data):
    """A VAE's training step (encoder, reparameterize, decoder hidden layer, decode_loss as one
    autograd node) with shapes, activation, output, loss and beta drawn."""
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, features, hidden, latent = (data.draw(st.integers(1, 16)) for _ in range(4))
    output, loss = data.draw(
        st.sampled_from([("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")])
    )
    torch.manual_seed(data.draw(st.integers(0, 2**31)))
    model = fastae.VAE(
        features, hidden, latent, activation=data.draw(st.sampled_from(reference.ACTIVATIONS)),
        output=output, loss=loss, beta=data.draw(st.floats(0, 2)),
    ).to(dtype=dtype, device=DEVICE)  # fmt: skip
    x = data.draw(_matrix(batch, features, dtype, 0.0, 1.0))
    seed = data.draw(st.integers(0, 2**63 - 1))
    z_weight = torch.randn(batch, latent, dtype=dtype, device=DEVICE)

    def use(out):
        return out.loss + (out.z * z_weight).sum()

    with _kernel_choices(data):
        results = _step_on_both_backends(model, lambda: model(x, seed), use)
    _close(results["triton"], results["reference"], EPS_TOL_DTYPE or dtype)


@given(data=st.data())
def test_reparameterize_triton_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, latent = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    mu = data.draw(_matrix(batch, latent, dtype, -2.0, 2.0))
    logvar = data.draw(_matrix(batch, latent, dtype, -4.0, 4.0))
    seed = data.draw(st.integers(0, 2**63 - 1))
    weights = [torch.randn(batch, latent, dtype=torch.float64, device=DEVICE),
               torch.randn(batch, dtype=torch.float64, device=DEVICE)]  # fmt: skip
    results = _both_backends(
        lambda mu, logvar: ops.reparameterize(mu, logvar, seed), [mu, logvar], weights
    )
    _close(results["triton"], results["reference"], EPS_TOL_DTYPE or dtype)


@given(data=st.data())
def test_bernoulli_kl_triton_matches_reference(data):
    """Lengths across the kernel's blocks, means at and beyond the clamp's edges."""
    dtype = data.draw(st.sampled_from(DTYPES))
    hidden = data.draw(st.one_of(st.integers(1, 40), st.integers(1000, 2100)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    rho_hat = torch.rand(hidden, generator=g, dtype=torch.float64)
    edges = torch.tensor([0.0, 1.0, 2.0**-21, 1 - 2.0**-21], dtype=torch.float64)
    picks = torch.rand(hidden, generator=g) < data.draw(st.floats(0, 0.5))
    rho_hat[picks] = edges[torch.randint(4, (int(picks.sum()),), generator=g)]
    rho_hat = _layout(
        rho_hat.to(dtype).to(DEVICE), data.draw(st.sampled_from(["contiguous", "sliced"]))
    )
    rho = data.draw(st.floats(0.01, 0.99))
    results = _both_backends(lambda q: ops.bernoulli_kl(q, rho), [rho_hat], [1.7])
    _close(results["triton"], results["reference"], dtype)
