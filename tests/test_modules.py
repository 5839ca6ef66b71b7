"""fastae.Autoencoder, its penalties, fastae.fit, and behaviour on the digits data set."""

import contextlib
import copy
import fractions
import functools
import math
import pickle
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import fastae
from fastae import ops
from fastae.modules import StackModule
from fastae.training import _mean_loss

ACT_FN = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "softplus": F.softplus}


def naive_kl(rho, rho_hat):
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def brute_jacobian_norm(model, x):
    """Batch mean of ||d h(x_i) / d x_i||_F^2 by jacrev."""
    act = ACT_FN[model.activation]

    def code(xi):
        return act(model.weight @ xi + model.bias)

    jacobians = torch.func.vmap(torch.func.jacrev(code))(x)
    return jacobians.square().sum((1, 2)).mean()


# ----------------------------------------------------------------------------- forward


CONFIGS = {
    "plain": dict(),
    "kl+contractive": dict(sparsity=fastae.KLSparsity(0.1, weight=0.5), contractive=0.3),
    "l1-tanh-untied-mse": dict(
        activation="tanh",
        output="identity",
        loss="mse",
        tied=False,
        sparsity=fastae.L1Sparsity(0.2),
        contractive=0.1,
    ),  # fmt: skip
    "l1-relu": dict(activation="relu", sparsity=fastae.L1Sparsity(0.05)),
    "softplus-sigmoid-mse": dict(activation="softplus", loss="mse", contractive=1.0),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_fields(config):
    kwargs = CONFIGS[config]
    model = fastae.Autoencoder(11, 6, **kwargs).double()
    x = torch.rand(9, 11, dtype=torch.float64)
    out = model(x)
    assert isinstance(out, fastae.AutoencoderOutput)
    assert out.code.shape == (9, 6) and out.per_sample.shape == (9,)
    assert out.loss.shape == out.reconstruction_loss.shape == ()
    torch.testing.assert_close(out.reconstruction_loss, out.per_sample.mean(), rtol=0, atol=0)
    expected = out.reconstruction_loss + sum(out.penalties.values())
    torch.testing.assert_close(out.loss, expected, rtol=1e-14, atol=0)

    act = ACT_FN[model.activation]
    h = act(x @ model.weight.t() + model.bias)
    torch.testing.assert_close(out.code, h)
    if model.needs_statistics:
        torch.testing.assert_close(out.jacobian_norm, brute_jacobian_norm(model, x))
    else:  # no penalty needs the statistics: the encoder computes h alone
        assert out.jacobian_norm is None

    z = h @ model.decoder_matrix.t() + model.decoder_bias
    if model.loss_name == "bce":
        per_sample = F.binary_cross_entropy_with_logits(z, x, reduction="none").sum(1)
    else:
        x_hat = torch.sigmoid(z) if model.output == "sigmoid" else z
        per_sample = (x_hat - x).square().sum(1)
    torch.testing.assert_close(out.per_sample, per_sample)

    sparsity = kwargs.get("sparsity")
    assert ("sparsity" in out.penalties) == (sparsity is not None)
    assert ("contractive" in out.penalties) == bool(kwargs.get("contractive"))
    if isinstance(sparsity, fastae.KLSparsity):
        want = sparsity.weight * naive_kl(sparsity.rho, h.mean(0))
        torch.testing.assert_close(out.penalties["sparsity"], want)
    elif isinstance(sparsity, fastae.L1Sparsity):
        want = sparsity.weight * h.abs().sum(1).mean()
        torch.testing.assert_close(out.penalties["sparsity"], want)
    if kwargs.get("contractive"):
        want = kwargs["contractive"] * brute_jacobian_norm(model, x)
        torch.testing.assert_close(out.penalties["contractive"], want)

    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


@pytest.mark.parametrize("config", ["kl+contractive", "l1-tanh-untied-mse"])
@pytest.mark.parametrize("noise", [None, fastae.MaskingNoise(0.3, seed=8)])
def test_gradcheck_model_loss(config, noise):
    model = fastae.Autoencoder(5, 3, noise=noise, **CONFIGS[config]).double()
    with torch.no_grad():
        model.decoder_bias.normal_()
        model.bias.normal_()
    x = torch.rand(4, 5, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def loss(*values):
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,)).loss

    assert torch.autograd.gradcheck(loss, params)


def test_kl_penalty_stays_finite_for_saturated_units():
    kl = fastae.KLSparsity(0.05, weight=2.0)
    rho_hat = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    value = kl.penalty(None, rho_hat)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, rho_hat)
    assert torch.isfinite(grad).all()
    inner = torch.tensor([0.3], dtype=torch.float64)
    torch.testing.assert_close(kl.penalty(None, inner), 2.0 * naive_kl(0.05, inner))


def test_encode_decode_reconstruct_and_error():
    model = fastae.Autoencoder(7, 4)
    x = torch.rand(5, 7)
    h = torch.sigmoid(x @ model.weight.t() + model.bias)
    torch.testing.assert_close(model.encode(x), h)
    x_hat = torch.sigmoid(h @ model.weight + model.decoder_bias)
    torch.testing.assert_close(model.decode(h), x_hat)
    torch.testing.assert_close(model.reconstruct(x), x_hat)
    error = model.reconstruction_error(x)
    torch.testing.assert_close(error, F.binary_cross_entropy(x_hat, x, reduction="none").sum(1))
    model.eval()
    torch.testing.assert_close(model(x).per_sample, error, rtol=0, atol=0)


@pytest.mark.parametrize(
    "activation, output, loss, tied",
    [
        ("tanh", "identity", "mse", False),
        ("relu", "sigmoid", "mse", True),
        ("softplus", "identity", "mse", True),
        ("sigmoid", "sigmoid", "bce", False),
    ],
)
def test_encode_and_reconstruction_error_follow_the_layers_and_never_corrupt(
    activation, output, loss, tied
):
    """encode, reconstruct and reconstruction_error with each activation, output and loss,
    in float64 by hand, of the clean input also in training mode (noise corrupts the forward
    alone), equal to the eval forward's code and per-sample loss."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(
        7, 4, activation=activation, output=output, loss=loss, tied=tied,
        noise=fastae.MaskingNoise(0.5), dtype=torch.float64,
    ).train()  # fmt: skip
    x = torch.rand(5, 7, dtype=torch.float64)
    with torch.no_grad():
        h = ACT_FN[activation](x @ model.weight.t() + model.bias)
        logits = h @ model.decoder_matrix.t() + model.decoder_bias
        x_hat = torch.sigmoid(logits) if output == "sigmoid" else logits
        if loss == "bce":
            want = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum(1)
        else:
            want = (x_hat - x).square().sum(1)
        tol = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.encode(x), h, **tol)
        torch.testing.assert_close(model.reconstruct(x), x_hat, **tol)
        torch.testing.assert_close(model.reconstruction_error(x), want, **tol)
        clean = model.eval()(x)
    torch.testing.assert_close(clean.code, h, **tol)
    torch.testing.assert_close(clean.per_sample, want, **tol)


def test_deep_encode_and_reconstruction_error_never_corrupt():
    """A deep model's noise corrupts its training forward alone: encode and
    reconstruction_error in training mode read the clean input, as the eval forward does."""
    torch.manual_seed(0)
    model = fastae.DeepAutoencoder(7, (6, 4), noise=fastae.MaskingNoise(0.5, seed=1)).train()
    x = torch.rand(5, 7)
    with torch.no_grad():
        code, error = model.encode(x), model.reconstruction_error(x)
        assert not torch.equal(model(x).code, code)  # the training forward is corrupted
        clean = model.eval()(x)
    torch.testing.assert_close(code, clean.code, rtol=0, atol=0)
    torch.testing.assert_close(error, clean.per_sample, rtol=0, atol=0)


@pytest.mark.parametrize("grad", ["no_grad", "input requires grad"])
def test_bce_inputs_are_checked_off_the_one_node_step_too(grad):
    """The forward composed from the ops (no gradient to record, or a gradient for x, which
    the one-node step does not give) checks a BCE model's inputs as the one node does."""
    model, x = fastae.Autoencoder(6, 5), torch.rand(4, 6) * 3
    context = torch.no_grad() if grad == "no_grad" else contextlib.nullcontext()
    if grad != "no_grad":
        x.requires_grad_()
    with context, pytest.raises(ValueError, match=r"^x must lie in \[0, 1\]"):
        model(x)


def test_initialisation_is_xavier_uniform_with_zero_biases():
    """Weights as torch.nn.init.xavier_uniform_ draws them, in construction order (encoder,
    then an untied decoder), under the same seed; biases zero."""
    for tied in (True, False):
        torch.manual_seed(3)
        model = fastae.Autoencoder(9, 4, tied=tied)
        torch.manual_seed(3)
        weight = torch.nn.init.xavier_uniform_(torch.empty(4, 9))
        torch.testing.assert_close(model.weight, weight, rtol=0, atol=0)
        if not tied:
            decoder = torch.nn.init.xavier_uniform_(torch.empty(9, 4))
            torch.testing.assert_close(model.decoder_weight, decoder, rtol=0, atol=0)
        assert not model.bias.any() and not model.decoder_bias.any()


def test_repr_names_the_regularizers_set():
    plain = fastae.Autoencoder(6, 3)
    assert "sparsity" not in repr(plain) and "contractive" not in repr(plain)
    model = fastae.Autoencoder(
        6, 3, sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.3, noise=fastae.MaskingNoise(0.2)
    )
    text = repr(model)
    for part in (repr(model.sparsity), "contractive=0.3", repr(model.noise)):
        assert part in text, part


@pytest.mark.parametrize(
    "make",
    [
        lambda output: fastae.Autoencoder(7, 4, output=output, loss="mse"),
        lambda output: fastae.DeepAutoencoder(7, (5, 4), output=output, loss="mse"),
        lambda output: fastae.VAE(7, 5, 4, output=output, loss="mse"),
        lambda output: StackModule(
            [fastae.Autoencoder(7, 5, output=output, loss="mse"), fastae.Autoencoder(5, 4)]
        ),
    ],
    ids=["autoencoder", "deep", "vae", "stack"],
)
def test_decode_gives_the_output_layers_logits(make):
    """decode(h, logits=True): the pre-activation the output activation maps to x^."""
    h = torch.rand(3, 4)
    sigmoid, identity = make("sigmoid"), make("identity")
    identity.load_state_dict(sigmoid.state_dict())
    logits = sigmoid.decode(h, logits=True)
    torch.testing.assert_close(torch.sigmoid(logits), sigmoid.decode(h), rtol=0, atol=0)
    torch.testing.assert_close(identity.decode(h, logits=True), logits, rtol=0, atol=0)
    torch.testing.assert_close(identity.decode(h), logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="logits"):
        sigmoid.decode(h, logits="yes")


