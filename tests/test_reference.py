"""The reference backend against float64 brute-force oracles.

Oracles: ``torch.func.jacrev`` Jacobians for the contractive term, autograd through naive
torch compositions for every gradient, explicit masks for the noise.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

import fastae
from fastae import philox, reference
from fastae.noise import GaussianNoise, MaskingNoise, SaltPepperNoise, check_seed, draw_seed

ACTIVATIONS = reference.ACTIVATIONS
ACT_FN = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": lambda z: torch.logaddexp(z, torch.zeros_like(z)),  # no threshold
}
SHAPES = list(itertools.product([1, 7, 33], [1, 5, 784], [1, 17, 100]))  # (B, d, H)
NOISES = {
    "gaussian": GaussianNoise(sigma=0.3, seed=11),
    "masking": MaskingNoise(p=0.4, seed=2**40 + 3),
    "masking_rescale": MaskingNoise(p=0.25, rescale=True, seed=5),
    "salt_pepper": SaltPepperNoise(p=0.3, low=-0.5, high=1.5, seed=2**33),
}
F64 = {"rtol": 1e-9, "atol": 1e-11}


@pytest.fixture(autouse=True)
def _reference_backend(_fresh_backend):
    with fastae.use_backend("reference"):
        yield


# ----------------------------------------------------------------------------- oracles


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def explicit_corrupt(x: torch.Tensor, noise) -> torch.Tensor:
    """x~ built from explicit masks drawn from the Philox stream at offsets row*d + col.

    Noise levels act in float32 (as inside the kernels): sigma * eps and 1 - p are float32.
    """
    if noise is None:
        return x
    rows, cols = x.shape
    offsets = philox.element_offsets(rows, cols, x.device)
    w0, w1, _, _ = philox.randint4x(noise.seed, offsets)
    u0, u1 = philox.uint_to_uniform(w0), philox.uint_to_uniform(w1)
    if isinstance(noise, GaussianNoise):
        eps = philox.randn(noise.seed, offsets)
        return x + (f32(noise.sigma) * eps).to(x.dtype)
    mask = (u0 >= f32(noise.p)).to(x.dtype)
    if isinstance(noise, MaskingNoise):
        keep_rate = (1 - f32(noise.p)).to(x.dtype) if noise.rescale else 1.0
        return x * mask / keep_rate
    fill = torch.where(u1 >= 0.5, f32(noise.high), f32(noise.low)).to(x.dtype)
    return x * mask + fill * (1 - mask)


def oracle_encode(x, weight, bias, activation, noise=None):
    """(h, rho_hat, jac) by brute force: jac from per-sample Jacobians (jacrev)."""
    act = ACT_FN[activation]
    x_tilde = explicit_corrupt(x, noise)

    def layer(xi):
        z = weight @ xi
        return act(z if bias is None else z + bias)

    h = torch.vmap(layer)(x_tilde)
    jacobians = torch.func.vmap(torch.func.jacrev(layer))(x_tilde)  # (B, H, d)
    assert jacobians.shape == (x.shape[0], weight.shape[0], x.shape[1])
    jac = jacobians.square().sum((1, 2)).mean()
    return h, h.mean(0), jac


def naive_encode(x, weight, bias, activation, noise=None):
    """(h, rho_hat, jac) as plain torch at the input dtype, a'(z) by autograd."""
    act = ACT_FN[activation]
    x_tilde = explicit_corrupt(x, noise)
    z = x_tilde @ weight.t()
    if bias is not None:
        z = z + bias
    h = act(z)
    (slope,) = torch.autograd.grad(h, z, torch.ones_like(h), create_graph=True)
    jac = (slope.square() * weight.square().sum(1)).sum(1).mean()
    return h, h.mean(0), jac


def oracle_decode(h, weight, bias, target, output, loss):
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    if loss == "bce":
        p = torch.sigmoid(z)
        return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).sum(1)
    out = torch.sigmoid(z) if output == "sigmoid" else z
    return (out - target).square().sum(1)


def make_layer(batch, d, hidden, dtype=torch.float64, bias=True, x_grad=True):
    x = torch.rand(batch, d, dtype=dtype).requires_grad_(x_grad)
    weight = (torch.randn(hidden, d, dtype=dtype) * (2.0 / d**0.5)).requires_grad_()
    b = (torch.randn(hidden, dtype=dtype) * 0.5).requires_grad_() if bias else None
    return x, weight, b


