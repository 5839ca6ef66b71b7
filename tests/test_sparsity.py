"""The KL sparsity penalty op (fastae.ops.bernoulli_kl): reference against a float64 oracle,
the Triton kernel against the reference, gradients, opcheck and errors."""

import math

import pytest
import torch

import fastae
from fastae import ops, reference

pytest.importorskip("triton")
from fastae.kernels import common, sparsity  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = reference.KL_EPS


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(common, "poison_outputs", True)


def _rho_hat(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return values.to(dtype).to(DEVICE)


def _oracle(rho_hat, rho):
    """Term by term in Python floats: (kl, gradient)."""
    kl, grad = 0.0, []
    for r in rho_hat.double().tolist():
        q = min(max(r, EPS), 1 - EPS)
        kl += rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q))
        grad.append((q - rho) / (q * (1 - q)) if q == r else 0.0)
    return kl, grad


@pytest.mark.parametrize("rho", [0.05, 0.5, 0.93])
def test_reference_matches_the_oracle(rho):
    rho_hat = _rho_hat(37)
    edges = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-9], dtype=torch.float64, device=DEVICE)
    rho_hat[[3, 5, 7, 9]] = edges
    kl, grad = reference.bernoulli_kl(rho_hat, rho)
    want_kl, want_grad = _oracle(rho_hat, rho)
    assert kl.item() == pytest.approx(want_kl, rel=1e-12)
    torch.testing.assert_close(grad.cpu(), torch.tensor(want_grad, dtype=torch.float64))
    assert grad[[3, 5, 7, 9]].eq(0).all()  # clamped units get no gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 17, 130])  # 130: several blocks of the interpreter's 64
def test_kernel_matches_reference(n, dtype):
    rho_hat = _rho_hat(n, dtype, seed=n)
    if n > 3:
        rho_hat[:3] = torch.tensor([0.0, 1.0, 5e-7], device=DEVICE).to(dtype)
    got = sparsity.bernoulli_kl(rho_hat, 0.07)
    want = reference.bernoulli_kl(rho_hat, 0.07)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == reference.stat_dtype(dtype)
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("rho", [0.999, 1 - 1e-6, 1 - 1e-7, 1e-7])
@pytest.mark.parametrize("impl", [reference, sparsity])
def test_float32_penalty_of_a_rho_near_its_bounds(impl, rho):
    """In float32, 1 - rho and q - rho keep the digits of a rho next to 1 (or 0) that
    rounding rho to float32 first would lose (29% of the gradient at rho = 1 - 1e-6)."""
    values = [1 - 2**-20, 1 - 2**-19, 0.999999, 0.9999, 0.9, 2**-19, 1e-3]
    rho_hat = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    kl, grad = impl.bernoulli_kl(rho_hat, rho)
    want_kl, want_grad = _oracle(rho_hat, rho)
    assert kl.item() == pytest.approx(want_kl, rel=1e-5)
    want_grad = torch.tensor(want_grad, dtype=torch.float64)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rho", [1e-4, 1e-3])
@pytest.mark.parametrize("impl", [reference, sparsity])
def test_float32_penalty_of_a_small_rho(impl, rho):
    """A small target rate (rho = 1e-4: the KL of rho_hat 10% off is 5e-7) in float32: the
    (1 - rho) log((1 - rho) / (1 - q)) term is log1p's, not log(1 - q)'s, whose rounding of
    1 - q alone puts the KL 13% off. Nearer rho the KL's two terms cancel to float32's
    absolute error (a few 1e-12): its gradient stays exact to float32 rounding there."""
    factors = [0.1, 0.5, 0.9, 1.1, 2.0, 10.0]
    rho_hat = torch.tensor([rho * f for f in factors], dtype=torch.float32, device=DEVICE)
    kl, grad = impl.bernoulli_kl(rho_hat, rho)
    want_kl, want_grad = _oracle(rho_hat, rho)
    assert kl.item() == pytest.approx(want_kl, rel=1e-4)
    for unit, factor in enumerate(factors):  # each unit's KL alone (the sum hides the small)
        one_kl, _ = impl.bernoulli_kl(rho_hat[unit : unit + 1], rho)
        one_want, _ = _oracle(rho_hat[unit : unit + 1], rho)
        assert one_kl.item() == pytest.approx(one_want, rel=1e-3), factor
    near = torch.tensor([rho * (1 + 1e-3), rho * (1 - 1e-2)], dtype=torch.float32, device=DEVICE)
    near_grad = impl.bernoulli_kl(near, rho)[1]
    want_near = torch.tensor(_oracle(near, rho)[1], dtype=torch.float64)
    torch.testing.assert_close(near_grad.double().cpu(), want_near, rtol=1e-6, atol=0)
    want_grad = torch.tensor(want_grad, dtype=torch.float64)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rho", [0.05, 0.5, 0.95, 0.999])