@pytest.mark.parametrize("vae", [False, True])
def test_check_targets_covers_the_loss_and_the_reconstruction_error(vae):
    def make(**kwargs):
        return fastae.VAE(6, 5, 2, **kwargs) if vae else fastae.Autoencoder(6, 5, **kwargs)

    x = torch.rand(4, 6) * 3
    checked = make().eval()
    for method in (checked, checked.reconstruction_error):
        with pytest.raises(ValueError, match="^x must lie in"):
            method(x)
    unchecked = make(check_targets=False).eval()
    unchecked.load_state_dict(checked.state_dict())
    error = unchecked.reconstruction_error(x)
    assert error.shape == (4,) and error.isfinite().all()
    out = unchecked(x)  # eval: a VAE's z = mu, as its reconstruction_error
    torch.testing.assert_close(out.reconstruction if vae else out.per_sample, error)


def test_untied_and_tied_parameters():
    tied = fastae.Autoencoder(7, 4)
    untied = fastae.Autoencoder(7, 4, tied=False, output="identity", loss="mse")
    assert tied.decoder_weight is None
    assert tied.decoder_matrix.shape == (7, 4)
    assert tied.decoder_matrix.data_ptr() == tied.weight.data_ptr()
    assert {n for n, _ in tied.named_parameters()} == {"weight", "bias", "decoder_bias"}
    assert untied.decoder_weight.shape == (7, 4)
    assert untied.decoder_matrix is untied.decoder_weight
    assert {n for n, _ in untied.named_parameters()} == {
        "weight", "bias", "decoder_weight", "decoder_bias",
    }  # fmt: skip
    x = torch.rand(5, 7)
    h = untied.encode(x)
    torch.testing.assert_close(untied.decode(h), h @ untied.decoder_weight.t())
    assert not torch.allclose(untied.decoder_weight, untied.weight.t())
    # the untied decoder's gradient reaches its own weight, not the encoder's through it
    untied.reconstruction_error(x).sum().backward()
    assert untied.decoder_weight.grad is not None and untied.weight.grad is not None
    text = repr(untied)
    assert "7 -> 4" in text and "tied=False" in text and "'mse'" in text


def test_noise_only_in_training_mode():
    spec = fastae.MaskingNoise(0.5)
    model = fastae.Autoencoder(12, 5, noise=spec)
    x = torch.rand(8, 12)
    model.train()
    first, second = model(x), model(x)
    assert not torch.equal(first.per_sample, second.per_sample)
    model.eval()
    clean = model(x)
    torch.testing.assert_close(clean.per_sample, model.reconstruction_error(x), rtol=0, atol=0)
    torch.testing.assert_close(clean.code, model.encode(x), rtol=0, atol=0)

    seeded = fastae.Autoencoder(12, 5, noise=fastae.MaskingNoise(0.5, seed=4)).train()
    out = seeded(x)
    x_tilde = ops.corrupt(x, seeded.noise)
    torch.testing.assert_close(out.code, seeded.encode(x_tilde), rtol=0, atol=0)
    # the target is the clean input
    want = ops.decode_loss(out.code, seeded.weight.t(), seeded.decoder_bias, target=x)
    torch.testing.assert_close(out.per_sample, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    model = fastae.Autoencoder(16, 8, sparsity=fastae.KLSparsity(0.1), contractive=0.2).to(dtype)
    x = torch.rand(6, 16).to(dtype)
    out = model(x)
    assert out.code.dtype == dtype
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    reference = fastae.Autoencoder(16, 8, sparsity=fastae.KLSparsity(0.1), contractive=0.2)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(out.loss, reference(x.float()).loss, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())


# ----------------------------------------------------------------------------- fit


def small_problem(n=96, d=10):
    basis = torch.rand(3, d)
    return (torch.rand(n, 3) @ basis / 3).clamp(0, 1)


def new_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return fastae.Autoencoder(10, 4, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda **made: fastae.Autoencoder(6, 4, tied=False, **made),
        lambda **made: fastae.DeepAutoencoder(6, (5, 3), **made),
        lambda **made: fastae.VAE(6, (5, 4), 2, **made),
    ],
    ids=["autoencoder", "deep", "vae"],
)
def test_modules_take_device_and_dtype_as_torch_layers_do(make):
    """device= and dtype= make and initialise the parameters there (as nn.Linear's): float32
    parameters made under a float64 default are those made under the float32 default."""
    torch.manual_seed(0)
    usual = make().state_dict()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        made = make(dtype=torch.float32).state_dict()
        assert {v.dtype for v in make().state_dict().values()} == {torch.float64}
    finally:
        torch.set_default_dtype(default)
    assert made.keys() == usual.keys()
    for name, value in usual.items():
        assert torch.equal(made[name], value), name
    with torch.device("meta"):
        on_cpu = make(device="cpu", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in on_cpu.parameters()} == {("cpu", torch.float64)}
    assert {p.device.type for p in make(device="meta").parameters()} == {"meta"}
    # deferred initialisation: made on the meta device, then given memory and initialised
    deferred = make(device="meta").to_empty(device="cpu")
    torch.manual_seed(0)
    deferred.reset_parameters()
    for name, value in deferred.state_dict().items():
        assert torch.equal(value, usual[name]), name


def test_fastae_keeps_its_own_tensors_on_the_cpu_under_another_default_device():
    """Imported, noise specs made, and a CPU model fitted while torch's default device is the
    meta device (deferred-initialisation code leaves it so): fastae's own scalars (seeds,
    shuffling orders, checks) live on the CPU, not on the default device."""
    import subprocess
    import sys

    code = """if True:
        import torch
        torch.set_default_device("meta")
        import fastae
        noise = fastae.MaskingNoise(0.2)
        model = fastae.Autoencoder(6, 3, noise=noise, device="cpu")
        data = torch.rand(20, 6, device="cpu")
        history = fastae.fit(model, data, epochs=2, batch_size=8, progress=False)
        array = fastae.fit(model, data.numpy(), epochs=1, batch_size=8, progress=False)
        torch.set_default_device(None)
        h = fastae.ops.encode(torch.rand(4, 6), model.weight.detach())[0]
        print(len(history.loss) + len(array.loss), h.device, torch.isfinite(h).all().item())
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "cpu", "True"]


def test_fit_tensor_input():
    data = small_problem()
    model = new_model()
    history = fastae.fit(model, data, epochs=6, batch_size=16, lr=0.03, seed=0, progress=False)
    assert isinstance(history, fastae.History)
    assert len(history.loss) == 6 and history.val_loss == []
    assert all(math.isfinite(v) for v in history.loss)
    assert history.loss[-1] < 0.95 * history.loss[0]
    assert not history.stopped_early and history.seconds > 0
    assert history.best_epoch == int(np.argmin(history.loss))
    assert not model.training


def test_fit_seeds_torch_as_manual_seed_does(monkeypatch):
    """fit's seed: the draws of torch.manual_seed(seed), which it skips (its CUDA
    bookkeeping) where there is no accelerator to seed or the run is on the CPU."""
    fastae.training.seed_torch(5)
    draws = torch.rand(4), torch.randint(0, 9, (3,))
    torch.manual_seed(5)
    assert torch.equal(draws[0], torch.rand(4)) and torch.equal(draws[1], torch.randint(0, 9, (3,)))
    calls = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(seed))
    fastae.training.seed_torch(5)
    assert calls == ([5] if torch.accelerator.is_available() else [])
    # a run on the CPU seeds the CPU's generator alone, accelerators or not
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    calls.clear()
    fastae.training.seed_torch(5, torch.device("cpu"))
    assert torch.equal(draws[0], torch.rand(4)) and calls == []
    # a run on a GPU: the CPU's and that GPU's own
    generators = (torch.Generator(), torch.Generator())
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    fastae.training.seed_torch(7, torch.device("cuda", 1))
    assert [g.initial_seed() for g in generators] == [torch.Generator().initial_seed(), 7]
    assert torch.initial_seed() == 7 and calls == []


def test_fit_dataloader_numpy_and_list_inputs():
    data = small_problem()
    loader = DataLoader(TensorDataset(data), batch_size=16, shuffle=False)
    numpy_data = data.numpy().astype(np.float64)  # takes the model's dtype
    kwargs = dict(epochs=3, lr=0.03, seed=1, progress=False)
    batching = dict(shuffle=False, batch_size=16)  # of the tensor data fit batches itself
    histories = []
    dataset = Subset(TensorDataset(data), range(len(data)))  # collated row by row
    for source, more in ((loader, {}), (numpy_data, batching), (list(data.split(16)), {}),
                         (data, batching), (TensorDataset(data), batching),
                         (dataset, batching)):  # fmt: skip
        model = new_model(seed=3)
        histories.append(fastae.fit(model, source, **kwargs, **more).loss)
    assert histories[0][-1] < histories[0][0]
    # the same batches in the same order: identical training whatever the container
    for other in histories[1:]:
        assert other == pytest.approx(histories[0], rel=1e-6)


def test_fit_shuffles_and_drops_a_dataset_as_it_does_a_tensor():
    """A map-style Dataset is batched as tensor data is: the same permutation an epoch from
    the same seed, and with drop_last the same shorter last batch left out (here 100 rows in
    batches of 16: 96 rows an epoch)."""
    data = small_problem(n=100)
    dataset = Subset(TensorDataset(data), range(len(data)))
    kwargs = dict(epochs=3, lr=0.03, seed=1, progress=False, batch_size=16)
    for more in ({}, {"drop_last": True}):
        losses = [fastae.fit(new_model(seed=3), source, **kwargs, **more).loss
                  for source in (data, TensorDataset(data), dataset)]  # fmt: skip
        assert losses[1] == losses[0] and losses[2] == pytest.approx(losses[0], rel=1e-6)
    ordered = dict(kwargs, shuffle=False)
    dropped = fastae.fit(new_model(seed=3), data, drop_last=True, **ordered).loss
    assert dropped == fastae.fit(new_model(seed=3), data[:96], **ordered).loss
    assert dropped != fastae.fit(new_model(seed=3), data, **ordered).loss


def test_fit_drop_last_spares_batch_norm_a_batch_of_one_row():
    class Normalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3))
            self.decoder = torch.nn.Linear(3, 6)

        def forward(self, x):
            return SimpleNamespace(loss=(self.decoder(self.encoder(x)) - x).pow(2).mean())

    rows = torch.rand(129, 6)  # batches of 128 leave one row
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastae.fit(Normalized(), rows, epochs=1, progress=False)
    history = fastae.fit(Normalized(), rows, epochs=2, drop_last=True, progress=False)
    assert len(history.loss) == 2 and all(math.isfinite(loss) for loss in history.loss)


@pytest.mark.parametrize("container", ["tensor", "list"])
def test_fit_trains_the_model_not_data_that_requires_grad(container):
    """Data that requires grad (a leaf of the user's graph, an nn.Parameter) is read, not
    differentiated: no gradient lands in it, and the model trains as on plain data."""
    data = small_problem()
    kwargs = dict(epochs=2, lr=0.03, seed=1, progress=False)
    plain = fastae.fit(new_model(seed=3), data, batch_size=16, **kwargs).loss
    leaf = data.clone().requires_grad_()
    if container == "tensor":
        assert fastae.fit(new_model(seed=3), leaf, batch_size=16, **kwargs).loss == plain
    else:
        plain = fastae.fit(new_model(seed=3), list(data.split(16)), **kwargs).loss
        assert fastae.fit(new_model(seed=3), list(leaf.split(16)), **kwargs).loss == plain
    assert leaf.grad is None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_trains_whatever_the_callers_grad_mode(mode, shuffle):
    """fit inside torch.no_grad() or torch.inference_mode(), on data made there, trains as
    outside it (inference tensors, which autograd cannot save for backward, are copied)."""
    data = small_problem()
    kwargs = dict(epochs=2, lr=0.03, batch_size=16, seed=1, progress=False, shuffle=shuffle)
    expected = fastae.fit(new_model(seed=3), data, validation_data=data[:8], **kwargs)
    model = new_model(seed=3)
    with getattr(torch, mode)():
        made_here = data.clone()
        history = fastae.fit(model, made_here, validation_data=made_here[:8], **kwargs)
    assert (history.loss, history.val_loss) == (expected.loss, expected.val_loss)
    assert model.weight.requires_grad and not model.weight.is_inference()
    if not shuffle:  # the same batches as a list made there
        model = new_model(seed=3)
        with getattr(torch, mode)():
            batches = list(data.clone().split(16))
            kwargs = dict(epochs=2, lr=0.03, seed=1, progress=False)  # the batches as given
            history = fastae.fit(model, batches, validation_data=[batches[0][:8]], **kwargs)
        assert (history.loss, history.val_loss) == (expected.loss, expected.val_loss)


def test_fit_refuses_a_model_made_under_inference_mode():
    """Its parameters (lazy ones too) or buffers are inference tensors, which no update may
    change outside that mode."""

    class Lazy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.LazyLinear(4)

        def forward(self, x):
            return SimpleNamespace(loss=self.layer(x).square().mean())

    class Normalized(Lazy):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(small_problem().shape[1], affine=False)

        def forward(self, x):
            return super().forward(self.norm(x))

    for make in (lambda: new_model(seed=3), Lazy, Normalized):
        fastae.fit(make(), small_problem(), epochs=1, progress=False)  # made outside: trains
        with torch.inference_mode():
            model = make()
        if make is Normalized:
            model.layer = torch.nn.LazyLinear(4)  # made outside: only the buffers are inference
        with pytest.raises(ValueError, match=r"^model's parameters or buffers were made under"):
            fastae.fit(model, small_problem(), epochs=1, progress=False)


def test_fit_converts_array_data_once(monkeypatch):
    """numpy data in another dtype than the model's is converted once (the copy trained on
    is the one the BCE range check reads), not once for batching and again for the check."""
    import fastae.training

    data = small_problem().numpy().astype(np.float64)
    conversions = []
    as_tensor = torch.as_tensor

    def counted(*args, **kwargs):
        conversions.append(args[0].shape)
        return as_tensor(*args, **kwargs)

    monkeypatch.setattr(fastae.training.torch, "as_tensor", counted)
    model = fastae.Autoencoder(data.shape[1], 4, output="sigmoid", loss="bce")
    fastae.fit(model, data[:48], validation_data=data[48:], epochs=1, progress=False)
    assert conversions == [(48, data.shape[1]), (data.shape[0] - 48, data.shape[1])]


def test_fit_takes_arrays_with_negative_strides():
    data = small_problem()
    kwargs = dict(epochs=2, lr=0.03, batch_size=16, seed=1, progress=False, shuffle=False)
    flipped = data.numpy()[::-1]
    expected = fastae.fit(new_model(seed=3), data.flip(0), **kwargs).loss
    assert fastae.fit(new_model(seed=3), flipped, **kwargs).loss == expected


def test_fit_takes_arrays_of_any_byte_order_and_width():
    data = small_problem()
    kwargs = dict(epochs=2, lr=0.03, batch_size=16, seed=1, progress=False)
    expected = fastae.fit(new_model(seed=3), data, **kwargs).loss
    for dtype in (">f4", ">f8", np.longdouble):
        array = data.numpy().astype(dtype)
        assert fastae.fit(new_model(seed=3), array, **kwargs).loss == expected


class Frame:
    """A data frame's protocol, as pandas's: iteration yields the column names, the rows are
    read through __array__."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __iter__(self):
        return iter(f"column {j}" for j in range(self.values.shape[1]))

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