def upstream(batch, hidden, dtype=torch.float64):
    return torch.randn(batch, hidden, dtype=dtype), torch.randn(hidden), torch.randn(())


def encode_objective(outputs, grads):
    h, rho_hat, jac = outputs
    g_h, g_rho, g_jac = grads
    return (
        (h * g_h.to(h.dtype)).sum()
        + (rho_hat * g_rho.to(rho_hat.dtype)).sum()
        + jac * g_jac.to(jac.dtype)
    )


def grads_of(value, tensors):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(value, tensors)


# ----------------------------------------------------------------------------- activations


def test_softplus_float64_past_torchs_threshold():
    """F.softplus returns z from 20 on, 2e-9 off in float64; the reference's softplus stays
    within an ulp there, and gradcheck of a softplus encode passes just past 20."""
    z = torch.tensor([19.0, 20.0, 20.0001, 21.0, 30.0, 39.0, 41.0, 60.0], dtype=torch.float64)
    exact = torch.tensor([v + math.log1p(math.exp(-v)) for v in z.tolist()], dtype=torch.float64)
    torch.testing.assert_close(reference.softplus(z), exact, rtol=3e-16, atol=0)
    x = torch.tensor([[20.0000004]], dtype=torch.float64, requires_grad=True)
    weight = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    encode = lambda x, w: fastae.ops.encode(x, w, activation="softplus")[0]  # noqa: E731
    assert torch.autograd.gradcheck(encode, (x, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_forms_give_the_same_values(dtype):
    """The differentiable BCE (torch.func's route) and the value-only one agree bit for bit,
    so a loss is the same number whichever route computed it."""
    special = [0.0, -0.0, 1e-30, -1e-30, 15.0, -15.0, 40.0, -40.0, math.inf, -math.inf]
    z = torch.cat([torch.randn(4000) * 12, torch.tensor(special)]).to(dtype)
    t = torch.cat([torch.rand(2000), torch.rand(2000).round(), torch.rand(len(special))])
    t = t.to(dtype)
    smooth = reference.bce_with_logits(z, t, differentiable=True)
    fast = reference.bce_with_logits(z, t)
    assert torch.equal(smooth.isnan(), fast.isnan())
    assert torch.equal(smooth.nan_to_num(), fast.nan_to_num())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_slope_and_curvature_match_autograd_derivatives(activation):
    z = torch.cat([torch.randn(500) * 4, torch.tensor([-30.0, -3.0, 0.5, 3.0, 25.0])])
    z = z.double().requires_grad_()
    h = ACT_FN[activation](z)
    (first,) = torch.autograd.grad(h.sum(), z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    s = reference.slope(h.detach(), activation)
    torch.testing.assert_close(s, first.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        reference.curvature(h.detach(), s, activation), second, rtol=1e-9, atol=1e-10
    )


# ----------------------------------------------------------------------------- encode


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch, d, hidden", SHAPES)
def test_encode_matches_jacrev_oracle(batch, d, hidden, activation):
    x, weight, bias = make_layer(batch, d, hidden)
    out = fastae.ops.encode(x, weight, bias, activation=activation)
    expect = oracle_encode(x, weight, bias, activation)
    assert out[0].shape == (batch, hidden) and out[1].shape == (hidden,) and out[2].shape == ()
    for got, want in zip(out, expect, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, **F64)

    grads = upstream(batch, hidden)
    got = grads_of(encode_objective(out, grads), (x, weight, bias))
    want = grads_of(encode_objective(expect, grads), (x, weight, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_without_bias(activation):
    x, weight, _ = make_layer(9, 13, 6)
    out = fastae.ops.encode(x, weight, None, activation=activation)
    expect = oracle_encode(x, weight, None, activation)
    for got, want in zip(out, expect, strict=True):
        torch.testing.assert_close(got, want, **F64)
    grads = upstream(9, 6)
    got = grads_of(encode_objective(out, grads), (x, weight))
    want = grads_of(encode_objective(expect, grads), (x, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("output_index", [0, 1, 2])
def test_encode_single_output_gradients(output_index):
    """Gradients flow when only h, only rho_hat or only jac feeds the loss."""
    x, weight, bias = make_layer(6, 11, 7)
    out = fastae.ops.encode(x, weight, bias, activation="tanh")
    expect = oracle_encode(x, weight, bias, "tanh")
    got = grads_of(out[output_index].sum(), (x, weight, bias))
    want = grads_of(expect[output_index].sum(), (x, weight, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)


def test_jacobian_matches_naive_slope_formula():
    x, weight, bias = make_layer(10, 8, 5)
    for activation in ACTIVATIONS:
        brute = oracle_encode(x, weight, bias, activation)[2]
        naive = naive_encode(x, weight, bias, activation)[2]
        torch.testing.assert_close(naive, brute, **F64)


@pytest.mark.parametrize("mode", ["store", "regenerate"])
@pytest.mark.parametrize("kind", list(NOISES))
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("batch, d, hidden", [(1, 1, 1), (7, 5, 17), (33, 784, 100)])
def test_encode_with_noise_matches_explicit_mask_oracle(
    batch, d, hidden, activation, kind, mode, monkeypatch
):
    """Stored x~ (corrupt, then a noise-free encode) or regenerated (the noisy encode and its
    backward draw the mask again from the seed): both equal the explicit-mask oracle."""
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", mode)
    noise = NOISES[kind]
    x, weight, bias = make_layer(batch, d, hidden)
    out = fastae.ops.encode(x, weight, bias, activation=activation, noise=noise)
    expect = oracle_encode(x, weight, bias, activation, noise)
    for got, want in zip(out, expect, strict=True):
        torch.testing.assert_close(got, want, **F64)
    grads = upstream(batch, hidden)
    got = grads_of(encode_objective(out, grads), (x, weight, bias))
    want = grads_of(encode_objective(expect, grads), (x, weight, bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F64)


@pytest.mark.parametrize("kind", list(NOISES))
def test_corrupt_matches_explicit_mask(kind):
    noise = NOISES[kind]
    x = torch.rand(29, 37, dtype=torch.float64, requires_grad=True)
    got = fastae.ops.corrupt(x, noise)
    want = explicit_corrupt(x, noise)
    torch.testing.assert_close(got, want, **F64)
    g = torch.randn_like(got)
    (grad,) = grads_of((got * g).sum(), [x])
    torch.testing.assert_close(grad, grads_of((want * g).sum(), [x])[0], **F64)
    if kind != "gaussian":
        kept = (grad != 0).sum().item()
        assert 0 < kept < x.numel()  # the mask is neither all-on nor all-off


def test_salt_pepper_fills_low_and_high():
    noise = SaltPepperNoise(p=0.5, low=-2.0, high=3.0, seed=99)
    x = torch.rand(40, 50, dtype=torch.float64)
    got = fastae.ops.corrupt(x, noise)
    changed = got != x
    assert set(got[changed].unique().tolist()) == {-2.0, 3.0}


# ----------------------------------------------------------------------------- dtypes


def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch, d, hidden", [(7, 5, 17), (33, 784, 100)])
def test_encode_float32_near_float64(batch, d, hidden, activation):
    x64, w64, b64 = make_layer(batch, d, hidden)
    x, weight, bias = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    out = fastae.ops.encode(x, weight, bias, activation=activation)
    assert out[0].dtype == out[1].dtype == out[2].dtype == torch.float32
    expect = oracle_encode(x64, w64, b64, activation)
    for got, want in zip(out, expect, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    grads = upstream(batch, hidden)
    got = grads_of(encode_objective(out, grads), (x, weight, bias))
    want = grads_of(encode_objective(expect, grads), (x64, w64, b64))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        scale = w.abs().max().item()
        assert _max_error(g, w) <= 2e-5 * scale + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_half_within_twice_torch_error(dtype, activation):
    """Half-precision outputs and gradients stay within 2x of plain torch's own error."""
    x64, w64, b64 = make_layer(33, 64, 40)
    x, weight, bias = (t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    out = fastae.ops.encode(x, weight, bias, activation=activation)
    assert out[0].dtype == dtype
    assert out[1].dtype == out[2].dtype == torch.float32
    eager = naive_encode(x, weight, bias, activation)
    expect = oracle_encode(x64, w64, b64, activation)
    unit = torch.finfo(dtype).eps
    for got, naive, want in zip(out, eager, expect, strict=True):
        scale = want.abs().max().item()
        assert _max_error(got, want) <= 2 * _max_error(naive, want) + unit * scale
    grads = upstream(33, 40)
    got = grads_of(encode_objective(out, grads), (x, weight, bias))
    naive = grads_of(encode_objective(eager, grads), (x, weight, bias))
    want = grads_of(encode_objective(expect, grads), (x64, w64, b64))
    for g, n, w in zip(got, naive, want, strict=True):
        assert g.dtype == dtype
        scale = w.abs().max().item()
        assert _max_error(g, w) <= 2 * _max_error(n, w) + unit * scale


# ----------------------------------------------------------------------------- decode_loss

DECODERS = [("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")]


@pytest.mark.parametrize("output, loss", DECODERS)
@pytest.mark.parametrize("batch, d, hidden", SHAPES[::2])
def test_decode_loss_matches_oracle(batch, d, hidden, output, loss):
    h = torch.rand(batch, hidden, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(d, hidden, dtype=torch.float64) * 2 / hidden**0.5).requires_grad_()
    bias = (torch.randn(d, dtype=torch.float64) * 0.3).requires_grad_()
    target = torch.rand(batch, d, dtype=torch.float64, requires_grad=True)
    got = fastae.ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss)
    want = oracle_decode(h, weight, bias, target, output, loss)
    assert got.shape == (batch,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, **F64)
    g = torch.randn(batch, dtype=torch.float64)
    inputs = (h, weight, bias, target)
    for a, b in zip(grads_of(got @ g, inputs), grads_of(want @ g, inputs), strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("output, loss", DECODERS)
def test_decode_loss_without_bias_and_partial_grads(output, loss):
    h = torch.rand(8, 6, dtype=torch.float64)  # h needs no gradient here
    weight = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    target = torch.rand(8, 10, dtype=torch.float64)
    got = fastae.ops.decode_loss(h, weight, None, target=target, output=output, loss=loss)
    want = oracle_decode(h, weight, None, target, output, loss)
    torch.testing.assert_close(got, want, **F64)
    (gw,) = grads_of(got.sum(), [weight])
    (ww,) = grads_of(want.sum(), [weight])
    torch.testing.assert_close(gw, ww, **F64)


@pytest.mark.parametrize("output, loss", DECODERS)
def test_decode_loss_target_gradient(output, loss):
    h = torch.rand(5, 4, dtype=torch.float64)
    weight = torch.randn(9, 4, dtype=torch.float64)
    bias = torch.randn(9, dtype=torch.float64)
    target = torch.rand(5, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, dtype=torch.float64)
    got = fastae.ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss)
    want = oracle_decode(h, weight, bias, target, output, loss)
    (gt,) = grads_of(got @ g, [target])
    (wt,) = grads_of(want @ g, [target])
    torch.testing.assert_close(gt, wt, **F64)


@pytest.mark.parametrize("output, loss", DECODERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_loss_low_precision(dtype, output, loss):
    h = torch.rand(33, 17, dtype=dtype, requires_grad=True)
    weight = (torch.randn(50, 17) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(50) * 0.3).to(dtype).requires_grad_()
    target = torch.rand(33, 50).to(dtype)
    got = fastae.ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss)
    assert got.dtype == torch.float32
    inputs64 = [t.detach().double().requires_grad_() for t in (h, weight, bias)]
    want = oracle_decode(*inputs64, target.double(), output, loss)
    eager = oracle_decode(h, weight, bias, target, output, loss)
    g = torch.randn(33)
    got_grads = grads_of(got @ g, (h, weight, bias))
    want_grads = grads_of(want @ g.double(), inputs64)
    eager_grads = grads_of(eager.float() @ g, (h, weight, bias))
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)
        for a, w in zip(got_grads, want_grads, strict=True):
            assert _max_error(a, w) <= 2e-5 * w.abs().max().item() + 1e-6
        return
    unit = torch.finfo(dtype).eps
    scale = want.abs().max().item()
    assert _max_error(got, want) <= 2 * _max_error(eager, want) + unit * scale
    for a, e, w in zip(got_grads, eager_grads, want_grads, strict=True):
        assert a.dtype == dtype
        assert _max_error(a, w) <= 2 * _max_error(e, w) + unit * w.abs().max().item()


# ----------------------------------------------------------------------------- tied weights


@pytest.mark.parametrize("noise", [None, "masking"])
@pytest.mark.parametrize("activation", ["sigmoid", "softplus"])
def test_tied_weights_gradients_add_up(activation, noise):
    """decode_loss(h, W.t()) after encode(x, W): both uses of W contribute to its gradient."""
    noise = NOISES[noise] if noise else None
    x, weight, bias = make_layer(13, 21, 8, x_grad=False)
    dec_bias = torch.randn(21, dtype=torch.float64, requires_grad=True)
    rho, lam = 0.1, 0.7

    def objective(encode, decode):
        h, rho_hat, jac = encode(x, weight, bias, activation, noise)
        per_sample = decode(h, weight.t(), dec_bias, x, "sigmoid", "bce")
        q = rho_hat.clamp(1e-6, 1 - 1e-6)
        kl = (rho * torch.log(rho / q) + (1 - rho) * torch.log((1 - rho) / (1 - q))).sum()
        return per_sample.mean() + 0.3 * kl + lam * jac

    def ours_encode(x, w, b, act, n):
        return fastae.ops.encode(x, w, b, activation=act, noise=n)

    def ours_decode(h, v, c, t, output, loss):
        return fastae.ops.decode_loss(h, v, c, target=t, output=output, loss=loss)

    got = objective(ours_encode, ours_decode)
    want = objective(oracle_encode, oracle_decode)
    torch.testing.assert_close(got, want, **F64)
    params = (weight, bias, dec_bias)
    got_grads = grads_of(got, params)
    for g, w in zip(got_grads, grads_of(want, params), strict=True):
        torch.testing.assert_close(g, w, **F64)
    # the decoder use alone does not give the tied gradient
    h = fastae.ops.encode(x, weight, bias, activation=activation, noise=noise)[0]
    decoder_only = fastae.ops.decode_loss(h.detach(), weight.t(), dec_bias, target=x).mean()
    assert not torch.allclose(grads_of(decoder_only, [weight])[0], got_grads[0])


def test_salt_and_pepper_checks_its_seed():
    """SaltPepperNoise refuses a negative, too large or non-integer seed, as the others do."""
    with pytest.raises(ValueError, match="seed"):
        SaltPepperNoise(p=0.2, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        SaltPepperNoise(p=0.2, seed=2**63)
    with pytest.raises(TypeError, match="seed"):
        SaltPepperNoise(p=0.2, seed="3")
    assert SaltPepperNoise(p=0.2, seed=2**63 - 1).seed == 2**63 - 1


def test_seeds_of_numpy_integers_become_python_ints():
    """A numpy integer seed is stored as a plain int (the op schemas take Python ints)."""
    assert type(check_seed(np.int64(7))) is int
    for spec in (
        GaussianNoise(0.1, seed=np.int64(7)),
        MaskingNoise(0.5, seed=np.uint32(7)),
        SaltPepperNoise(0.5, seed=np.int16(7)),
    ):
        assert type(spec.seed) is int and spec.seed == 7
    assert type(MaskingNoise(0.5).with_seed(np.int64(9)).seed) is int


def test_noise_levels_are_stored_as_floats():
    """Integer or numpy levels are kept as Python floats (their repr says so)."""
    gaussian = GaussianNoise(sigma=1)
    assert type(gaussian.sigma) is float and gaussian.sigma == 1.0
    masking = MaskingNoise(p=np.float32(0.5))
    assert type(masking.p) is float and masking.p == 0.5
    salt = SaltPepperNoise(p=0, low=-1, high=2)
    assert all(type(v) is float for v in (salt.p, salt.low, salt.high))


def test_noise_spec_reprs_show_every_field():
    """Each spec's repr names its class and all of its fields (the kind is not a field)."""
    assert repr(GaussianNoise(sigma=1)) == "GaussianNoise(sigma=1.0, seed=None)"
    assert repr(MaskingNoise(0.25, rescale=True, seed=3)) == (
        "MaskingNoise(p=0.25, rescale=True, seed=3)"
    )
    assert repr(SaltPepperNoise(0.1, low=-1.0, high=2.0, seed=4)) == (
        "SaltPepperNoise(p=0.1, low=-1.0, high=2.0, seed=4)"
    )


def test_noise_specs_are_immutable_and_hashable():
    """Specs are frozen values: no field can be reassigned, equal specs hash alike."""
    spec = SaltPepperNoise(0.3, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.p = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        GaussianNoise(0.1).sigma = 0.2
    assert hash(spec) == hash(SaltPepperNoise(0.3, seed=1))
    assert {MaskingNoise(0.2), MaskingNoise(0.2)} == {MaskingNoise(0.2)}


def test_noise_params_are_the_schema_arguments():
    """params() gives (kind, level, low, high) in that order for each spec."""
    assert GaussianNoise(0.3).params() == ("gaussian", 0.3, 0.0, 0.0)
    assert MaskingNoise(0.2).params() == ("masking", 0.2, 0.0, 0.0)
    assert MaskingNoise(0.2, rescale=True).params() == ("masking_rescale", 0.2, 0.0, 0.0)
    assert SaltPepperNoise(0.1, low=-2.0, high=3.0).params() == ("salt_pepper", 0.1, -2.0, 3.0)


def test_drawn_seeds_span_a_wide_range_and_follow_torchs_seed():
    """draw_seed gives non-negative 62-bit seeds (spread far beyond 32 bits), repeatable with
    torch.manual_seed."""
    torch.manual_seed(11)
    seeds = [draw_seed() for _ in range(64)]
    torch.manual_seed(11)
    assert seeds == [draw_seed() for _ in range(64)]
    assert all(type(s) is int and 0 <= s < 2**62 for s in seeds)
    assert max(seeds) > 2**40
    assert len(set(seeds)) == 64


def test_weight_gradients_keep_the_weights_layout():
    """A row-major weight is not column-major, its transpose is; the empty gradient buffer and
    the decoder's weight gradient take the weight's own strides, with the values of dz^T h."""
    weight = torch.randn(5, 3, dtype=torch.float64)
    assert not reference.column_major(weight) and reference.column_major(weight.t())
    for w in (weight, weight.t()):
        assert reference.empty_in_layout(w).stride() == w.stride()
        assert reference.empty_in_layout(w).shape == w.shape
    h = torch.rand(4, 3, dtype=torch.float64)
    for v in (weight, torch.randn(3, 5, dtype=torch.float64).t()):
        target = torch.rand(4, 5, dtype=torch.float64)
        _, grad_z = reference.decode_forward(h, v, None, target, "identity", "mse")
        grad_loss = torch.rand(4, dtype=torch.float64)
        grad_v = reference.decode_backward(grad_loss, h, v, grad_z, False)[0]
        assert grad_v.stride() == v.stride()
        z = h @ v.t()
        want = (2 * (z - target) * grad_loss[:, None]).t() @ h
        torch.testing.assert_close(grad_v, want, rtol=1e-12, atol=1e-12)


def test_softplus_slope_keeps_tiny_values_in_float32():
    """softplus' slope 1 - e^-h = sigmoid(z) stays accurate where h is tiny (z far below 0):
    the contractive statistics of a float32 softplus layer with z = -25 match sigmoid(z)."""
    h = torch.tensor([1e-10, 1e-20, 3e-30], dtype=torch.float32)
    want = -torch.expm1(-h.double())
    torch.testing.assert_close(reference.slope(h, "softplus").double(), want, rtol=1e-6, atol=0)
    x = torch.ones(3, 2)
    weight = torch.full((4, 2), -12.5)
    _, _, jac, stats = reference.encode_forward(x, weight, None, "softplus", "none", 0, 0, 0, 0)
    s = torch.sigmoid(torch.tensor(-25.0, dtype=torch.float64))
    torch.testing.assert_close(stats[0].double(), (3 * s * s).expand(4), rtol=1e-4, atol=0)
    want_jac = 4 * (3 * s * s) * (2 * 12.5**2) / 3
    torch.testing.assert_close(jac.double(), want_jac, rtol=1e-4, atol=0)


def test_softplus_curvature_survives_a_slope_that_rounds_to_one():
    """softplus'' = sigmoid(z) sigmoid(-z) stays nonzero in float32 where sigmoid(z) rounds to 1
    (z = 18): the contractive term's gradient into the bias is (2/B) w_j sum_i s a'' there."""
    batch = 2
    x = torch.ones(batch, 1)
    weight = torch.full((3, 1), 18.0)
    h, _, jac, stats = reference.encode_forward(x, weight, None, "softplus", "none", 0, 0, 0, 0)
    assert float(reference.slope(h.double(), "softplus")[0, 0]) < 1  # float64: below 1
    _, grad_bias, _ = reference.encode_backward(
        torch.zeros_like(h), None, torch.tensor(1.0), x, weight, h, stats, "softplus", "none",
        0, 0, 0, 0, False,
    )  # fmt: skip
    z = torch.tensor(18.0, dtype=torch.float64)
    s, tail = torch.sigmoid(z), torch.sigmoid(-z)
    want = (2 / batch) * 18.0**2 * batch * s * (s * tail)
    torch.testing.assert_close(grad_bias.double(), want.expand(3), rtol=1e-4, atol=0)


def test_encode_bias_gradient_sums_before_rounding_to_half():
    """In float16 the bias gradient sum_i dz_i is taken over the float32 dz and rounded once:
    two rows of nearly equal slopes and opposite upstream gradients leave their small
    difference, to float16's rounding of the result."""
    hidden = 64
    gen = torch.Generator().manual_seed(0)
    first = (0.05 + 0.4 * torch.rand(hidden, generator=gen)).half()
    h = torch.stack([first, torch.nextafter(first, torch.ones_like(first))])
    grad_h = torch.tensor([[1.0], [-1.0]]).expand(2, hidden).half()
    x = torch.rand(2, 3, generator=gen).half()
    weight = torch.randn(hidden, 3, generator=gen).half()
    stats = torch.zeros(2, hidden)
    _, grad_bias, _ = reference.encode_backward(
        grad_h, None, None, x, weight, h, stats, "sigmoid", "none", 0, 0, 0, 0, False
    )
    assert grad_bias.dtype == torch.float16
    h64 = h.double()
    want = (h64 * (1 - h64) * grad_h.double()).sum(0)
    torch.testing.assert_close(grad_bias.double(), want, rtol=2**-10, atol=1e-7)


@pytest.mark.parametrize(
    "output, loss", [("identity", "mse"), ("sigmoid", "mse"), ("sigmoid", "bce")]
)
def test_decode_reconstruction_is_the_output_activation_of_the_logits(output, loss):
    """decode_forward's x^ is h V^T + c for the identity output and its sigmoid for the
    sigmoid output, whatever the loss."""
    gen = torch.Generator().manual_seed(1)
    h = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    weight = 3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    target = torch.rand(4, 5, generator=gen, dtype=torch.float64)
    out = reference.decode_forward(h, weight, bias, target, output, loss, with_reconstruction=True)
    logits = torch.einsum("bk,dk->bd", h, weight) + bias
    want = logits if output == "identity" else 1 / (1 + torch.exp(-logits))
    torch.testing.assert_close(out[2], want, rtol=1e-12, atol=1e-12)


def test_reparameterize_outputs_are_contiguous_for_a_transposed_mu():
    """z, dmu and dlogvar come back contiguous even for transposed mu and logvar, with the
    values of mu + exp(logvar / 2) eps and of the analytic backward."""
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64).t()
    logvar = torch.randn(4, 3, generator=gen, dtype=torch.float64).t()
    z, kl = reference.reparameterize_forward(mu, logvar, 7)
    eps = reference.standard_normal(7, 3, 4, mu.device).double()
    assert z.is_contiguous()
    torch.testing.assert_close(z, mu + torch.exp(logvar / 2) * eps, rtol=1e-12, atol=1e-12)
    grad_z = torch.randn(4, 3, generator=gen, dtype=torch.float64).t()
    dmu, dlogvar = reference.reparameterize_backward(grad_z, None, mu, logvar, 7)
    assert dmu.is_contiguous() and dlogvar.is_contiguous()
    torch.testing.assert_close(dmu, grad_z, rtol=0, atol=0)
    want = grad_z * eps * torch.exp(logvar / 2) / 2
    torch.testing.assert_close(dlogvar, want, rtol=1e-12, atol=1e-12)
