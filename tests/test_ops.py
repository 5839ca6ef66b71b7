"""The custom ops: gradcheck, opcheck, noise fused into encode, saved bytes, noise statistics,
and backend selection."""

import math
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

import fastae
from fastae import backend, ops, reference
from fastae.noise import GaussianNoise, MaskingNoise, SaltPepperNoise, draw_seed

FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)

ACTIVATIONS = ["sigmoid", "tanh", "relu", "softplus"]
NOISES = {
    "none": None,
    "gaussian": GaussianNoise(sigma=0.4, seed=3),
    "masking": MaskingNoise(p=0.3, seed=2**35 + 1),
    "masking_rescale": MaskingNoise(p=0.3, rescale=True, seed=17),
    "salt_pepper": SaltPepperNoise(p=0.35, low=-1.0, high=2.0, seed=123456),
}
DECODERS = [("sigmoid", "bce"), ("sigmoid", "mse"), ("identity", "mse")]


def layer(batch, d, hidden, dtype=torch.float64, x_grad=True):
    x = torch.rand(batch, d, dtype=dtype).requires_grad_(x_grad)
    weight = (torch.randn(hidden, d, dtype=dtype) * 2 / d**0.5).requires_grad_()
    bias = (torch.randn(hidden, dtype=dtype) * 0.5).requires_grad_()
    return x, weight, bias


def decoder_inputs(batch, d, hidden, dtype=torch.float64):
    h = torch.rand(batch, hidden, dtype=dtype, requires_grad=True)
    weight = (torch.randn(d, hidden, dtype=dtype) * 2 / hidden**0.5).requires_grad_()
    bias = (torch.randn(d, dtype=dtype) * 0.3).requires_grad_()
    target = torch.rand(batch, d, dtype=dtype, requires_grad=True)
    return h, weight, bias, target


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("kind", list(NOISES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_encode(activation, kind):
    x, weight, bias = layer(5, 4, 3)
    noise = NOISES[kind]

    def fn(x, weight, bias):
        return ops.encode(x, weight, bias, activation=activation, noise=noise)

    # full Jacobians without noise; random projections (fast mode) with each noise kind
    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=kind != "none")


@pytest.mark.parametrize(
    "activation, backend_name",
    [(a, "reference") for a in ACTIVATIONS] + [("softplus", "triton")],  # interpreted: slow
)
def test_gradcheck_encode_without_statistics(activation, backend_name, kernel_device):
    if backend_name == "triton":
        pytest.importorskip("triton")
    with torch.device(kernel_device if backend_name == "triton" else "cpu"):
        x, weight, bias = layer(5, 4, 3)

    def fn(x, weight, bias):
        h, rho_hat, jac = ops.encode(
            x, weight, bias, activation=activation, noise=NOISES["masking"], statistics=False
        )
        assert rho_hat is None and jac is None
        return h

    with fastae.use_backend(backend_name):
        assert torch.autograd.gradcheck(fn, (x, weight, bias))
        if backend_name == "reference":  # double backward is the reference math on both
            assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_encode_statistics_must_be_a_bool():
    x, weight, bias = layer(3, 4, 2)
    with pytest.raises(TypeError, match="statistics must be a bool"):
        ops.encode(x, weight, bias, statistics="no")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_encode_without_bias(activation):
    x, weight, _ = layer(3, 6, 4)

    def fn(x, weight):
        return ops.encode(x, weight, None, activation=activation, noise=NOISES["masking"])

    assert torch.autograd.gradcheck(fn, (x, weight))


@pytest.mark.parametrize("kind", [k for k in NOISES if k != "none"])
def test_gradcheck_corrupt(kind):
    x = torch.rand(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.corrupt(x, NOISES[kind]), (x,))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("output, loss", DECODERS)
def test_gradcheck_decode_loss(output, loss, with_bias):
    h, weight, bias, target = decoder_inputs(4, 5, 3)
    if not with_bias:
        bias = None

    def fn(h, weight, target, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        return ops.decode_loss(h, weight, b, target=target, output=output, loss=loss)

    inputs = (h, weight, target) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("output, loss", DECODERS)
def test_decode_loss_without_a_gradient(output, loss):
    """Where no input requires a gradient (torch.no_grad, or detached inputs), the reference
    skips d loss / d x^ and gives the loss and x^ it gives with one; the op run that way by
    hand refuses a backward pass instead of returning wrong gradients."""
    inputs = decoder_inputs(6, 5, 3)
    h, weight, bias, target = inputs

    def run(h, weight, bias, target):
        return ops.decode_loss(
            h, weight, bias, target=target, output=output, loss=loss, return_reconstruction=True
        )

    with_grad = run(*inputs)
    with torch.no_grad():
        scored = run(*inputs)
    detached = run(*(t.detach() for t in inputs))
    for got in (scored, detached):
        for a, b in zip(got, with_grad, strict=True):
            assert torch.equal(a, b.detach())
    assert reference.decode_forward(
        h, weight, bias, target, output, loss, with_gradient=False
    )[1] is None  # fmt: skip
    out = torch.ops.fastae.decode_loss.default(
        h, weight, bias, target, output, loss, "reference", False, False
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="with_gradient=False"):
        out[0].sum().backward()


@pytest.mark.parametrize("output, loss", [("sigmoid", "bce"), ("identity", "mse")])
def test_gradient_of_the_target_alone(output, loss):
    """Only the target requires a gradient (h, weight and bias frozen): decode_loss still
    keeps d ell / d z^ and differentiates with respect to the target."""
    h, weight, bias, target = (t.detach() for t in decoder_inputs(4, 5, 3))

    def fn(target):
        return ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss).sum()

    leaf = target.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(leaf), leaf)
    torch.testing.assert_close(grad, torch.func.grad(fn)(target))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_gradcheck_tied_encode_decode(activation):
    x, weight, bias = layer(4, 5, 3, x_grad=False)
    c = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(weight, bias, c):
        h, rho_hat, jac = ops.encode(
            x, weight, bias, activation=activation, noise=NOISES["salt_pepper"]
        )
        per_sample = ops.decode_loss(h, weight.t(), c, target=x.clamp(0, 1), loss="mse")
        return per_sample.mean() + rho_hat.square().sum() + 0.5 * jac

    assert torch.autograd.gradcheck(fn, (weight, bias, c))