def test_fit_reads_array_likes_as_the_arrays_they_hold():
    data = small_problem()
    kwargs = dict(epochs=2, lr=0.03, batch_size=16, seed=1, progress=False)
    expected = fastae.fit(new_model(seed=3), data, validation_split=0.25, **kwargs)
    history = fastae.fit(new_model(seed=3), Frame(data.numpy()), validation_split=0.25, **kwargs)
    assert (history.loss, history.val_loss) == (expected.loss, expected.val_loss)
    history = fastae.fit(
        new_model(seed=3),
        Frame(data.numpy()[:72]),
        validation_data=Frame(data.numpy()[72:]),
        **kwargs,
    )
    assert (history.loss, history.val_loss) == (expected.loss, expected.val_loss)
    mixed = Frame(data.numpy().astype(object))  # as a frame of nullable columns reads
    with pytest.raises(TypeError, match=r"^data must hold real numbers, got an array of dtype "):
        fastae.fit(new_model(seed=3), mixed, **kwargs)
    with pytest.raises(TypeError, match=r"dtype object: convert it first \(.*df.to_numpy\("):
        fastae.fit(new_model(seed=3), mixed, **kwargs)


def test_fit_refuses_masked_values_and_shares_read_only_arrays(tmp_path):
    data = small_problem().numpy()
    kwargs = dict(epochs=2, lr=0.03, batch_size=16, seed=1, progress=False)
    masked = np.ma.masked_array(data, mask=np.zeros(data.shape, bool))
    expected = fastae.fit(new_model(seed=3), data, **kwargs).loss
    assert fastae.fit(new_model(seed=3), masked, **kwargs).loss == expected
    masked[2, 1] = np.ma.masked
    with pytest.raises(ValueError, match=r"^validation_data is a masked array with 1 masked "):
        fastae.fit(new_model(seed=3), data, validation_data=masked, **kwargs)
    np.save(tmp_path / "data.npy", data)
    mapped = np.load(tmp_path / "data.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning of a non-writable array
        assert fastae.fit(new_model(seed=3), mapped, **kwargs).loss == expected

    class Centering(torch.nn.Module):  # another model, which writes to its input
        def __init__(self):
            super().__init__()
            self.inner = new_model(seed=3)

        def forward(self, x):
            return self.inner(x.sub_(x.mean(0)).clamp_(0, 1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastae.fit(Centering(), mapped, shuffle=False, **kwargs)  # on a copy
    assert np.array_equal(mapped, data)


def test_tensor_batches_cover_every_row_once_per_pass():
    from fastae.training import TensorBatches

    data = torch.arange(50.0).reshape(25, 2)
    batches = TensorBatches(data, 8, shuffle=True, seed=4)
    assert len(batches) == 4
    first, second = [torch.cat(list(batches)) for _ in range(2)]
    assert [b.shape[0] for b in batches] == [8, 8, 8, 1]
    for epoch in (first, second):
        assert sorted(epoch[:, 0].tolist()) == data[:, 0].tolist()  # a permutation of rows
        assert torch.equal(epoch[:, 1], epoch[:, 0] + 1)  # rows stay whole
    assert not torch.equal(first, second)  # a fresh order each pass
    again = TensorBatches(data, 8, shuffle=True, seed=4)
    assert torch.equal(torch.cat(list(again)), first)  # the seed fixes the orders
    in_order = TensorBatches(data, 8, shuffle=False, seed=4)
    assert torch.equal(torch.cat(list(in_order)), data)
    # drop_last: the same orders, less each pass's last 1 row
    dropped = TensorBatches(data, 8, shuffle=True, seed=4, drop_last=True)
    assert len(dropped) == 3 and [b.shape[0] for b in dropped] == [8, 8, 8]
    dropped = TensorBatches(data, 8, shuffle=True, seed=4, drop_last=True)
    assert torch.equal(torch.cat(list(dropped)), first[:24])
    in_order = TensorBatches(data, 8, shuffle=False, seed=4, drop_last=True)
    assert torch.equal(torch.cat(list(in_order)), data[:24])


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_batches_of_a_shard_follow_its_sampler(shuffle, drop_last):
    """Data-parallel batches: each process's rows in its DistributedSampler's order for the
    epoch set, batched as a DataLoader over the same sampler would (one gather a batch, not
    one a row; with drop_last, without a shard's shorter last batch); the shards together
    hold every row (25 rows on 2 processes: one repeated)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from fastae.training import TensorBatches

    data = torch.arange(50.0).reshape(25, 2)
    shards = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(25), num_replicas=2, rank=rank, shuffle=shuffle, seed=3)
        batches = TensorBatches(data, 4, shuffle, 3, sampler, drop_last)
        loader = DataLoader(TensorDataset(data), 4, sampler=sampler, drop_last=drop_last)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            ours, theirs = list(batches), [batch for (batch,) in loader]
            # 13 rows a shard: 3 batches of 4, and one of 1 unless dropped
            assert len(batches) == len(loader) == len(ours) == (3 if drop_last else 4)
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b)
        shards.append(torch.cat(ours))
    rows = torch.cat(shards)[:, 0].tolist()
    if not drop_last:
        assert len(rows) == 26 and set(rows) == set(data[:, 0].tolist())


def test_host_data_moves_to_a_cuda_model_once_where_it_fits(monkeypatch):
    """Decided on the CPU with the GPU's free memory faked: data within a quarter of it is
    copied over once (``Tensor.to`` faked too), larger data and CPU models keep it as it is."""
    from fastae import training

    data = torch.zeros(100, 10)  # 4000 bytes
    gpu = torch.device("cuda", 0)
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: moved.append(device) or "moved")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (16000, 10**9))
    assert training._resident(data, gpu) == "moved" and moved == [gpu]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (15999, 10**9))
    assert training._resident(data, gpu) is data  # over a quarter of the free memory
    assert training._resident(data, torch.device("cpu")) is data
    assert moved == [gpu]


@pytest.mark.cuda
def test_fit_gathers_host_data_on_the_gpu():
    data = small_problem()
    histories = []
    for source in (data, data.cuda()):
        model = new_model(seed=3).cuda()
        histories.append(fastae.fit(model, source, epochs=3, seed=0, progress=False).loss)
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)
    from fastae import training

    batches = training._batches("data", data, new_model().cuda(), 16, True, 0)
    assert batches.tensor.device.type == "cuda"  # moved once; batches gathered there


def test_fit_validation_and_early_stopping():
    data, val = small_problem(), small_problem(40)
    model = new_model()
    history = fastae.fit(
        model, data, validation_data=val, epochs=30, patience=2, min_delta=1e6, lr=0.03,
        batch_size=16, seed=0, progress=False,
    )  # fmt: skip
    # no epoch improves by 1e6, so training stops patience epochs after the first
    assert history.stopped_early
    assert len(history.loss) == len(history.val_loss) == 3
    assert history.best_epoch == 0
    # the best (first-epoch) weights are restored
    restored = _mean_loss(model, DataLoader(TensorDataset(val), batch_size=16), "cpu")
    assert restored == pytest.approx(history.val_loss[0], rel=1e-6)
    assert restored != pytest.approx(history.val_loss[-1], rel=1e-6)


def _fit_by_ascent(model, data, **kwargs):
    """fastae.fit by gradient ascent: every epoch is worse than the first."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, maximize=True)
    return fastae.fit(
        model, data, validation_data=data, epochs=4, batch_size=32, optimizer=optimizer,
        seed=0, progress=False, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("patience", [None, 10])
def test_fit_restores_the_best_validation_epoch_without_early_stopping(patience):
    """The returned model is the first epoch's (History.best_epoch) although training ran
    to the end; with restore_best=False it is the last epoch's."""
    data = small_problem(32)
    model = new_model()
    history = _fit_by_ascent(model, data, patience=patience)
    assert not history.stopped_early and len(history.val_loss) == 4
    assert history.best_epoch == 0 and history.val_loss[-1] > history.val_loss[0]
    with torch.no_grad():
        assert float(model(data).loss) == pytest.approx(history.val_loss[0], rel=1e-6)
    kept = new_model()
    history = _fit_by_ascent(kept, data, restore_best=False)
    with torch.no_grad():
        assert float(kept(data).loss) == pytest.approx(history.val_loss[-1], rel=1e-6)


def test_fit_numpy_scalar_arguments():
    data = small_problem(32)
    model = fastae.Autoencoder(
        np.int64(10), np.int32(4), tied=np.bool_(False), contractive=np.float32(0.25),
        sparsity=fastae.KLSparsity(np.float32(0.05), np.float64(0.1)),
        noise=fastae.MaskingNoise(np.float32(0.25), rescale=np.bool_(True), seed=np.int64(3)),
    )  # fmt: skip
    assert (type(model.in_features), type(model.hidden_features)) == (int, int)
    assert model.tied is False and type(model.contractive) is float
    assert type(model.sparsity.rho) is float and type(model.noise.p) is float
    assert model.noise.rescale is True and type(model.noise.seed) is int
    with pytest.warns(UserWarning, match=r"seed=3\) has a seed: every training step"):
        history = fastae.fit(
            model, data, epochs=np.int64(2), batch_size=np.int64(16), lr=np.float32(0.01),
            validation_data=data, patience=np.int64(1), min_delta=np.float32(0.0),
            seed=np.int64(0), progress=np.bool_(False),
        )  # fmt: skip
    assert 1 <= len(history.loss) <= 2


def test_fit_warns_of_a_seeded_noise_spec_only():
    data = small_problem(32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = new_model(noise=fastae.MaskingNoise(0.3))
        fastae.fit(model, data, epochs=1, seed=0, progress=False)
    assert not [w for w in caught if "has a seed" in str(w.message)]
    with pytest.warns(
        UserWarning,
        match=r"^the noise spec MaskingNoise\(p=0\.3, rescale=False, seed=5\) has a seed: ",
    ) as warned:
        model = new_model(noise=fastae.MaskingNoise(0.3, seed=5))
        fastae.fit(model, data, epochs=1, seed=0, progress=False)
    assert warned[0].filename == __file__  # the caller's line


def test_fit_progress_leaves_its_record(capsys):
    fastae.fit(new_model(), small_problem(32), epochs=2, seed=0, progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n") and "loss=" in err.splitlines()[-1]


def test_fit_refuses_bce_data_outside_the_unit_interval_before_any_progress(capsys):
    advice = r"; scale the data into \[0, 1\] \(as MinMaxScaler does\), or build the model "
    advice += r"with output='identity', loss='mse'$"
    with pytest.raises(ValueError, match=r"^data must lie in \[0, 1\] for loss 'bce', .*" + advice):
        fastae.fit(new_model(), small_problem(32) * 2, epochs=2, progress=True)
    assert capsys.readouterr().err == ""
    # a model's own check (outside fit) gives the same advice; the op's does not
    with pytest.raises(ValueError, match=r"^x must lie in \[0, 1\] for loss 'bce', .*" + advice):
        new_model()(small_problem(32) * 2)
    with pytest.raises(ValueError, match=r"^target must lie in \[0, 1\] for loss 'bce', [^;]*$"):
        model = new_model()
        fastae.ops.decode_loss(
            torch.rand(4, model.hidden_features), model.weight.t(), model.decoder_bias,
            target=torch.full((4, model.in_features), 2.0),
        )  # fmt: skip


def test_fit_a_tied_validation_loss_is_no_improvement():
    """Patience counts epochs that lower the loss by more than min_delta (0): with the weights
    still (lr 0) every validation loss ties the first, so training stops after patience."""
    data = small_problem(32)
    model = new_model()
    still = torch.optim.SGD(model.parameters(), lr=0.0)
    history = fastae.fit(
        model, data, validation_data=data, epochs=10, patience=2, optimizer=still,
        shuffle=False, progress=False,
    )  # fmt: skip
    assert len(set(history.val_loss)) == 1
    assert history.stopped_early and len(history.val_loss) == 3 and history.best_epoch == 0


def test_fit_epoch_loss_weights_each_batch_by_its_rows():
    """100 rows in batches of 32, 32, 32 and 4: the epoch's loss is the mean over the rows
    (float64, weights still), not the mean of the four batch means."""
    model = new_model().double()
    data = small_problem(100).double()
    still = torch.optim.SGD(model.parameters(), lr=0.0)
    history = fastae.fit(
        model, data, epochs=1, batch_size=32, optimizer=still, shuffle=False, progress=False
    )
    with torch.no_grad():
        exact = float(model.train()(data).per_sample.mean())
    assert history.loss == [pytest.approx(exact, rel=1e-13)]


def test_fit_validation_reads_every_row_with_drop_last():
    data, validation = small_problem(64), small_problem(20)
    model = new_model()
    history = fastae.fit(
        model, data, validation_data=validation, epochs=1, batch_size=16, drop_last=True,
        seed=0, progress=False,
    )  # fmt: skip
    with torch.no_grad():
        assert history.val_loss == [pytest.approx(float(model.eval()(validation).loss), rel=1e-6)]


def test_fit_interrupted_without_validation_keeps_the_last_weights():
    """Ctrl-C restores the best epoch's weights only where validation data chose them: with
    patience on the training loss alone the model stays at its last step (gradient ascent
    makes the first epoch the best)."""
    data = small_problem()
    kwargs = dict(batch_size=16, seed=0, progress=False)

    def ascent(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)

    three = new_model()
    fastae.fit(three, data, epochs=3, optimizer=ascent(three), **kwargs)
    model = new_model()

    def interrupt(epoch, history):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastae.fit(
            model, data, epochs=10, patience=5, optimizer=ascent(model), callback=interrupt,
            **kwargs,
        )  # fmt: skip
    for name, value in three.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_fit_records_the_first_param_groups_lr():
    model = new_model()
    sgd = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias, model.decoder_bias]}],
        lr=0.01,
    )
    history = fastae.fit(model, small_problem(), epochs=2, optimizer=sgd, progress=False)
    assert history.lr == [0.1, 0.1]


def test_fit_progress_without_tqdm_prints_a_line_an_epoch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the stderr lines
    history = fastae.fit(
        new_model(), small_problem(32), validation_data=small_problem(8), epochs=2, seed=0
    )
    lines = [
        f"epoch {epoch}: loss={loss:.4g} val_loss={val:.4g}\n"
        for epoch, loss, val in zip((1, 2), history.loss, history.val_loss, strict=True)
    ]
    assert capsys.readouterr().err == "".join(lines)


def test_fit_patience_without_validation_monitors_training_loss():
    data = small_problem()
    model = new_model()
    history = fastae.fit(model, data, epochs=10, patience=1, min_delta=1e6, seed=0, progress=False)
    assert history.stopped_early and len(history.loss) == 2 and history.best_epoch == 0
    first_epoch = new_model()  # restore_best: the model is left with the best epoch's weights
    fastae.fit(first_epoch, data, epochs=1, seed=0, progress=False)
    for name, value in first_epoch.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    full = fastae.fit(new_model(), data, epochs=4, patience=50, seed=0, progress=False)
    assert not full.stopped_early and len(full.loss) == 4


@pytest.mark.parametrize("as_array", [False, True])
def test_fit_validation_split_holds_out_the_last_rows(as_array):
    """As Keras: validation_split=0.25 of 30 rows trains on the first 22 (30 * 0.75 rounded
    down) and validates on the last 8, the same run as passing them apart."""
    data = small_problem(30)
    kwargs = {"epochs": 3, "batch_size": 8, "seed": 0, "progress": False}
    given = data.numpy() if as_array else data
    split_model, apart_model = new_model(), new_model()
    split = fastae.fit(split_model, given, validation_split=0.25, **kwargs)
    apart = fastae.fit(apart_model, data[:22], validation_data=data[22:], **kwargs)
    assert split.loss == apart.loss and split.val_loss == apart.val_loss
    assert len(split.val_loss) == 3
    for name, value in apart_model.state_dict().items():
        torch.testing.assert_close(split_model.state_dict()[name], value, rtol=0, atol=0)
    with torch.no_grad():  # the validation loss is that of the last 8 rows alone
        best = new_model()
        best.load_state_dict(split_model.state_dict())
        assert float(best(data[22:]).loss) == pytest.approx(min(split.val_loss), rel=1e-6)


@pytest.mark.parametrize(
    "rows, share, held_out",
    [
        (10, 0.9, 9), (100, 0.9, 90), (90, 0.3, 27), (10, np.float32(0.1), 1),
        (10, np.float32(0.3), 3), (10, np.float16(0.9), 9), (7, fractions.Fraction(2, 7), 2),
    ],
)  # fmt: skip
def test_fit_validation_split_counts_the_share_as_written(rows, share, held_out):
    """0.9 of 10 rows is 9 (float64's 10 * (1 - 0.9) is 0.9999999999999998, which would
    leave no training row); a numpy float32 0.1 is 0.1 (widened, 0.10000000149 of 10 rows
    would hold out 2)."""
    train, held = fastae.training._split_off(small_problem(rows), None, share)
    assert (len(train), len(held)) == (rows - held_out, held_out)


def test_fit_clips_each_steps_gradients_to_max_grad_norm():
    """One full-batch SGD step with lr 1 moves the parameters by the clipped gradient: g when
    its norm is below the bound, g * bound / ||g|| above it (within clip_grad_norm_'s 1e-6)."""
    data = small_problem(32)
    model = new_model(contractive=0.5, sparsity=fastae.KLSparsity(0.05, 0.5))
    model.zero_grad()
    model(data).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])))
    start = copy.deepcopy(model.state_dict())
    for bound, factor in [(norm / 4, 0.25), (norm * 4, 1.0)]:
        model.load_state_dict(start)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        fastae.fit(
            model, data, epochs=1, batch_size=32, optimizer=sgd, max_grad_norm=bound,
            shuffle=False, progress=False,
        )  # fmt: skip
        for name, p in model.named_parameters():
            moved = start[name] - p.detach()
            torch.testing.assert_close(moved, factor * grads[name], rtol=1e-4, atol=1e-7)


