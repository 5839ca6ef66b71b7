"""Plain eager calls skip the dispatcher: the same code through an autograd.Function, with
the same values and gradients as the registered custom ops. (torch.func transforms and
forward-mode AD take the reference math: tests/test_torch_func.py.)"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastae
from fastae import ops
from fastae.noise import MaskingNoise


class _Passthrough(TorchFunctionMode):
    """A function mode that changes nothing but makes every call go through the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the triton backend runs


def _inputs(seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64).to(device)

    x = rand(5, 6).requires_grad_()
    weight = ((rand(4, 6) - 0.5) * 2).requires_grad_()
    bias = (rand(4) - 0.5).requires_grad_()
    mu, logvar = (rand(5, 3) - 0.5).requires_grad_(), (rand(5, 3) - 0.5).requires_grad_()
    return x, weight, bias, mu, logvar


def _losses(x, weight, bias, mu, logvar):
    """Every op, every differentiable output used, tied decoder weights."""
    noise = MaskingNoise(0.3, rescale=True, seed=11)
    corrupted = ops.corrupt(x, noise)
    h, rho_hat, jac = ops.encode(x, weight, bias, activation="tanh", noise=noise)
    per_sample = ops.decode_loss(
        torch.sigmoid(h), weight.t(), None, target=x, output="sigmoid", loss="mse"
    )
    z, kl = ops.reparameterize(mu, logvar, seed=5)
    return (
        corrupted.square().sum() + per_sample.sum() + rho_hat.square().sum() + jac
        + z.square().sum() + kl.sum()
    )  # fmt: skip


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_eager_route_gives_the_dispatchers_values_and_gradients(backend_name):
    results = []
    for mode in (None, _Passthrough()):
        inputs = _inputs(0, DEVICE if backend_name == "triton" else "cpu")
        with fastae.use_backend(backend_name):
            if mode is None:
                loss = _losses(*inputs)
            else:
                with mode:
                    loss = _losses(*inputs)
            grads = torch.autograd.grad(loss, inputs, create_graph=True)
            # second order: the backward formulas' own derivatives
            second = torch.autograd.grad(sum(g.sum() for g in grads), inputs)
        results.append((loss, grads, second))
    (loss, grads, second), (loss_op, grads_op, second_op) = results
    torch.testing.assert_close(loss, loss_op, rtol=0, atol=0)
    for got, want in zip(grads + second, grads_op + second_op, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_plain_eager_calls_take_the_eager_route():
    x, weight, bias, mu, logvar = _inputs(1)
    h = ops.encode(x, weight, bias)[0]
    z = ops.reparameterize(mu, logvar, seed=1)[0]
    per_sample = ops.decode_loss(h, weight.t(), target=x)
    corrupted = ops.corrupt(x, MaskingNoise(0.5, seed=1))
    names = [type(t.grad_fn).__name__ for t in (h, z, per_sample, corrupted)]
    assert names == [f"{op}_eagerBackward" for op in ("encode", "reparameterize")] + [
        "decode_loss_eagerBackward",
        "corrupt_eagerBackward",
    ]
    with _Passthrough():
        h_op = ops.encode(x, weight, bias)[0]
    assert "eager" not in type(h_op.grad_fn).__name__
    torch.testing.assert_close(h, h_op, rtol=0, atol=0)
    with torch.no_grad():
        h_no_grad = ops.encode(x, weight, bias)[0]
    assert h_no_grad.grad_fn is None
    torch.testing.assert_close(h, h_no_grad, rtol=0, atol=0)
