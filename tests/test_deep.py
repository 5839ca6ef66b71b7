"""fastae.DeepAutoencoder: its forward and gradients against plain torch, on both backends,
its regularizers, training and errors."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastae
from fastae import ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACT_FN = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "softplus": F.softplus}


def naive(model, x, corrupted=None):
    """(loss, per-sample loss, code, penalties) in plain torch from the model's parameters:
    nn.Linear-style layers, the reconstruction scored against the clean x."""
    act = ACT_FN[model.activation]
    h = x if corrupted is None else corrupted
    for weight, bias in zip(model.weights, model.biases, strict=True):
        h = act(h @ weight.t() + bias)
    code, g = h, h
    decoders = (
        [w.t() for w in model.weights] if model.decoder_weights is None else model.decoder_weights
    )
    for k in range(len(model.sizes) - 1, 0, -1):
        g = act(g @ decoders[k].t() + model.decoder_biases[k])
    logits = g @ decoders[0].t() + model.decoder_biases[0]
    if model.loss_name == "bce":
        per_sample = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    else:
        recon = torch.sigmoid(logits) if model.output == "sigmoid" else logits
        per_sample = (recon - x).square().sum(1)
    penalties = {}
    if isinstance(model.sparsity, fastae.KLSparsity):
        rho, rho_hat = model.sparsity.rho, code.mean(0)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        penalties["sparsity"] = model.sparsity.weight * kl.sum()
    elif isinstance(model.sparsity, fastae.L1Sparsity):
        penalties["sparsity"] = model.sparsity.weight * code.abs().sum(1).mean()
    loss = per_sample.mean() + sum(penalties.values())
    return loss, per_sample, code, penalties


CONFIGS = {
    "keras-relu-untied-bce": dict(activation="relu"),
    "sigmoid-tied-kl": dict(activation="sigmoid", tied=True, sparsity=fastae.KLSparsity(0.2, 0.5)),
    "tanh-l1-mse": dict(
        activation="tanh", output="identity", loss="mse", sparsity=fastae.L1Sparsity(0.1)
    ),
    "softplus-sigmoid-mse": dict(activation="softplus", output="sigmoid", loss="mse"),
}


def _model(config, sizes=(12, 6, 3), d=20, dtype=torch.float64):
    torch.manual_seed(0)
    model = fastae.DeepAutoencoder(d, sizes, **CONFIGS[config]).to(DEVICE, dtype)
    with torch.no_grad():  # nonzero biases, so a bias that went missing shows
        for bias in [*model.biases, *model.decoder_biases]:
            bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_gradients_equal_plain_torch(config, backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 0}
    model = _model(config, dtype=dtype)
    x = torch.rand(9, 20, dtype=dtype, device=DEVICE)
    with fastae.use_backend(backend):
        out = model(x)
        out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, per_sample, code, penalties = naive(model, x)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, **tol)
    torch.testing.assert_close(out.per_sample, per_sample, **tol)
    torch.testing.assert_close(out.reconstruction_loss, per_sample.mean(), **tol)
    torch.testing.assert_close(out.code, code, **tol)
    assert out.penalties.keys() == penalties.keys()
    for name, term in penalties.items():
        torch.testing.assert_close(out.penalties[name], term, **tol)
    for (name, param), mine in zip(model.named_parameters(), got, strict=True):
        torch.testing.assert_close(mine, param.grad, **tol, msg=name)
    with fastae.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(model.encode(x), code, **tol)
        torch.testing.assert_close(model.reconstruction_error(x), per_sample, **tol)
        logits = model.decode(code)
    recon = naive_reconstruction(model, code)
    torch.testing.assert_close(logits, recon, **tol)


def naive_reconstruction(model, code):
    act = ACT_FN[model.activation]
    g = code
    for k in range(len(model.sizes) - 1, 0, -1):
        g = act(g @ model.decoder_matrix(k).t() + model.decoder_biases[k])
    z = g @ model.decoder_matrix(0).t() + model.decoder_biases[0]
    return torch.sigmoid(z) if model.output == "sigmoid" else z


def test_gradcheck():
    model = _model("sigmoid-tied-kl", sizes=(5, 3), d=6)
    x = torch.rand(4, 6, dtype=torch.float64, device=DEVICE)
    params = list(model.parameters())

    def loss(*values):
        state = dict(zip([n for n, _ in model.named_parameters()], values, strict=True))
        return torch.func.functional_call(model, state, (x,)).loss

    assert torch.autograd.gradcheck(loss, tuple(p.detach().requires_grad_() for p in params))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_layer_corrupts_in_training_mode_only(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    noise = fastae.MaskingNoise(0.4, seed=7)
    model = fastae.DeepAutoencoder(16, (8, 4), noise=noise).to(DEVICE, dtype)
    x = torch.rand(6, 16, dtype=dtype, device=DEVICE)
    with fastae.use_backend(backend), torch.no_grad():
        trained = model(x)
        corrupted = ops.corrupt(x, noise)
        model.eval()
        evaluated = model(x)
    assert not torch.equal(corrupted, x)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    with torch.no_grad():
        torch.testing.assert_close(trained.loss, naive(model, x, corrupted)[0], **tol)
        torch.testing.assert_close(evaluated.loss, naive(model, x)[0], **tol)


def test_one_layer_is_the_one_layer_autoencoder():
    torch.manual_seed(0)
    deep = fastae.DeepAutoencoder(10, (4,), activation="sigmoid", tied=True)
    flat = fastae.Autoencoder(10, 4, activation="sigmoid", tied=True)
    with torch.no_grad():
        flat.weight.copy_(deep.weights[0])
        flat.bias.copy_(deep.biases[0])
    x = torch.rand(5, 10)
    torch.testing.assert_close(deep(x).loss, flat(x).loss)
    assert deep.hidden_features == 4 and "10 -> 4" in repr(deep)


def test_fit_trains_a_keras_sized_deep_autoencoder():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    model = fastae.DeepAutoencoder(64, (32, 16, 8), activation="relu")
    history = fastae.fit(model, x, epochs=15, batch_size=64, lr=3e-3, seed=0, progress=False)
    assert history.loss[-1] < 0.8 * history.loss[0]
    assert model.encode(x[:7]).shape == (7, 8) and model.reconstruct(x[:7]).shape == (7, 64)


def test_bad_arguments_name_themselves():
    for sizes in ((), "12", 8, None, torch.tensor(3), np.array(3), {8, 4}, {8: 1, 4: 1}):
        with pytest.raises(TypeError, match=r"^sizes must be a non-empty sequence"):
            fastae.DeepAutoencoder(10, sizes)
    assert fastae.DeepAutoencoder(10, range(8, 3, -4)).sizes == (8, 4)
    with pytest.raises(ValueError, match=r"^sizes\[1\] must be a positive int"):
        fastae.DeepAutoencoder(10, (4, 0))
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        fastae.DeepAutoencoder(10, (4,), sparsity=fastae.KLSparsity(0.1))
    with pytest.raises(ValueError, match=r"^loss 'bce' needs output 'sigmoid'"):
        fastae.DeepAutoencoder(10, (4,), output="identity")
    with pytest.raises(TypeError, match=r"^tied must be a bool"):
        fastae.DeepAutoencoder(10, (4,), tied=1)
    model = fastae.DeepAutoencoder(10, (6, 3))
    with pytest.raises(ValueError, match="10"):
        model(torch.rand(4, 9))
    with pytest.raises(ValueError, match="3"):
        model.decode(torch.rand(4, 6))


def test_compile_fullgraph_matches_eager():
    model = _model("sigmoid-tied-kl", dtype=torch.float32)
    model.noise = fastae.MaskingNoise(0.3, seed=5)
    x = torch.rand(8, 20, device=DEVICE)
    results = []
    for run in (torch.compile(model, fullgraph=True), model):
        model.zero_grad(set_to_none=True)
        loss = run(x).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_c, grads_c), (loss_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