def test_fit_refuses_an_optimizer_that_steps_with_a_closure():
    """L-BFGS's step(closure) re-evaluates the loss, which fit's optimizer.step() cannot give:
    refused before any step, the model untouched (no gradients left on it)."""
    model = new_model()
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match=r"^optimizer must step without a closure .*LBFGS.step"):
        fastae.fit(model, small_problem(32), epochs=1, optimizer=lbfgs, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_fit_clips_the_layers_a_callback_thaws():
    """The parameters clipped are read at each epoch's start: a layer a callback thaws after
    the first epoch counts in the second's norm (each step's total norm stays at the bound),
    and once frozen again, drops out of the third's."""
    torch.manual_seed(0)
    data = torch.rand(64, 20)
    model = fastae.DeepAutoencoder(20, (16, 8), activation="sigmoid")
    first = (model.weights[0], model.biases[0])
    for p in first:
        p.requires_grad_(False)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append((len(grads), float(torch.nn.utils.get_total_norm(grads))))

    sgd.register_step_pre_hook(record)

    def thaw_then_freeze(epoch, history):
        for p in first:
            p.requires_grad_(epoch == 1)

    bound = 0.01
    fastae.fit(
        model, data, epochs=3, batch_size=64, optimizer=sgd, max_grad_norm=bound,
        callback=thaw_then_freeze, progress=False,
    )  # fmt: skip
    count = len(list(model.parameters()))
    assert [n for n, _ in norms] == [count - 2, count, count - 2]
    assert norms[1][1] > 0 and all(norm == pytest.approx(bound, rel=1e-4) for _, norm in norms)


def _step_lr(gamma):
    return lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma)