# ----------------------------------------------------------------------------- opcheck


class _RecordFastaeOps(TorchDispatchMode):
    """Records every ``fastae::`` op dispatched (with detached copies of its arguments)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastae":
            copy = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            self.calls.append((func, *copy))
        return func(*args, **kwargs)


def _opcheck_public_call(forward, inputs):
    """opcheck every fastae op that ``forward(*inputs)`` and its backward dispatch, with the
    arguments the public API passes (forward ops get inputs that require grad)."""
    with _RecordFastaeOps() as record_forward:
        outputs = forward(*inputs)
    outputs = [o for o in outputs if o.requires_grad]
    with _RecordFastaeOps() as record_backward:
        grads = [torch.randn_like(o) for o in outputs]
        torch.autograd.backward(outputs, grads)
    assert record_forward.calls and record_backward.calls
    for func, args, kwargs in record_forward.calls:
        args = tree_map_only(
            torch.Tensor, lambda t: t.requires_grad_() if t.is_floating_point() else t, args
        )
        torch.library.opcheck(func, args, kwargs)
    for func, args, kwargs in record_backward.calls:
        torch.library.opcheck(func, args, kwargs)
    return {str(c[0].name()) for c in record_forward.calls + record_backward.calls}


def test_opcheck_corrupt():
    x = torch.rand(5, 7, dtype=torch.float64, requires_grad=True)
    ops_seen = _opcheck_public_call(lambda x: [ops.corrupt(x, NOISES["masking_rescale"])], [x])
    assert any("corrupt" in name for name in ops_seen)


@pytest.mark.parametrize(
    "activation, kind, with_bias, x_grad, dtype",
    [
        ("sigmoid", "none", True, False, torch.float32),
        ("tanh", "masking", False, True, torch.float64),
        ("softplus", "gaussian", True, True, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("statistics", [True, False])
def test_opcheck_encode(activation, kind, with_bias, x_grad, dtype, statistics):
    x, weight, bias = layer(6, 5, 4, dtype=dtype, x_grad=x_grad)
    inputs = [x, weight] + ([bias] if with_bias else [])

    def forward(x, weight, bias=None):
        out = ops.encode(
            x, weight, bias, activation=activation, noise=NOISES[kind], statistics=statistics
        )
        return [t for t in out if t is not None]

    ops_seen = _opcheck_public_call(forward, inputs)
    assert any("encode" in name for name in ops_seen)


@pytest.mark.parametrize(
    "output, loss, target_grad", [("sigmoid", "bce", True), ("identity", "mse", False)]
)
def test_opcheck_decode_loss(output, loss, target_grad):
    h, weight, bias, target = decoder_inputs(5, 6, 3)
    target.requires_grad_(target_grad)

    def forward(h, weight, bias):
        return [ops.decode_loss(h, weight, bias, target=target, output=output, loss=loss)]

    ops_seen = _opcheck_public_call(forward, [h, weight, bias])
    assert any("decode" in name for name in ops_seen)


def test_opcheck_decode_loss_with_tied_weights():
    """A tied decoder weight (the encoder's, transposed: column-major) gets its gradient back
    in that layout, in the fake kernel too."""
    x, weight, _ = layer(5, 6, 3, x_grad=False)
    h = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def forward(h, weight, c):
        return [ops.decode_loss(h, weight.t(), c, target=x)]

    ops_seen = _opcheck_public_call(forward, [h, weight, c])
    assert any("decode" in name for name in ops_seen)


def test_fake_outputs_keep_the_statistics_dtype_of_low_precision_inputs():
    """The fake (meta) kernels give float32 statistics for bfloat16 inputs, as the real ops
    do: decode_loss' per-sample loss, reparameterize's KL and bernoulli_kl's penalty."""
    bf16 = torch.bfloat16
    h, weight, bias, target = (t.detach().to(bf16) for t in decoder_inputs(4, 5, 3))
    calls = [
        (torch.ops.fastae.decode_loss.default,
         (h, weight, bias, target, "sigmoid", "bce", "reference", True, True)),
        (torch.ops.fastae.reparameterize.default,
         (torch.randn(4, 3, dtype=bf16), torch.randn(4, 3, dtype=bf16),
          torch.tensor(7), "reference")),
        (torch.ops.fastae.bernoulli_kl.default,
         (torch.rand(6, dtype=bf16) * 0.8 + 0.1, 0.2, "reference")),
    ]  # fmt: skip
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils="test_faketensor")


