"""Property-based tests: random shapes (down to 1), dtypes, strides, activations, noise kinds
and levels, losses — the triton backend against the reference, the reference against a naive
float64 autograd oracle. Profile: FASTAE_HYPOTHESIS_PROFILE=ci (default) or long."""

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
    tol_dtype = torch.float32 if noise is not None and noise.kind == "gaussian" else dtype
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