def test_fit_weight_decay_is_the_gradient_of_an_l2_penalty_on_every_parameter():
    """weight_decay=w: Adam on the loss plus (w / 2) * sum ||p||^2 over all parameters, biases
    included (the oracle: a plain Adam without decay, the penalty in its loss)."""
    torch.manual_seed(0)
    model, data, decay = fastae.Autoencoder(5, 3, tied=False), torch.rand(8, 5), 0.5
    oracle, plain = copy.deepcopy(model), copy.deepcopy(model)
    fastae.fit(model, data, epochs=5, batch_size=8, lr=1e-2, weight_decay=decay, progress=False)
    fastae.fit(plain, data, epochs=5, batch_size=8, lr=1e-2, progress=False)
    adam = torch.optim.Adam(oracle.parameters(), lr=1e-2, foreach=False)
    for _ in range(5):
        penalty = sum(p.pow(2).sum() for p in oracle.parameters())
        (oracle(data).loss + decay / 2 * penalty).backward()
        adam.step()
        adam.zero_grad()
    for (name, trained), expected, undecayed in zip(
        model.named_parameters(), oracle.parameters(), plain.parameters(), strict=True
    ):
        torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6, msg=name)
        assert (trained - undecayed).abs().max() > 1e-4, name


def test_fit_steps_the_scheduler_once_an_epoch():
    data = small_problem()
    kwargs = {"batch_size": 16, "lr": 0.03, "seed": 0, "progress": False}
    plain = fastae.fit(new_model(), data, epochs=3, **kwargs)
    assert plain.lr == [0.03] * 3
    first = new_model()
    fastae.fit(first, data, epochs=1, **kwargs)
    # lr 0 from the second epoch on: the weights stay those of the first
    frozen = new_model()
    history = fastae.fit(frozen, data, epochs=3, scheduler=_step_lr(0.0), **kwargs)
    assert history.lr == [0.03, 0.0, 0.0]
    for name, value in first.state_dict().items():
        torch.testing.assert_close(frozen.state_dict()[name], value, rtol=0, atol=0)
    # a scheduler built on the optimizer given
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    history = fastae.fit(
        model, data, epochs=3, optimizer=optimizer, scheduler=scheduler, seed=0, progress=False
    )
    assert history.lr == [0.1, 0.05, 0.025] and optimizer.param_groups[0]["lr"] == 0.0125