def test_float64_gradient_next_to_rho(rho):
    """In float64 the kernel's gradient (q - rho) / (q (1 - q)) near q = rho matches the
    reference's to float64 rounding, and is 0 at q = rho: rho reaches the kernel in three
    float32 parts (in two it was 2^-48 off: -4.7e-15 at rho_hat = rho = 0.95)."""
    offsets = torch.tensor([0.0, 1e-15, -1e-15, 1e-12, -1e-9, 1e-6], dtype=torch.float64)
    rho_hat = (rho + offsets).to(DEVICE)
    kl, grad = sparsity.bernoulli_kl(rho_hat, rho)
    want_kl, want_grad = reference.bernoulli_kl(rho_hat, rho)
    assert grad[0].item() == 0.0
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=0)
    # the KL's terms (about 1e-6) each round a log once: a few 1e-17 apart on a GPU, whose
    # log1p differs from torch's; the two-part constants were 6.7e-16 off at rho = 0.5
    assert kl.item() == pytest.approx(want_kl.item(), rel=0, abs=2e-16)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_clamp_is_the_documented_two_to_the_minus_20(backend_name):
    """rho_hat is clamped to [2^-20, 1 - 2^-20], as documented, written out here (the oracle
    above reads reference.KL_EPS): 2^-19 keeps the formula's gradient, 2^-21 is clamped
    (gradient 0, the value at 2^-20), at both ends."""
    rho = 0.05
    inside, outside = [2**-19, 1 - 2**-19], [2**-21, 1 - 2**-21]
    rho_hat = torch.tensor(inside + outside, dtype=torch.float64, device=DEVICE)
    rho_hat.requires_grad_()
    with fastae.use_backend(backend_name):
        kl = ops.bernoulli_kl(rho_hat, rho)
    kl.backward()

    def term(q):
        return rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q))

    want_kl = sum(map(term, inside)) + term(2.0**-20) + term(1 - 2.0**-20)
    assert kl.item() == pytest.approx(want_kl, rel=1e-12)
    want_grad = [(q - rho) / (q * (1 - q)) for q in inside] + [0.0, 0.0]
    torch.testing.assert_close(rho_hat.grad.cpu(), torch.tensor(want_grad, dtype=torch.float64))


def test_kernel_nan_and_empty_follow_the_reference():
    rho_hat = torch.tensor([0.3, float("nan")], device=DEVICE)
    kl, grad = sparsity.bernoulli_kl(rho_hat, 0.1)
    assert kl.isnan()
    torch.testing.assert_close(grad, reference.bernoulli_kl(rho_hat, 0.1)[1])
    kl, grad = sparsity.bernoulli_kl(torch.empty(0, device=DEVICE), 0.1)
    assert kl.item() == 0.0 and grad.shape == (0,)


def test_kernel_strided_input():
    rho_hat = _rho_hat(40)
    got = sparsity.bernoulli_kl(rho_hat[::2], 0.2)
    want = reference.bernoulli_kl(rho_hat[::2].contiguous(), 0.2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_gradcheck_and_second_order(backend_name):
    rho_hat = _rho_hat(9).requires_grad_()
    with fastae.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda r: ops.bernoulli_kl(r, 0.2), (rho_hat,))
        assert torch.autograd.gradgradcheck(lambda r: ops.bernoulli_kl(r, 0.2), (rho_hat,))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_opcheck(backend_name):
    rho_hat = _rho_hat(11).requires_grad_()
    torch.library.opcheck(torch.ops.fastae.bernoulli_kl.default, (rho_hat, 0.3, backend_name))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_penalty_and_its_gradient_in_low_precision(backend):
    """A bfloat16 rho_hat: the value in float32, the gradient back in bfloat16, as the
    reference's float32 gradient rounded."""
    rho_hat = _rho_hat(24, torch.bfloat16).requires_grad_()
    with fastae.use_backend(backend):
        kl = ops.bernoulli_kl(rho_hat, 0.1)
    assert kl.dtype == torch.float32
    kl.backward()
    assert rho_hat.grad.dtype == torch.bfloat16
    value, gradient = reference.bernoulli_kl(rho_hat.detach(), 0.1)
    torch.testing.assert_close(kl, value)
    torch.testing.assert_close(rho_hat.grad, gradient.to(torch.bfloat16))


def test_kl_sparsity_uses_the_op():
    rho_hat = _rho_hat(6).requires_grad_()
    penalty = fastae.KLSparsity(0.1, weight=3.0).penalty(None, rho_hat)
    torch.testing.assert_close(penalty, 3.0 * ops.bernoulli_kl(rho_hat, 0.1))
    assert "bernoulli_kl" in type(penalty.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize(
    "args, error, arg",
    [
        ((torch.rand(2, 3), 0.1), ValueError, "rho_hat"),
        ((torch.tensor([1, 0]), 0.1), TypeError, "rho_hat"),
        (([0.1, 0.2], 0.1), TypeError, "rho_hat"),
        ((torch.rand(0), 0.1), ValueError, "rho_hat"),  # as every op refuses empty inputs
        ((torch.rand(3), 0.0), ValueError, "rho"),
        ((torch.rand(3), 1.0), ValueError, "rho"),
        ((torch.rand(3), math.nan), ValueError, "rho"),
        ((torch.rand(3), "0.1"), TypeError, "rho"),
    ],
)
def test_bad_input(args, error, arg):
    with pytest.raises(error, match=rf"^{arg}\b"):
        ops.bernoulli_kl(*args)