@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_opcheck_the_triton_backward_ops(monkeypatch, fusion, stored):
    """The backward ops the triton backend dispatches, opchecked with the arguments its public
    calls pass (x~ stored or regenerated in encode's backward)."""
    if not backend.triton_interpreting():
        pytest.skip("the triton backend on CPU runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "store" if stored else "regenerate")

    def encode(x, weight, bias):
        out = ops.encode(x, weight, bias, activation="tanh", noise=NOISES["salt_pepper"])
        return list(out)

    seen = set()
    with fastae.use_backend("triton"):
        seen |= _opcheck_public_call(encode, list(layer(6, 5, 4)))
        h, weight, bias, target = decoder_inputs(5, 6, 3)
        target.requires_grad_()
        decode = lambda h, weight, bias: [ops.decode_loss(h, weight, bias, target=target)]  # noqa: E731
        seen |= _opcheck_public_call(decode, [h, weight, bias])
    backward = {"encode_backward", "decode_loss_backward", "decode_loss_target_grad"}
    if stored:
        backward.add("corrupt_backward")
    assert {f"fastae::{name}" for name in backward} <= seen


def test_meta_inputs_give_meta_outputs():
    """Shape inference on the meta device goes through the ops' fake implementations."""
    x = torch.empty(4, 5, device="meta")
    weight, bias = torch.empty(3, 5, device="meta"), torch.empty(3, device="meta")
    x_tilde = ops.corrupt(x, MaskingNoise(0.3))
    assert x_tilde.is_meta and x_tilde.shape == (4, 5)
    h, rho_hat, jac = ops.encode(x, weight, bias, noise=MaskingNoise(0.3))
    assert h.is_meta and h.shape == (4, 3) and rho_hat.shape == (3,) and jac.shape == ()
    per_sample = ops.decode_loss(h, weight.t(), None, target=x)
    assert per_sample.is_meta and per_sample.shape == (4,)


@pytest.mark.parametrize("model_class", ["Autoencoder", "VAE"])
def test_a_model_on_the_meta_device_takes_a_training_step(model_class):
    """Shape-only tracing of a whole step (the one-node route, with the BCE target check)."""
    model = fastae.Autoencoder(5, 3) if model_class == "Autoencoder" else fastae.VAE(5, 4, 2)
    out = model.to("meta")(torch.rand(4, 5, device="meta"))
    assert out.loss.is_meta and out.loss.shape == ()
    out.loss.backward()
    assert all(p.grad.is_meta and p.grad.shape == p.shape for p in model.parameters())


# ----------------------------------------------------------------------------- fused noise


@pytest.mark.parametrize("kind", [k for k in NOISES if k != "none"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_with_noise_equals_encode_of_corrupt(dtype, activation, kind):
    noise = NOISES[kind]
    x, weight, bias = layer(7, 33, 17, dtype=dtype)
    fused = ops.encode(x, weight, bias, activation=activation, noise=noise)
    x_tilde = ops.corrupt(x, noise)
    assert not torch.equal(x_tilde, x)
    split = ops.encode(x_tilde, weight, bias, activation=activation)
    for a, b in zip(fused, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    upstream = (torch.randn(7, 17, dtype=dtype), torch.randn(17), torch.randn(()))

    def objective(out):
        h, rho_hat, jac = out
        return (h * upstream[0]).sum() + (rho_hat * upstream[1].to(rho_hat)).sum() + jac

    got = torch.autograd.grad(objective(fused), (x, weight, bias))
    want = torch.autograd.grad(objective(split), (x, weight, bias))
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", ["gaussian", "masking_rescale", "salt_pepper"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_stored_corrupted_input_gives_the_same_values(monkeypatch, backend_name, kind):
    """FASTAE_CORRUPTED_INPUT=store (the default): one corrupt pass writes x~ and backward
    keeps it (one more (B, d) tensor); values and gradients are those of the memory-free
    path."""
    if backend_name == "triton" and not backend.triton_interpreting():
        pytest.skip("the triton backend on CPU runs under TRITON_INTERPRET=1")
    x, weight, bias = layer(9, 21, 6)
    upstream = torch.randn(9, 6, dtype=x.dtype)

    def run():
        (h, rho_hat, jac), saved = _saved_during(
            lambda: ops.encode(x, weight, bias, activation="tanh", noise=NOISES[kind])
        )
        loss = (h * upstream).sum() + rho_hat.sum() + jac
        return (h, rho_hat, jac), torch.autograd.grad(loss, (x, weight, bias)), saved

    with fastae.use_backend(backend_name):
        monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
        out, grads, saved = run()
        monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "store")
        out_stored, grads_stored, saved_stored = run()
    for a, b in zip(out + grads, out_stored + grads_stored, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    def inputs_sized(tensors):
        return [t for t in tensors if t.shape == x.shape and t.data_ptr() != x.data_ptr()]

    assert inputs_sized(saved) == []  # x~ never kept when regenerated
    (x_tilde,) = inputs_sized(saved_stored)
    torch.testing.assert_close(x_tilde, ops.corrupt(x, NOISES[kind]), rtol=0, atol=0)


def test_corrupted_input_mode_is_checked(monkeypatch):
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "cache")
    x, weight, bias = layer(3, 4, 2)
    with pytest.raises(ValueError, match="FASTAE_CORRUPTED_INPUT must be one of"):
        ops.encode(x, weight, bias, noise=NOISES["masking"])
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "auto")
    assert ops.corrupted_input_mode() == "store"


def test_unseeded_noise_follows_torch_manual_seed():
    x, weight, bias = layer(9, 12, 5)
    spec = MaskingNoise(p=0.5)
    assert spec.seed is None
    torch.manual_seed(2024)
    first = ops.corrupt(x, spec)
    following = ops.corrupt(x, spec)
    torch.manual_seed(2024)
    again = ops.corrupt(x, spec)
    assert torch.equal(first, again)
    assert not torch.equal(first, following)

    torch.manual_seed(77)
    out = ops.encode(x, weight, bias, noise=spec)
    torch.manual_seed(77)
    again = ops.encode(x, weight, bias, noise=spec)
    torch.manual_seed(77)
    split = ops.encode(ops.corrupt(x, spec), weight, bias)
    for a, b, c in zip(out, again, split, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    # backward regenerates the very mask the forward drew
    grads = torch.autograd.grad(out[0].sum() + out[2], (x, weight, bias))
    grads_split = torch.autograd.grad(split[0].sum() + split[2], (x, weight, bias))
    for a, b in zip(grads, grads_split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert bool((grads[0] == 0).any()) and bool((grads[0] != 0).any())


def test_noise_spec_with_seed():
    spec = MaskingNoise(p=0.2)
    torch.manual_seed(5)
    concrete = spec.with_seed()
    torch.manual_seed(5)
    assert concrete.seed == draw_seed()
    assert concrete.with_seed().seed == concrete.seed
    assert spec.with_seed(42).seed == 42
    assert spec.seed is None  # specs are immutable


# ----------------------------------------------------------------------------- saved bytes


def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("kind", ["none", "gaussian", "masking_rescale", "salt_pepper"])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_saves_only_h_w_x_and_h_vectors(dtype, x_grad, kind):
    _check_encode_saves_only_h_w_x_and_h_vectors(dtype, x_grad, kind)


@pytest.mark.parametrize("kind", ["none", "gaussian", "masking_rescale", "salt_pepper"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_triton_encode_saves_only_h_w_x_and_h_vectors(fusion, kind, monkeypatch):
    """The kernels' memory-free path (x~ regenerated from the seed in backward)."""
    if not backend.triton_interpreting():
        pytest.skip("the triton backend on CPU runs under TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
    with fastae.use_backend("triton"):
        _check_encode_saves_only_h_w_x_and_h_vectors(torch.float32, True, kind)


def _check_encode_saves_only_h_w_x_and_h_vectors(dtype, x_grad, kind):
    batch, d, hidden = 37, 61, 23
    x, weight, bias = layer(batch, d, hidden, dtype=dtype, x_grad=x_grad)
    (h, rho_hat, jac), saved = _saved_during(
        lambda: ops.encode(x, weight, bias, activation="tanh", noise=NOISES[kind])
    )
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    stat_size = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    # h, W and x are alive anyway; beyond them only statistics over H (c and ||W_j||^2) and
    # the noise seed (an int64 scalar, if it is saved as a tensor at all)
    alive = (h.numel() + weight.numel() + x.numel()) * x.element_size()
    budget = alive + 2 * hidden * stat_size + 8
    assert nbytes <= budget
    big = [t for t in saved if t.numel() >= min(batch, d) * min(hidden, d)]
    assert {t.data_ptr() for t in big} <= {x.data_ptr(), weight.data_ptr(), h.data_ptr()}
    # the saved tensors suffice for backward
    (h.float().sum() + rho_hat.sum() + jac).backward()
    assert weight.grad is not None and bias.grad is not None
    assert (x.grad is not None) == x_grad


@pytest.mark.parametrize("used", [(0,), (0, 1), (0, 2), (0, 1, 2)])
def test_encode_backward_gets_none_for_unused_statistics(used, monkeypatch):
    """rho_hat or jac left out of the loss reach the backward implementation as None (not a
    zero-filled tensor, one memset launch each on the GPU); used ones as tensors."""
    from fastae import reference

    seen = []
    real = reference.encode_backward

    def spy(grad_h, grad_rho, grad_jac, *rest):
        seen.append((grad_rho is not None, grad_jac is not None))
        return real(grad_h, grad_rho, grad_jac, *rest)

    monkeypatch.setattr(reference, "encode_backward", spy)
    x, weight, bias = layer(5, 4, 3)
    with fastae.use_backend("reference"):
        out = ops.encode(x, weight, bias)
        sum(out[i].sum() for i in used).backward()
    assert seen == [(1 in used, 2 in used)]


# ----------------------------------------------------------------------------- noise statistics


def _binomial_ok(count, n, p):
    return abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
def test_masking_rate(p, rescale):
    x = torch.rand(301, 199) + 0.5  # never zero, so zeros are masked entries
    out = ops.corrupt(x, MaskingNoise(p=p, rescale=rescale, seed=2**33 + 9))
    masked = out == 0
    assert _binomial_ok(int(masked.sum()), x.numel(), p)
    scale = 1 / (1 - p) if rescale else 1.0
    torch.testing.assert_close(out[~masked], x[~masked] * scale)
    # masked positions are spread over rows and columns
    assert masked.any(1).float().mean() > 0.5 * (1 - (1 - p) ** 199)
    assert masked.any(0).float().mean() > 0.5 * (1 - (1 - p) ** 301)


def test_masking_p_zero_keeps_everything():
    x = torch.rand(13, 11) + 0.1
    assert torch.equal(ops.corrupt(x, MaskingNoise(p=0.0, seed=1)), x)


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_gaussian_moments(sigma):
    x = torch.rand(257, 311, dtype=torch.float64)
    eps = ops.corrupt(x, GaussianNoise(sigma=sigma, seed=2**40)) - x
    n = eps.numel()
    assert abs(float(eps.mean())) <= 5 * sigma / math.sqrt(n)
    assert abs(float(eps.var()) - sigma**2) <= 5 * sigma**2 * math.sqrt(2 / (n - 1))
    assert abs(float(eps[:, :1].mean()) - float(eps[:, 1:2].mean())) > 0  # not constant


def test_gaussian_sigma_zero_is_identity():
    x = torch.rand(5, 6)
    assert torch.equal(ops.corrupt(x, GaussianNoise(sigma=0.0, seed=3)), x)


def test_salt_pepper_rates():
    x = torch.rand(240, 250)
    p = 0.3
    out = ops.corrupt(x, SaltPepperNoise(p=p, low=-1.0, high=2.0, seed=31337))
    high, low = out == 2.0, out == -1.0
    changed = int((high | low).sum())
    assert _binomial_ok(changed, x.numel(), p)
    assert _binomial_ok(int(high.sum()), changed, 0.5)
    assert torch.equal(out[~(high | low)], x[~(high | low)])


@pytest.mark.parametrize(
    "make", [lambda s: MaskingNoise(0.5, seed=s), lambda s: SaltPepperNoise(0.5, seed=s)]
)
def test_masks_depend_on_seed_and_position_only(make):
    x = torch.rand(64, 48) + 0.5
    first = ops.corrupt(x, make(1)) == x
    assert torch.equal(first, ops.corrupt(x, make(1)) == x)
    assert not torch.equal(first, ops.corrupt(x, make(2)) == x)
    assert not torch.equal(first, ops.corrupt(x, make(2**32 + 1)) == x)
    assert not torch.equal(first[0], first[1])  # rows use different offsets
    # the mask is a function of (seed, row * d + col), not of the values or dtype
    other = torch.rand(64, 48, dtype=torch.float64) + 0.5
    assert torch.equal(first, ops.corrupt(other, make(1)) == other)
    # a non-contiguous input uses its logical indices
    xt = (torch.rand(48, 64) + 0.5).t()
    assert torch.equal(first, ops.corrupt(xt, make(1)) == xt)


# ----------------------------------------------------------------------------- backend


def _preload_kernels():
    """Import kernel modules now, while TRITON_INTERPRET is as the suite set it."""
    for name in ("noise", "encoder", "decoder"):
        ops._kernel_module(name)


def test_kernel_modules_load_only_for_the_triton_backend(monkeypatch):
    """A kernel module that fails to import breaks the triton backend loudly and leaves the
    reference backend alone; a missing kernel file reads as "no kernel for this op"."""
    import importlib

    real_import = importlib.import_module
    failure: list[Exception] = []

    def import_module(name, *args):
        if name.startswith("fastae.kernels."):
            raise failure[0]
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(ops, "_kernel_modules", {})  # forget the modules imported so far
    x, weight = torch.rand(3, 4), torch.rand(2, 4)
    failure.append(ImportError("broken kernel file"))
    with fastae.use_backend("reference"):
        assert ops.encode(x, weight)[0].shape == (3, 2)
    with fastae.use_backend("auto"):  # CPU tensors: auto is the reference backend
        assert ops.encode(x, weight)[0].shape == (3, 2)
    if backend.triton_available() and backend.triton_interpreting():
        with fastae.use_backend("triton"), pytest.raises(ImportError, match="broken kernel"):
            ops.encode(x, weight)
        failure[0] = ModuleNotFoundError("gone", name="fastae.kernels.encoder")
        with fastae.use_backend("triton"), pytest.raises(RuntimeError, match="no Triton kernel"):
            ops.encode(x, weight)


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
def test_a_kernel_files_missing_dependency_propagates(monkeypatch):
    """A kernel file that exists but imports a missing module raises; only the kernel file's
    own absence reads as "no kernel"."""
    import importlib

    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "fastae.kernels.encoder":
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(ops, "_kernel_modules", {})
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        ops._kernel_module("encoder")


def test_default_backend_is_auto_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    assert fastae.get_backend() == "auto"
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert backend.resolve("encode", torch.device("cpu")) == "reference"


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
def test_auto_takes_triton_for_cuda_tensors(monkeypatch):
    """auto picks the kernels for CUDA tensors where Triton is new enough, and the reference
    for an op without a kernel (decided on the device object alone: no GPU needed)."""
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert backend.resolve("encode", cuda) == "triton"
    assert backend.resolve("encode", cuda, supported=False) == "reference"


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
@pytest.mark.parametrize("version", ["3.3.1", "3.5.1"])
def test_a_triton_older_than_the_kernels_need(monkeypatch, version):
    """With Triton older than backend.MIN_TRITON installed, auto takes the reference backend
    on CUDA too, and triton asked for by name says which version is there."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    backend.triton_missing.cache_clear()
    try:
        assert not backend.triton_available()
        monkeypatch.delenv("FASTAE_BACKEND", raising=False)
        assert backend.resolve("encode", torch.device("cuda")) == "reference"
        with fastae.use_backend("triton"), pytest.raises(RuntimeError, match=f"Triton {version}"):
            backend.resolve("encode", torch.device("cuda"))
    finally:
        monkeypatch.undo()
        backend.triton_missing.cache_clear()
    assert backend.triton_available()


@pytest.mark.skipif(not backend.triton_available(), reason="needs Triton installed")
@pytest.mark.parametrize("version", ["3.6.0", "3.6.0+git1a2b3c", "4.0.0"])
def test_the_oldest_triton_the_kernels_need_and_newer_are_taken(monkeypatch, version):
    """backend.MIN_TRITON itself (3.6, a local build included) is new enough."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    backend.triton_missing.cache_clear()
    try:
        assert backend.triton_missing() == ""
    finally:
        monkeypatch.undo()
        backend.triton_missing.cache_clear()


def test_triton_asked_for_without_it_says_where_its_kernels_run(monkeypatch):
    """On a machine without Triton (and without CUDA) installing it alone would not run the
    kernels on CPU tensors: the error says both."""
    missing = "Triton is not installed (pip install 'fastae[triton]')"
    monkeypatch.setattr(backend, "triton_missing", lambda: missing)
    advice = r"not installed \(pip install 'fastae\[triton\]'\)"
    with fastae.use_backend("triton"):
        cpu = advice + r", and its kernels run on CUDA tensors .*got a tensor on cpu$"
        with pytest.raises(RuntimeError, match=cpu):
            backend.resolve("encode", torch.device("cpu"))
        with pytest.raises(RuntimeError, match=advice + "$"):
            backend.resolve("encode", torch.device("cuda"))


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("FASTAE_BACKEND", "reference")
    assert fastae.get_backend() == "reference"
    monkeypatch.setenv("FASTAE_BACKEND", "triton")
    assert fastae.get_backend() == "triton"
    monkeypatch.setenv("FASTAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTAE_BACKEND"):
        fastae.get_backend()
    with pytest.raises(ValueError, match="FASTAE_BACKEND"):
        ops.encode(torch.rand(2, 3), torch.rand(4, 3))


def test_set_backend_and_use_backend(monkeypatch):
    monkeypatch.setenv("FASTAE_BACKEND", "triton")
    fastae.set_backend("reference")
    assert fastae.get_backend() == "reference"  # set_backend wins over the env var
    with fastae.use_backend("auto"):
        assert fastae.get_backend() == "auto"
        with fastae.use_backend("triton"):
            assert fastae.get_backend() == "triton"
        assert fastae.get_backend() == "auto"
    assert fastae.get_backend() == "reference"
    with pytest.raises(KeyError), fastae.use_backend("triton"):
        raise KeyError("inside")
    assert fastae.get_backend() == "reference"
    fastae.set_backend("auto")
    assert fastae.get_backend() == "auto"


def test_set_backend_inside_use_backend_outlives_the_block(monkeypatch):
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    with fastae.use_backend("reference"):
        fastae.set_backend("reference")
    assert fastae.get_backend() == "reference"  # leaving the block does not undo set_backend
    with fastae.use_backend("auto"):
        fastae.set_backend("triton")
        assert fastae.get_backend() == "auto"  # the block still wins while it lasts
    assert fastae.get_backend() == "triton"


def test_set_backend_inside_nested_use_backend(monkeypatch):
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    with fastae.use_backend("auto"):
        with fastae.use_backend("reference"):
            fastae.set_backend("auto")
            assert fastae.get_backend() == "reference"
        assert fastae.get_backend() == "auto"
        fastae.set_backend("reference")
        assert fastae.get_backend() == "auto"
    assert fastae.get_backend() == "reference"


def test_use_backend_is_per_thread(monkeypatch):
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    fastae.set_backend("auto")
    both_inside, seen, errors = threading.Barrier(2, timeout=10), {}, []

    def worker(name):
        try:
            seen[name, "before"] = fastae.get_backend()
            with fastae.use_backend(name):
                both_inside.wait()  # each thread is now inside its own block
                seen[name, "inside"] = fastae.get_backend()
                both_inside.wait()  # neither leaves before both have looked
            seen[name, "after"] = fastae.get_backend()
        except Exception as error:  # reported by the main thread
            errors.append(error)

    with fastae.use_backend("triton"):  # the main thread's block is not the workers'
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "auto")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert fastae.get_backend() == "triton"
    assert not errors
    for name in ("reference", "auto"):
        assert seen[name, "before"] == "auto"  # set_backend's default holds in every thread
        assert seen[name, "inside"] == name
        assert seen[name, "after"] == "auto"
    assert fastae.get_backend() == "auto"


def test_reference_and_auto_agree_on_cpu():
    x, weight, bias = layer(6, 7, 5)
    with fastae.use_backend("reference"):
        want = ops.encode(x, weight, bias, noise=NOISES["masking"])
    with fastae.use_backend("auto"):
        got = ops.encode(x, weight, bias, noise=NOISES["masking"])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _triton_calls(x):
    h = torch.rand(x.shape[0], 3)
    return {
        "encode": lambda: ops.encode(x, torch.rand(3, x.shape[1])),
        "corrupt": lambda: ops.corrupt(x, MaskingNoise(0.5, seed=1)),
        "decode_loss": lambda: ops.decode_loss(h, torch.rand(x.shape[1], 3), target=x),
    }


@pytest.mark.parametrize("how", ["set_backend", "use_backend", "env"])
@pytest.mark.parametrize("op", ["encode", "corrupt", "decode_loss"])
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, how, op):
    _preload_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call = _triton_calls(torch.rand(4, 5))[op]
    if how == "env":
        monkeypatch.setenv("FASTAE_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="triton"):
            call()
    elif how == "set_backend":
        fastae.set_backend("triton")
        with pytest.raises(RuntimeError, match="triton"):
            call()
    else:
        with fastae.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
            call()
    # never a silent fallback, but the reference backend still works
    with fastae.use_backend("reference"):
        call()


@pytest.mark.parametrize("value", ["0", "", "false", "off", "no", "2", " 1", "1", "true", "on"])
def test_triton_interpret_read_as_triton_reads_it(monkeypatch, value):
    """``TRITON_INTERPRET=false`` turns the interpreter off for Triton: fastae must not take it
    for on (it would send CPU tensors to a GPU launch, and compile for the GPU with the
    interpreter's one small tile)."""
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend.triton_interpreting() == bool(triton.knobs.runtime.interpret)
    assert backend.triton_interpreting() == (value in ("1", "true", "on"))


def test_resolve_triton(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fastae.use_backend("triton"):
        with pytest.raises(RuntimeError, match="my_op"):
            backend.resolve("my_op", cpu, supported=False)
        with pytest.raises(RuntimeError, match="meta"):
            backend.resolve("my_op", torch.device("meta"))
        if backend.triton_available():
            assert backend.resolve("my_op", cpu) == "triton"
        else:
            with pytest.raises(RuntimeError, match="not installed"):
                backend.resolve("my_op", cpu)
    with fastae.use_backend("auto"):
        assert backend.resolve("my_op", cpu, supported=False) == "reference"
    with fastae.use_backend("reference"):
        assert backend.resolve("my_op", torch.device("meta")) == "reference"


@pytest.mark.parametrize("output, loss", DECODERS)
def test_decode_loss_with_no_output_features_is_zero(output, loss):
    h = torch.rand(3, 4, requires_grad=True)
    per_sample = ops.decode_loss(
        h, torch.randn(0, 4), target=torch.rand(3, 0), output=output, loss=loss
    )
    torch.testing.assert_close(per_sample, torch.zeros(3))
    per_sample.sum().backward()
    torch.testing.assert_close(h.grad, torch.zeros(3, 4))