@pytest.mark.parametrize("validation", [False, True])
def test_fit_steps_reduce_lr_on_plateau_with_the_watched_loss(validation):
    seen = []

    class Watching(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(metrics)
            super().step(metrics)

    data = small_problem()
    history = fastae.fit(
        new_model(), data, validation_data=data[:32] if validation else None, epochs=3,
        scheduler=lambda optimizer: Watching(optimizer, patience=0, threshold=10.0),
        seed=0, progress=False,
    )  # fmt: skip
    assert seen == (history.val_loss if validation else history.loss)
    # no epoch improves by 1000%: the rate falls tenfold after each
    assert history.lr == pytest.approx([1e-3, 1e-4, 1e-5])


def test_fit_refuses_a_scheduler_it_cannot_step():
    data, model = small_problem(32), new_model()
    fit = lambda **kwargs: fastae.fit(model, data, epochs=1, progress=False, **kwargs)  # noqa: E731
    with pytest.raises(TypeError, match=r"^scheduler must be a torch.optim.lr_scheduler"):
        fit(scheduler="cosine")
    with pytest.raises(TypeError, match=r"^scheduler\(optimizer\) must return .* got float"):
        fit(scheduler=lambda optimizer: 0.5)
    other = torch.optim.SGD(new_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^scheduler steps another optimizer"):
        fit(scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
    # a scheduler class: built from the optimizer where its other arguments have defaults
    message = r"^scheduler=StepLR \(a class\) cannot be built from the optimizer alone \(.*step"
    with pytest.raises(TypeError, match=message):
        fit(scheduler=torch.optim.lr_scheduler.StepLR)
    history = fit(scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert len(history.lr) == 1


def test_fit_calls_back_after_each_epoch_and_stops_when_asked():
    data = small_problem()
    seen = []

    def callback(epoch, history):
        seen.append((epoch, len(history.loss), len(history.val_loss), model.training))
        return epoch == 2  # stop after the second epoch

    model = new_model()
    kwargs = {"batch_size": 16, "seed": 0, "progress": False}
    history = fastae.fit(
        model, data, validation_data=data[:16], epochs=5, callback=callback, **kwargs
    )
    assert seen == [(1, 1, 1, True), (2, 2, 2, True)]
    assert history.stopped_early and len(history.loss) == 2

    # without validation data the model keeps its last step's weights, with patience too
    # (a restore is patience's): gradient ascent makes the first epoch the best
    def ascent(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)

    two = new_model()
    fastae.fit(two, data, epochs=2, optimizer=ascent(two), **kwargs)
    for patience in (None, 3):
        stopped = new_model()
        history = fastae.fit(
            stopped, data, epochs=5, optimizer=ascent(stopped), patience=patience,
            callback=lambda epoch, _: epoch == 2, **kwargs,
        )  # fmt: skip
        assert history.best_epoch == 0 and history.stopped_early
        for name, value in two.state_dict().items():
            torch.testing.assert_close(stopped.state_dict()[name], value, rtol=0, atol=0)
    everything = fastae.fit(new_model(), data, epochs=3, callback=lambda *_: None, **kwargs)
    assert len(everything.loss) == 3 and not everything.stopped_early
    # a logging callback's return value (a count of characters) is no request to stop
    with pytest.warns(UserWarning, match=r"^callback returned 7 \(int\), not True, False") as got:
        logged = fastae.fit(new_model(), data, epochs=3, callback=lambda *_: 7, **kwargs)
    assert {w.filename for w in got} == {__file__}  # the caller's line
    assert len(logged.loss) == 3 and not logged.stopped_early
    # a comparison of tensor losses, a 0-d bool tensor, answers as True and False do, as
    # does numpy's bool, without a warning
    for answer in (lambda e, _: torch.tensor(e) >= 2, lambda e, _: np.bool_(e >= 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            asked = fastae.fit(new_model(), data, epochs=5, callback=answer, **kwargs)
        assert len(asked.loss) == 2 and asked.stopped_early
    # a callback that answers None or False leaves patience's stopping as it is
    for answer in (None, False):
        patient = fastae.fit(
            new_model(), data, epochs=10, patience=1, min_delta=1e6,
            callback=lambda *_, answer=answer: answer, **kwargs,
        )  # fmt: skip
        assert patient.stopped_early and len(patient.loss) == 2
    # the model is in training mode at each epoch's start, whatever a callback left it in
    modes, model = [], new_model()

    def scoring(epoch, history):
        modes.append(model.training)
        model.eval()

    fastae.fit(model, data, epochs=3, callback=scoring, **kwargs)
    assert modes == [True, True, True]
    with pytest.raises(TypeError, match=r"^callback must be callable or None, got str"):
        fastae.fit(new_model(), data, epochs=1, callback="print", **kwargs)
    model = new_model()
    before = model.weight.detach().clone()
    for wrong in (lambda: None, lambda history: None, lambda epoch, history, model: None):
        with pytest.raises(TypeError, match=r"^callback must take two arguments, \(epoch, hist"):
            fastae.fit(model, data, epochs=1, callback=wrong, **kwargs)
    assert torch.equal(model.weight, before)  # refused before any training

    def logging(function):  # a decorator's wrapper, which takes what fit passes
        @functools.wraps(function)
        def wrapper(epoch, history):
            return function(epoch)

        return wrapper

    @logging
    def log(epoch):
        seen.append(-epoch)

    class Unreadable:  # a callable whose signature inspect cannot read: called as it is
        __signature__ = "unknown"

        def __call__(self, epoch, history):
            seen.append(epoch)

    seen.clear()
    for right in (lambda epoch, history, extra=0: None, functools.partial(print, end=""),
                  Unreadable(), log):  # fmt: skip
        assert len(fastae.fit(new_model(), data, epochs=1, callback=right, **kwargs).loss) == 1
    assert seen == [1, -1]


def test_fit_draws_no_shuffling_seed_it_does_not_use():
    """Without shuffling (or with batches of the caller's), fit draws nothing from torch's
    generator for it: the noise after it, or in a run resumed with the generator's state,
    is what it would be without that draw."""
    data = small_problem()
    for kwargs in ({"data": data, "shuffle": False}, {"data": list(data.split(16))}):
        model = new_model()
        torch.manual_seed(3)
        fastae.fit(model, epochs=1, progress=False, **kwargs)
        after = torch.rand(4)
        torch.manual_seed(3)
        assert torch.equal(after, torch.rand(4))
    torch.manual_seed(3)
    fastae.fit(new_model(), data, epochs=1, progress=False)  # shuffled: one draw
    after = torch.rand(4)
    torch.manual_seed(3)
    assert not torch.equal(after, torch.rand(4))


def test_a_checkpoint_with_the_history_loads_with_torch_loads_default(tmp_path):
    """A callback's checkpoint of the model and the history so far loads with torch.load's
    weights_only=True (its default): a History holds numbers alone."""
    model, path = new_model(), tmp_path / "checkpoint.pt"

    def checkpoint(epoch, history):
        torch.save({"model": model.state_dict(), "history": history}, path)

    history = fastae.fit(model, small_problem(), epochs=2, progress=False, callback=checkpoint)
    loaded = torch.load(path)
    assert isinstance(loaded["history"], fastae.History)
    assert (loaded["history"].loss, loaded["history"].lr) == (history.loss, history.lr)


def test_fit_leaves_eval_mode_however_it_ends():
    """An error (or an interrupt) in a callback still leaves the model in eval mode."""
    model = new_model(noise=fastae.MaskingNoise(0.3))

    def failing(epoch, history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastae.fit(model, small_problem(), epochs=3, callback=failing, progress=False)
    assert not model.training


def test_fit_callback_sees_the_model_as_given():
    """fit checks a BCE model's tensor data once and pauses the per-step target check; a
    callback (which may save or copy the model) sees the check as the caller set it."""
    model, seen = new_model(), []
    fastae.fit(
        model, small_problem(), epochs=2, progress=False,
        callback=lambda *_: seen.append(copy.deepcopy(model).check_targets),
    )  # fmt: skip
    assert seen == [True, True] and model.check_targets
    unchecked, seen = new_model(check_targets=False), []
    callback = lambda *_: seen.append(unchecked.check_targets)  # noqa: E731
    fastae.fit(unchecked, small_problem(), epochs=1, progress=False, callback=callback)
    assert seen == [False] and not unchecked.check_targets
    # a callback that turns the check off (or on again) leaves the model so after fit
    model, seen = new_model(), []

    def turn_off_then_on(epoch, history):
        seen.append(model.check_targets)
        model.check_targets = epoch == 2

    fastae.fit(model, small_problem(), epochs=3, progress=False, callback=turn_off_then_on)
    assert seen == [True, False, True] and not model.check_targets


def test_fit_records_a_float64_models_loss_in_float64():
    model = new_model().double()
    data = small_problem().double()
    still = torch.optim.SGD(model.parameters(), lr=0.0)
    history = fastae.fit(
        model, data, epochs=1, batch_size=32, optimizer=still, shuffle=False, progress=False
    )
    with torch.no_grad():
        exact = float(model(data).per_sample.mean())
    assert history.loss == [pytest.approx(exact, rel=1e-13)]


def test_fit_validation_loss_is_clean_eval_loss():
    data, val = small_problem(), small_problem(32)
    model = new_model(noise=fastae.MaskingNoise(0.5))
    history = fastae.fit(
        model, data, validation_data=val, epochs=2, batch_size=32, seed=0, progress=False
    )
    model.eval()
    with torch.no_grad():
        assert history.val_loss[-1] == pytest.approx(float(model(val).loss), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(noise=fastae.MaskingNoise(0.3)), dict(contractive=0.5, sparsity=fastae.KLSparsity(0.1))],
)
def test_fit_same_seed_same_history(kwargs):
    data = small_problem()

    def run(seed):
        model = new_model(seed=11, **kwargs)
        history = fastae.fit(
            model, data, epochs=3, batch_size=16, lr=0.02, seed=seed, progress=False
        )
        return history.loss, model.weight.detach().clone()

    first, weight_a = run(5)
    second, weight_b = run(5)
    assert first == second  # bitwise, float for float
    assert torch.equal(weight_a, weight_b)
    other, _ = run(6)
    assert other != first


# ----------------------------------------------------------------------------- behaviour on digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from fastae.data import load_digits

    x, _ = load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1200]], x[perm[1200:]]


def train_on_digits(train, hidden=32, epochs=8, **kwargs):
    torch.manual_seed(0)
    model = fastae.Autoencoder(64, hidden, **kwargs)
    fastae.fit(model, train, epochs=epochs, batch_size=64, lr=1e-2, seed=1, progress=False)
    return model


def statistics(model, x):
    with torch.no_grad():
        _, rho_hat, jac = ops.encode(x, model.weight, model.bias, activation=model.activation)
    return rho_hat, float(jac)


def test_digits_data():
    pytest.importorskip("sklearn")
    from fastae.data import load_digits

    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


@pytest.mark.slow
def test_contractive_model_has_smaller_jacobian(digits):
    train, test = digits
    plain = train_on_digits(train)
    contractive = train_on_digits(train, contractive=1.0)
    _, plain_jac = statistics(plain, test)
    _, contractive_jac = statistics(contractive, test)
    assert contractive_jac < 0.5 * plain_jac
    # and it still reconstructs: far better than the untrained model
    untrained = fastae.Autoencoder(64, 32)
    assert (
        contractive.reconstruction_error(test).mean() < untrained.reconstruction_error(test).mean()
    )


@pytest.mark.slow
def test_kl_sparse_model_mean_activation_near_rho(digits):
    train, test = digits
    rho = 0.05
    sparse = train_on_digits(train, sparsity=fastae.KLSparsity(rho, weight=10.0))
    plain = train_on_digits(train)
    sparse_rho, _ = statistics(sparse, test)
    plain_rho, _ = statistics(plain, test)
    assert abs(float(sparse_rho.mean()) - rho) < 0.02
    assert float(plain_rho.mean()) > 0.2


@pytest.mark.slow
def test_denoising_model_reconstructs_corrupted_inputs_better(digits):
    train, test = digits
    noise = fastae.MaskingNoise(0.5)
    plain = train_on_digits(train, hidden=128)
    denoising = train_on_digits(train, hidden=128, noise=noise)
    corrupted = ops.corrupt(test, noise.with_seed(12345))

    def error(model):
        with torch.no_grad():
            return float((model.reconstruct(corrupted) - test).square().sum(1).mean())

    assert error(denoising) < 0.9 * error(plain)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastae.Autoencoder(5, 3, noise=fastae.MaskingNoise(0.2), contractive=0.1),
        lambda: fastae.DeepAutoencoder(5, (4, 3), sparsity=fastae.L1Sparsity(0.1)),
        lambda: fastae.VAE(5, 4, 2),
    ],
    ids=["autoencoder", "deep", "vae"],
)
def test_models_pickled_with_their_options_as_plain_attributes_load(make):
    """Pickles of models whose activation, output, loss_name, noise, sparsity, contractive
    and beta were plain attributes (before they were checked properties) load with those
    options."""
    model = make().eval()
    state = dict(vars(model))
    options = ("activation", "output", "loss_name", "noise", "sparsity", "contractive", "beta")
    for name in options:
        if f"_{name}" in state:
            state[name] = state.pop(f"_{name}")
    older = type(model).__new__(type(model))
    vars(older).update(state)
    loaded = pickle.loads(pickle.dumps(older))
    assert (loaded.activation, loaded.output, loaded.loss_name) == (
        model.activation, model.output, model.loss_name
    )  # fmt: skip
    assert not set(options) & set(vars(loaded))
    for name in ("contractive", "beta"):
        assert getattr(loaded, name, None) == getattr(model, name, None)
    x = torch.rand(4, 5)
    torch.testing.assert_close(loaded(x).loss, model(x).loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "fixed"),
    [
        (lambda: fastae.Autoencoder(5, 3), {"in_features": 6, "hidden_features": 2, "tied": False}),
        (lambda: fastae.DeepAutoencoder(5, (4, 3)), {"sizes": (4, 2), "tied": True}),
        (lambda: fastae.VAE(5, 4, 2), {"latent": 3, "hidden": 8, "hidden_sizes": (8,)}),
    ],
    ids=["autoencoder", "deep", "vae"],
)
def test_a_models_layout_is_fixed_and_its_flags_checked(make, fixed):
    """Widths and tying shape the parameters: reassigning one (which would describe another
    model than the weights hold, or train one and score another) is an error; a copy or
    pickle keeps them."""
    model = make()
    for name in fixed:
        setattr(model, name, getattr(model, name))  # the same value again: nothing changes
        held = getattr(model, name)
        if isinstance(held, (bool, int)):  # an equal value of another type is refused too
            with pytest.raises(AttributeError, match=rf"^{name} is fixed"):
                setattr(model, name, float(held))
    for name, value in fixed.items():
        message = (
            rf"^{name} is fixed when the model is built \(.*\): build a new {type(model).__name__}$"
        )
        with pytest.raises(AttributeError, match=message):
            setattr(model, name, value)
    with pytest.raises(TypeError, match=r"^check_targets must be a bool, got str$"):
        model.check_targets = "no"
    model.check_targets = False
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert repr(copied) == repr(model) and copied.check_targets is False
        x = torch.rand(4, 5)
        torch.testing.assert_close(copied.eval()(x).loss, model.eval()(x).loss, rtol=0, atol=0)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_fit_leaves_the_best_epochs_weights(interruption):
    """Ctrl-C (or a callback's error) after the best epoch: restore_best puts its weights
    back, as at a normal end; History.seconds counts the time so far inside callbacks."""
    data, val = small_problem(64), small_problem(16)
    best_weights, seconds = {}, []

    def callback(epoch, history):
        seconds.append(history.seconds)
        if history.best_epoch == epoch - 1:
            best_weights.update(copy.deepcopy(model.state_dict()))
        if epoch == 6:
            raise interruption("stop")

    model = new_model()
    with pytest.raises(interruption):
        fastae.fit(model, data, validation_data=val, epochs=10, lr=0.3, seed=0,
                   callback=callback, progress=False)  # fmt: skip
    assert best_weights and not model.training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, best_weights[name], rtol=0, atol=0)
    assert seconds[0] > 0 and seconds == sorted(seconds)
    last = new_model()  # the same run without restore_best: its last epoch's weights differ
    with pytest.raises(interruption):
        fastae.fit(last, data, validation_data=val, epochs=10, lr=0.3, seed=0, progress=False,
                   callback=lambda epoch, _: _raise(interruption) if epoch == 6 else None,
                   restore_best=False)  # fmt: skip
    assert not torch.equal(last.weight, model.weight)


def _raise(error_type):
    raise error_type("stop")


def test_a_vae_subclass_keeps_an_attribute_named_as_an_autoencoders_option():
    """Only a model's own options are renamed when it is unpickled or copied."""

    class DenoisingVAE(fastae.VAE):
        def __init__(self):
            super().__init__(5, 4, 2)
            self.noise = fastae.MaskingNoise(0.2)

    model = DenoisingVAE()
    assert copy.deepcopy(model).noise == model.noise == fastae.MaskingNoise(0.2)


def test_fit_leaves_nan_to_models_not_fastaes():
    """A model of the caller's may read NaN as a missing value: fit trains it."""

    class MaskedAutoencoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fastae.Autoencoder(5, 3, output="identity", loss="mse")

        def forward(self, x):
            seen = x.isfinite()
            reconstruction = self.inner.reconstruct(torch.where(seen, x, 0.0))
            error = torch.where(seen, reconstruction - x, 0.0).square().sum(1)
            return SimpleNamespace(loss=error.mean())

    data = torch.rand(32, 5)
    data[3, 2] = math.nan
    history = fastae.fit(MaskedAutoencoder(), data, epochs=2, seed=0, progress=False)
    assert all(math.isfinite(loss) for loss in history.loss)
    with pytest.raises(ValueError, match=r"^data holds NaN or inf"):
        fastae.fit(fastae.Autoencoder(5, 3, output="identity", loss="mse"), data, progress=False)


def test_fit_takes_an_optimizer_whose_step_has_no_readable_signature():
    class Opaque:  # a wrapped step whose signature inspect cannot read
        __signature__ = "not a signature"

        def __init__(self, step):
            self.step = step

        def __call__(self, *args, **kwargs):
            return self.step(*args, **kwargs)

    model = fastae.Autoencoder(5, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.step = Opaque(sgd.step)
    history = fastae.fit(model, torch.rand(8, 5), epochs=1, optimizer=sgd, progress=False)
    assert len(history.loss) == 1


class _Recorder(torch.nn.Module):
    """A model whose loss is the squared distance of a scale to its batch's rows; it records
    the row numbers (column 0) of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].long().tolist())
        return SimpleNamespace(loss=(self.scale - x[:, 1]).square().mean())


def _numbered(rows):
    return torch.stack(
        [torch.arange(rows, dtype=torch.float64), torch.linspace(0, 1, rows, dtype=torch.float64)],
        1,
    )


def test_fit_shuffles_tensor_rows_with_a_generator_seeded_from_seed():
    """With ``seed``, each epoch's batches follow the next permutation of a CPU generator
    seeded with that seed, cut into batches of ``batch_size`` rows (the last holding the
    rest)."""
    model = _Recorder()
    fastae.fit(model, _numbered(10), epochs=2, batch_size=4, seed=123, progress=False)
    generator = torch.Generator().manual_seed(123)
    want = []
    for _ in range(2):
        order = torch.randperm(10, generator=generator).tolist()
        want += [order[0:4], order[4:8], order[8:10]]
    assert model.seen == want


def test_fit_without_progress_writes_nothing(capsys):
    """``progress=False`` shows no bar and prints no line an epoch: nothing on stdout or
    stderr."""
    model = _Recorder()
    fastae.fit(model, _numbered(6), epochs=2, batch_size=4, seed=0, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_callback_answering_a_tensor_of_several_bools_is_warned_about_and_training_goes_on():
    """Only a one-element bool tensor answers as its value: a callback that returns a bool
    tensor of several elements is warned about, as any other answer that is not True, False
    or None, and training runs all its epochs."""
    model = _Recorder()
    with pytest.warns(UserWarning, match="callback returned"):
        history = fastae.fit(
            model, _numbered(6), epochs=3, batch_size=6, seed=0, progress=False,
            callback=lambda epoch, history: torch.tensor([True, True]),
        )  # fmt: skip
    assert len(history.loss) == 3 and not history.stopped_early


def test_fit_batches_128_rows_by_default():
    """Without ``batch_size`` tensor data is cut into batches of 128 rows, the last holding
    the rest."""
    model = _Recorder()
    fastae.fit(model, _numbered(200), epochs=1, shuffle=False, progress=False)
    assert [len(rows) for rows in model.seen] == [128, 72]
    assert model.seen[0] == list(range(128)) and model.seen[1] == list(range(128, 200))


def test_fit_trains_a_model_holding_a_lazy_layer_it_never_calls():
    """A model holding a lazy layer its forward never calls (whose parameters stay
    uninitialized) trains and returns its history: the check of the stepped parameters for NaN
    or inf after the last step passes over the uninitialized ones."""

    class WithSpare(_Recorder):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.LazyLinear(3, dtype=torch.float64)

    model = WithSpare()
    history = fastae.fit(model, _numbered(8), epochs=2, batch_size=4, seed=0, progress=False)
    assert len(history.loss) == 2 and all(map(torch.isfinite, torch.tensor(history.loss)))
    assert torch.nn.parameter.is_lazy(model.spare.weight)


def test_callback_answer_is_checked_in_the_epoch_patience_stops():
    """In the epoch where ``patience`` stops training, a callback's answer that is not True,
    False or None is still warned about (and training stops there, by patience)."""
    answers = {2: "stop"}  # a string, not a bool: warned about

    class Constant(_Recorder):  # the same loss every epoch: no improvement after the first
        def forward(self, x):
            return SimpleNamespace(loss=x[:, 1].square().mean() + 0 * self.scale)

    model = Constant()
    with pytest.warns(UserWarning, match="callback returned 'stop'"):
        history = fastae.fit(
            model, _numbered(4), epochs=5, batch_size=4, shuffle=False, patience=1,
            progress=False, callback=lambda epoch, history: answers.get(epoch),
        )  # fmt: skip
    assert len(history.loss) == 2 and history.stopped_early


class _Scripted(_Recorder):
    """A model whose loss in epoch e (counted by the callback fit calls after each epoch) is
    ``losses[e]``, whatever its weight."""

    def __init__(self, losses):
        super().__init__()
        self.losses, self.epoch = losses, 0

    def forward(self, x):
        loss = torch.tensor(self.losses[self.epoch], dtype=torch.float64) + 0 * self.scale
        return SimpleNamespace(loss=loss)


def test_patience_counts_the_epochs_since_the_last_improvement():
    """``patience`` counts consecutive epochs without improvement: an improvement starts the
    count again. Losses 1, 2, 0.5, 0.9, 0.8, 0.7 with patience 2 stop after epoch 5 (two epochs
    without improvement after the best, epoch 3), not earlier."""
    model = _Scripted([1.0, 2.0, 0.5, 0.9, 0.8, 0.7])

    def count(epoch, history):
        model.epoch = epoch

    history = fastae.fit(
        model, _numbered(4), epochs=6, batch_size=4, patience=2, progress=False, callback=count
    )
    assert history.loss == [1.0, 2.0, 0.5, 0.9, 0.8]
    assert history.stopped_early and history.best_epoch == 2


def test_batches_with_float_labels_of_another_shape_train_without_the_target_warning(recwarn):
    """Batches of (input, float label per row) pairs, labels not of the input's shape, are not
    taken for Keras's (noisy, clean) pairs: no warning that the second item goes unread."""
    data = _numbered(8)
    labels = torch.linspace(0, 1, 4, dtype=torch.float64)
    batches = [(data[:4], labels), (data[4:], labels)]
    history = fastae.fit(_Recorder(), batches, epochs=2, progress=False)
    assert len(history.loss) == 2
    assert not [w for w in recwarn if "(input, target)" in str(w.message)]


def test_batches_of_input_and_target_pairs_are_warned_about():
    """Batches of (input, float target of the input's shape) pairs, as Keras's fit(noisy,
    clean), are warned about: fit reconstructs the input and never reads the target."""
    data = _numbered(8)
    batches = [(data[:4], data[:4] + 1), (data[4:], data[4:] + 1)]
    with pytest.warns(UserWarning, match=r"\(input, target\) pairs"):
        fastae.fit(_Recorder(), batches, epochs=1, progress=False)


def test_default_optimizer_is_fused_adam_on_the_cpu():
    """fit's default optimizer for a model on the CPU is PyTorch's fused Adam at the given
    rate and L2 penalty, over every parameter."""
    model = fastae.Autoencoder(7, 5)
    optimizer = fastae.training.default_optimizer(model, 0.01, weight_decay=0.5)
    assert isinstance(optimizer, torch.optim.Adam)
    (group,) = optimizer.param_groups
    assert group["fused"] is True
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.5
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: fastae.Autoencoder(5, 3, **kw),
        lambda **kw: fastae.DeepAutoencoder(5, (4, 3), **kw),
    ],
    ids=["autoencoder", "deep"],
)
def test_kl_sparsity_is_refused_with_every_activation_but_sigmoid(make, activation):
    """The Bernoulli KL needs codes in (0, 1): tanh, relu and softplus codes (softplus is
    positive but unbounded) are refused with a KLSparsity, at construction and when either
    option is set later; an L1Sparsity is taken with each of them."""
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        make(activation=activation, sparsity=fastae.KLSparsity(0.1))
    model = make(activation=activation, sparsity=fastae.L1Sparsity(0.1))
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        model.sparsity = fastae.KLSparsity(0.1)
    kl = make(activation="sigmoid", sparsity=fastae.KLSparsity(0.1))
    with pytest.raises(ValueError, match=rf"got activation '{activation}'$"):
        kl.activation = activation
    assert kl.activation == "sigmoid"


def test_a_stack_refuses_layers_on_different_devices():
    """One device for the stack: a layer on another device than the bottom layer's (here
    the meta device) is refused, as a layer of another dtype is."""
    bottom = fastae.Autoencoder(6, 4)
    with pytest.raises(ValueError, match=r"^layers\[1\] is torch.float32 on meta, but layers\[0\]"):
        StackModule([bottom, fastae.Autoencoder(4, 3, device="meta")])
    assert StackModule([bottom, fastae.Autoencoder(4, 3)]).hidden_features == 3


@pytest.mark.parametrize(
    ("make", "node"),
    [
        (lambda **kw: fastae.Autoencoder(7, 5, **kw), "AutoencoderStep"),
        (lambda **kw: fastae.DeepAutoencoder(7, (6, 5), activation="sigmoid", **kw),
         "DeepAutoencoderStep"),
    ],
    ids=["autoencoder", "deep"],
)  # fmt: skip
def test_synced_kl_statistics_leave_the_one_node_step_in_training_mode_only(make, node):
    """sync_statistics sums the KL term's code means over processes in training mode only:
    there the forward composes the ops (a sum over processes cannot run inside the node); in
    eval mode each process takes its own batch's means and the forward runs as one node."""
    torch.manual_seed(0)
    model = make(sparsity=fastae.KLSparsity(0.1, 0.5), sync_statistics=True)
    x = torch.rand(6, 7)
    assert node not in type(model.train()(x).loss.grad_fn).__name__
    assert node in type(model.eval()(x).loss.grad_fn).__name__
    unsynced = make(sparsity=fastae.KLSparsity(0.1, 0.5))
    assert node in type(unsynced.train()(x).loss.grad_fn).__name__


def test_deep_repr_names_its_widths_and_the_regularizers_set():
    """A deep model's repr gives every width in order, its options, and its noise and
    sparsity only when set."""
    plain = repr(fastae.DeepAutoencoder(9, (6, 4, 2)))
    assert "9 -> 6 -> 4 -> 2" in plain and "tied=False" in plain
    assert "sparsity" not in plain and "noise" not in plain
    model = fastae.DeepAutoencoder(
        9, (6, 4), activation="sigmoid", sparsity=fastae.KLSparsity(0.1, 0.5),
        noise=fastae.MaskingNoise(0.2),
    )  # fmt: skip
    text = repr(model)
    for part in (f"sparsity={model.sparsity!r}", f"noise={model.noise!r}", "activation='sigmoid'"):
        assert part in text, part
    l1 = repr(fastae.DeepAutoencoder(9, (6, 4), sparsity=fastae.L1Sparsity(0.3)))
    assert "sparsity=L1Sparsity(weight=0.3)" in l1


def _two_codes(x, bottom, top):
    """The codes of a stack of two sigmoid layers, by hand."""
    z1 = torch.sigmoid(x @ bottom.weight.T + bottom.bias)
    return z1, torch.sigmoid(z1 @ top.weight.T + top.bias)


def test_a_sigmoid_stack_whose_upper_layer_reconstructs_linearly_decodes_it_linearly():
    """In a stack of sigmoid layers, an upper layer with an identity output decodes the code
    without a sigmoid: the training forward's loss is that network's, here by hand in
    float64 (z1 = sig(x W0^T + b0), z2 = sig(z1 W1^T + b1), g = z2 W1 + c1, x^ = sig(g W0 +
    c0), BCE against x)."""
    torch.manual_seed(0)
    bottom = fastae.Autoencoder(7, 5, dtype=torch.float64)
    top = fastae.Autoencoder(5, 3, output="identity", loss="mse", dtype=torch.float64)
    with torch.no_grad():
        top.decoder_bias.uniform_(-1, 1)
        bottom.decoder_bias.uniform_(-1, 1)
    stack = StackModule([bottom, top]).train()
    x = torch.rand(6, 7, dtype=torch.float64)
    out = stack(x)
    with torch.no_grad():
        z1, z2 = _two_codes(x, bottom, top)
        g = z2 @ top.weight + top.decoder_bias
        x_hat = torch.sigmoid(g @ bottom.weight + bottom.decoder_bias)
        want = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum(1)
    torch.testing.assert_close(out.per_sample.detach(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss.detach(), want.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.code.detach(), z2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sizes", [(4,), (6, 4), (6, 5, 4)], ids=str)
@pytest.mark.parametrize("width", [3, 6, 7])
def test_deep_decode_refuses_codes_of_another_width_naming_the_code_size(sizes, width):
    """A deep model's decode takes codes of the last width s_L: codes of any other width
    (the input's, a hidden layer's) are refused by name before any product is tried."""
    model = fastae.DeepAutoencoder(7, sizes)
    message = (
        r"^h must have size 4 in dim 1 \(the model's code has that many units\), "
        rf"got shape \(2, {width}\)$"
    )
    with pytest.raises(ValueError, match=message):
        model.decode(torch.rand(2, width))
    assert model.decode(torch.rand(2, 4)).shape == (2, 7)


def test_stack_repr_gives_every_width_from_the_input_up():
    """A stack's repr reads as a deep model's widths: the bottom layer's input size, then
    each layer's code size in order."""
    stack = StackModule(
        [fastae.Autoencoder(9, 6), fastae.Autoencoder(6, 4), fastae.Autoencoder(4, 2)]
    )
    assert stack.extra_repr() == "9 -> 6 -> 4 -> 2"
    assert (stack.in_features, stack.hidden_features) == (9, 2)


def _three_layer_stack():
    """Sigmoid layers 8 -> 6 -> 5 -> 3 in float64, random decoder biases, the top one's
    output identity (a stack other than a DeepAutoencoder's network)."""
    torch.manual_seed(1)
    layers = [
        fastae.Autoencoder(8, 6, tied=False, dtype=torch.float64),
        fastae.Autoencoder(6, 5, dtype=torch.float64),
        fastae.Autoencoder(5, 3, output="identity", loss="mse", dtype=torch.float64),
    ]
    with torch.no_grad():
        for layer in layers:
            layer.bias.uniform_(-0.5, 0.5)
            layer.decoder_bias.uniform_(-0.5, 0.5)
    return StackModule(layers)


def _by_hand(stack, x):
    """(code, x^, per-sample BCE) of a stack by the layers' formulas, layer by layer."""
    bottom, middle, top = stack.layers
    z1 = torch.sigmoid(x @ bottom.weight.T + bottom.bias)
    z2 = torch.sigmoid(z1 @ middle.weight.T + middle.bias)
    z3 = torch.sigmoid(z2 @ top.weight.T + top.bias)
    g2 = z3 @ top.weight + top.decoder_bias  # identity output
    g1 = torch.sigmoid(g2 @ middle.weight + middle.decoder_bias)
    x_hat = torch.sigmoid(g1 @ bottom.decoder_weight.T + bottom.decoder_bias)
    bce = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum(1)
    return z3, x_hat, bce


def test_a_three_layer_stack_decodes_top_down():
    """encode runs the layers bottom-up and decode, reconstruct, reconstruction_error and
    the forward (training mode, no noise) run their decoders top-down, as by hand."""
    stack = _three_layer_stack().train()
    x = torch.rand(5, 8, dtype=torch.float64)
    with torch.no_grad():
        code, x_hat, bce = _by_hand(stack, x)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stack.encode(x), code, **tol)
    torch.testing.assert_close(stack.decode(code), x_hat, **tol)
    torch.testing.assert_close(stack.reconstruct(x), x_hat, **tol)
    torch.testing.assert_close(stack.reconstruction_error(x), bce, **tol)
    out = stack(x)
    torch.testing.assert_close(out.code.detach(), code, **tol)
    torch.testing.assert_close(out.per_sample.detach(), bce, **tol)
    torch.testing.assert_close(out.loss.detach(), bce.mean(), **tol)


def test_a_stack_names_and_sums_every_layers_penalties():
    """Each layer's penalties join a stack's forward under the layer's index ("sparsity0",
    "contractive0", "sparsity1"), each from that layer's codes, and the loss is the
    reconstruction loss plus all of them, here by hand in float64."""
    torch.manual_seed(2)
    bottom = fastae.Autoencoder(
        7, 5, sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.3, dtype=torch.float64
    )
    top = fastae.Autoencoder(5, 3, sparsity=fastae.KLSparsity(0.2, 2.0), dtype=torch.float64)
    stack = StackModule([bottom, top]).train()
    x = torch.rand(6, 7, dtype=torch.float64)
    out = stack(x)
    with torch.no_grad():
        z1, z2 = _two_codes(x, bottom, top)
        # ||J||_F^2 of a sigmoid layer: sum_j (z_j (1 - z_j))^2 ||W_j||^2
        jac = ((z1 * (1 - z1)).square() * bottom.weight.square().sum(1)).sum(1).mean()
        want = {
            "sparsity0": 0.5 * naive_kl(0.1, z1.mean(0)),
            "contractive0": 0.3 * jac,
            "sparsity1": 2.0 * naive_kl(0.2, z2.mean(0)),
        }
    assert sorted(out.penalties) == sorted(want)
    tol = dict(rtol=1e-10, atol=1e-10)
    for name, value in want.items():
        torch.testing.assert_close(out.penalties[name].detach(), value, **tol)
    total = out.reconstruction_loss.detach() + sum(want.values())
    torch.testing.assert_close(out.loss.detach(), total, **tol)


class _TwoProcesses:
    """torch.distributed as two processes see it, the other one with a batch of as many rows
    whose code means are all 0.5: the all-reduced count doubles, each column sum gains
    rows * 0.5. Records the all-reduces it answers."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def all_reduce(self, tensor, *args, **kwargs):
        self.calls += 1
        if tensor.dim() == 0:
            tensor.mul_(2)
        else:
            tensor.add_(0.5 * self.rows)


def _kl_models():
    torch.manual_seed(3)
    made = dict(sparsity=fastae.KLSparsity(0.1, 0.5), sync_statistics=True, dtype=torch.float64)
    return {
        "autoencoder": fastae.Autoencoder(7, 4, **made),
        "deep": fastae.DeepAutoencoder(7, (5, 4), activation="sigmoid", **made),
        "stack": StackModule([fastae.Autoencoder(7, 4, **made)]),
    }


@pytest.mark.parametrize("kind", ["autoencoder", "deep", "stack"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_synced_kl_term_takes_the_global_code_means_in_training_mode_only(kind, grad, monkeypatch):
    """Under a process group, sync_statistics makes the KL term of a training forward take
    the code means of all processes' batches ((local + other) / 2 for two equal batches);
    an eval forward takes its own batch's, with no collective at all."""
    model = _kl_models()[kind]
    x = torch.rand(6, 7, dtype=torch.float64)
    group = _TwoProcesses(rows=6)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", group.all_reduce)
    name = "sparsity0" if kind == "stack" else "sparsity"
    with torch.no_grad():
        if kind == "deep":
            encoder = list(zip(model.weights, model.biases, strict=True))
        else:
            layer = model.layers[0] if kind == "stack" else model
            encoder = [(layer.weight, layer.bias)]
        h = x
        for weight, bias in encoder:
            h = torch.sigmoid(h @ weight.T + bias)
        local = h.mean(0)
    with torch.set_grad_enabled(grad):
        trained = model.train()(x).penalties[name].detach()
        assert group.calls >= 2
        group.calls = 0
        evaluated = model.eval()(x).penalties[name].detach()
        assert group.calls == 0
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trained, 0.5 * naive_kl(0.1, (local + 0.5) / 2), **tol)
    torch.testing.assert_close(evaluated, 0.5 * naive_kl(0.1, local), **tol)


@pytest.mark.parametrize("tied", [False, True])
def test_deep_initialisation_is_xavier_uniform_in_construction_order(tied):
    """A deep model's weights are torch.nn.init.xavier_uniform_'s draws under the same seed,
    the encoder's layers first, then an untied decoder's; biases zero. reset_parameters
    draws them again in that order and zeroes every bias."""
    torch.manual_seed(5)
    model = fastae.DeepAutoencoder(9, (6, 4), tied=tied)
    torch.manual_seed(5)
    shapes = [(6, 9), (4, 6)] + ([] if tied else [(9, 6), (6, 4)])
    want = [torch.nn.init.xavier_uniform_(torch.empty(shape)) for shape in shapes]
    got = [w.detach().clone() for w in (*model.weights, *([] if tied else model.decoder_weights))]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(5)
    model.reset_parameters()
    again = [*model.weights, *([] if tied else model.decoder_weights)]
    for a, b, w in zip(got, again, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
        torch.testing.assert_close(b.detach(), w, rtol=0, atol=0)
    for bias in [*model.biases, *model.decoder_biases]:
        assert not bias.any()
