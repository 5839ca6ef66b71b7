"""A training step as one autograd node (``steps.autoencoder_step``) against the ops composed
through autograd: the same outputs and the same gradients, bit for bit on the CPU."""

import contextlib
import itertools

import pytest
import torch
from test_modules import naive_kl

import fastae
from fastae import steps
from fastae.modules import StackModule

NOISES = [None, fastae.MaskingNoise(0.3, seed=5), fastae.GaussianNoise(0.2, seed=6)]
SPARSITIES = [None, fastae.KLSparsity(0.1, 0.5), fastae.L1Sparsity(0.2)]
CONFIGS = [
    dict(activation=a, noise=n, sparsity=s, contractive=c, tied=t, output=o, loss=loss)
    for (a, (o, loss)), n, s, c, t in itertools.product(
        [
            ("sigmoid", ("sigmoid", "bce")),
            ("relu", ("identity", "mse")),
            ("tanh", ("sigmoid", "mse")),
            ("softplus", ("sigmoid", "bce")),
        ],
        NOISES,
        SPARSITIES,
        [0.0, 0.3],
        [True, False],
    )  # fmt: skip
    # KL needs sigmoid codes; L1 on tanh codes is not taken by the one node
    if not (a != "sigmoid" and isinstance(s, fastae.KLSparsity))
    and not (a == "tanh" and isinstance(s, fastae.L1Sparsity))
]


def _model(config, dtype=torch.float64):
    torch.manual_seed(0)
    return fastae.Autoencoder(7, 5, **config).to(dtype)


def _outputs_and_grads(model, x, uses, one_node, monkeypatch):
    monkeypatch.setattr(steps, "ONE_NODE_STEP", one_node)
    for p in model.parameters():
        p.grad = None
    out = model(x)
    deep = isinstance(model, (fastae.DeepAutoencoder, StackModule))
    node = "DeepAutoencoderStep" if deep else "AutoencoderStep"
    assert (node in type(out.loss.grad_fn).__name__) == one_node
    total = sum(use(out) for use in uses)
    total.backward()
    values = [out.loss, out.reconstruction_loss, out.code, out.per_sample]
    values += [out.jacobian_norm] if out.jacobian_norm is not None else []
    values += list(out.penalties.values())
    # which outputs require a gradient, as a tensor so it is compared with the values
    needs = torch.tensor([v.requires_grad for v in values])
    grads = [p.grad for p in model.parameters()]
    return [needs] + [v.detach() for v in values], sorted(out.penalties), grads


def _assert_identical(got, want):
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_same(model, x, uses, monkeypatch):
    got = _outputs_and_grads(model, x, uses, True, monkeypatch)
    want = _outputs_and_grads(model, x, uses, False, monkeypatch)
    assert got[1] == want[1]
    _assert_identical(got[0] + got[2], want[0] + want[2])


def _inputs(config):
    """Inputs in [0, 1] for BCE, in [-1, 2] for MSE (no range to keep: standardized data)."""
    x = torch.rand(6, 7, dtype=torch.float64)
    return x if config["loss"] == "bce" else 3 * x - 1


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_loss_step_equals_the_ops_composed(config, monkeypatch):
    model = _model(config)
    x = _inputs(config)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


@pytest.mark.parametrize("config", CONFIGS[::5], ids=str)
def test_every_output_used(config, monkeypatch):
    """Gradients through the code, the per-sample losses, the Jacobian norm and each penalty
    besides the loss reach the parameters as through the ops."""
    model = _model(config)
    x = torch.rand(6, 7, dtype=torch.float64)
    g_code = torch.randn(6, 5, dtype=torch.float64)
    uses = [
        lambda out: out.loss * 0.5,
        lambda out: out.reconstruction_loss * 2.0,
        lambda out: (out.code * g_code).sum(),
        lambda out: out.per_sample[1] * 3.0,
        lambda out: 0.0 if out.jacobian_norm is None else out.jacobian_norm * 1.5,
        lambda out: sum(out.penalties.values(), torch.zeros((), dtype=torch.float64)) * 0.7,
    ]
    _assert_same(model, x, uses, monkeypatch)


def test_only_the_code_used(monkeypatch):
    """A loss on the code alone (a classifier head) skips the decoder's backward."""
    model = _model(dict(sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2))
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same(model, x, [lambda out: out.code.square().sum()], monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_step(dtype, monkeypatch):
    model = _model(dict(sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2), dtype)
    x = torch.rand(16, 7, dtype=dtype)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


FALLBACKS = ["no_grad", "input_requires_grad", "frozen", "autocast", "compiling"]


@pytest.mark.parametrize(
    ("kind", "case"),
    [(kind, case) for kind in ("autoencoder", "deep", "vae") for case in FALLBACKS]
    + [("autoencoder", "inference"), ("deep", "inference"), ("vae", "eval")]
    + [("deep", "synced_kl"), ("deep", "l1_on_tanh")],
)  # fmt: skip
def test_falls_back_to_the_ops(kind, case, monkeypatch):
    if kind == "vae":
        model, node = _vae(dtype=torch.float32), "VAEStep"
    elif kind == "deep":
        config = dict(sizes=(6, 4), sparsity=fastae.KLSparsity(0.1, 0.5))
        if case == "synced_kl":  # the KL term of the global batch's code means
            config["sync_statistics"] = True
        elif case == "l1_on_tanh":  # |h| is not rho_hat
            config.update(activation="tanh", sparsity=fastae.L1Sparsity(0.1))
        model, node = _deep(config, torch.float32), "DeepAutoencoderStep"
    else:
        model = _model(dict(sparsity=fastae.KLSparsity(0.1, 0.5)), torch.float32)
        node = "AutoencoderStep"
    x = torch.rand(6, 7)
    if case in ("no_grad", "frozen"):
        if case == "frozen":
            model.requires_grad_(False)
        with torch.no_grad() if case == "no_grad" else contextlib.nullcontext():
            assert model(x).loss.grad_fn is None
        return
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not steps.available(x, tuple(model.parameters()))
        return
    if case == "eval":
        model.eval()  # the VAE's z = mu: no sampling, the ops composed
    if case == "input_requires_grad":
        x.requires_grad_()
    if case == "inference":  # a batch made in inference mode, which the node cannot save
        with torch.inference_mode():
            x = x.clone()
        model.noise = fastae.MaskingNoise(0.3)  # the ops then save x~, not x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = model(x)
    assert node not in type(out.loss.grad_fn).__name__
    out.loss.backward()
    if case == "input_requires_grad":
        assert x.grad is not None


def test_regenerated_corrupted_input(monkeypatch):
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
    model = _model(dict(noise=fastae.MaskingNoise(0.3, seed=5), contractive=0.2))
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


def _triton_dtype(low_precision: bool, device: str) -> torch.dtype:
    if low_precision:
        return torch.bfloat16
    return torch.float32 if device == "cuda" else torch.float64  # the interpreter runs fp64


@pytest.mark.parametrize("low_precision", [False, True], ids=["wide", "bfloat16"])
@pytest.mark.parametrize("fusion", ["gemm", "split"])
def test_triton_backend(fusion, low_precision, monkeypatch):
    """The kernels (interpreted on the CPU) through the one node, as through the ops."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    config = dict(noise=fastae.MaskingNoise(0.3, seed=5), sparsity=fastae.KLSparsity(0.1, 0.5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _triton_dtype(low_precision, device)
    model = _model(dict(config, contractive=0.2), dtype).to(device)
    x = torch.rand(6, 7, dtype=dtype, device=device)
    with fastae.use_backend("triton"):
        _assert_same(model, x, [lambda out: out.loss + out.code.sum()], monkeypatch)


@pytest.mark.parametrize(
    "frozen", ["weight", "bias", "decoder_bias", "decoder_weight", "weight+bias"]
)
def test_some_parameters_frozen(frozen, monkeypatch):
    """Frozen parameters get no gradient, the others the ops' gradients; with the whole
    encoder frozen the code, the Jacobian norm and the penalties require none."""
    model = _model(dict(tied=False, sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2))
    for name in frozen.split("+"):
        getattr(model, name).requires_grad_(False)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)
    assert all(getattr(model, name).grad is None for name in frozen.split("+"))


def _assert_same_second_order(model, x, use, monkeypatch, **call):
    """d/dtheta [L + |dL/dtheta|^2], dL/dtheta of loss + use(output): under create_graph the
    one node's backward records the ops' own (differentiable) backward, as the ops composed
    do."""
    params = list(model.parameters())

    def penalized(one_node):
        monkeypatch.setattr(steps, "ONE_NODE_STEP", one_node)
        out = model(x, **call)
        grads = torch.autograd.grad(out.loss + use(out), params, create_graph=True)
        total = out.loss + sum(g.square().sum() for g in grads)
        return torch.autograd.grad(total, params)

    for got, want in zip(penalized(True), penalized(False), strict=True):
        # the same terms, summed in another order where three or more reach one tensor
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tied", [True, False])
def test_second_order(tied, monkeypatch):
    config = dict(tied=tied, noise=fastae.MaskingNoise(0.3, seed=5), contractive=0.2)
    model = _model(dict(config, sparsity=fastae.KLSparsity(0.1, 0.5)))
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_second_order(model, x, lambda out: out.code.sum(), monkeypatch)


# ----------------------------------------------------------------------------- deep

DEEP_SIZES = [(5,), (6, 4), (6, 5, 3)]
DEEP_CONFIGS = [
    dict(config, sizes=DEEP_SIZES[i % 3])
    for i, config in enumerate(c for c in CONFIGS if not c["contractive"])
]


def _deep(config, dtype=torch.float64):
    torch.manual_seed(0)
    config = {"activation": "sigmoid", **config}
    config.pop("contractive", None)
    return fastae.DeepAutoencoder(7, config.pop("sizes"), **config).to(dtype)


@pytest.mark.parametrize("config", DEEP_CONFIGS, ids=str)
def test_deep_loss_step_equals_the_ops_composed(config, monkeypatch):
    model = _deep(config)
    x = _inputs(config)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


@pytest.mark.parametrize("config", DEEP_CONFIGS[::4], ids=str)
def test_deep_every_output_used(config, monkeypatch):
    """Gradients through the code, the per-sample losses and the penalty besides the loss
    reach the parameters as through the ops."""
    model = _deep(config)
    x = torch.rand(6, 7, dtype=torch.float64)
    g_code = torch.randn(6, model.hidden_features, dtype=torch.float64)
    uses = [
        lambda out: out.loss * 0.5,
        lambda out: out.reconstruction_loss * 2.0,
        lambda out: (out.code * g_code).sum(),
        lambda out: out.per_sample[1] * 3.0,
        lambda out: sum(out.penalties.values(), torch.zeros((), dtype=torch.float64)) * 0.7,
    ]
    _assert_same(model, x, uses, monkeypatch)


@pytest.mark.parametrize("use", ["code", "sparsity"])
def test_deep_only_the_encoder_used(use, monkeypatch):
    """A loss on the code or the penalty alone skips the decoder's backward."""
    model = _deep(dict(sizes=(6, 5, 3), sparsity=fastae.KLSparsity(0.1, 0.5)))
    x = torch.rand(6, 7, dtype=torch.float64)
    if use == "code":
        _assert_same(model, x, [lambda out: out.code.square().sum()], monkeypatch)
    else:
        _assert_same(model, x, [lambda out: out.penalties["sparsity"]], monkeypatch)


@pytest.mark.parametrize(
    "frozen",
    ["weights.0", "biases.1", "weights.2", "decoder_weights.2", "decoder_biases.0",
     "decoder_weights.0", "weights", "weights+biases", "decoder_weights+decoder_biases",
     "weights.1+decoder_biases.1"],
)  # fmt: skip
@pytest.mark.parametrize("tied", [True, False])
def test_deep_some_parameters_frozen(frozen, tied, monkeypatch):
    """Frozen parameters (a name, or every parameter under a list's name) get no gradient,
    the others the ops' gradients; with the whole encoder frozen the code and the penalty
    require none."""
    if tied and "decoder_weights" in frozen:
        pytest.skip("a tied model has no decoder weights")
    config = dict(sizes=(6, 5, 3), tied=tied, sparsity=fastae.KLSparsity(0.1, 0.5))
    model = _deep(dict(config, noise=fastae.MaskingNoise(0.3, seed=5)))
    names = dict(model.named_parameters())
    frozen_names = [
        n for n in names for part in frozen.split("+") if n == part or n.startswith(part + ".")
    ]
    for name in frozen_names:
        names[name].requires_grad_(False)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)
    assert all(names[name].grad is None for name in frozen_names)
    assert all(p.grad is not None for n, p in names.items() if n not in frozen_names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deep_low_precision_step(dtype, monkeypatch):
    model = _deep(dict(sizes=(6, 4), sparsity=fastae.KLSparsity(0.1, 0.5)), dtype)
    x = torch.rand(16, 7, dtype=dtype)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


def test_deep_regenerated_corrupted_input(monkeypatch):
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
    model = _deep(dict(sizes=(6, 4), noise=fastae.GaussianNoise(0.2, seed=6), tied=True))
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


@pytest.mark.parametrize(
    ("low_precision", "fusion"), [(False, "gemm"), (False, "split"), (True, "gemm")]
)
def test_deep_triton_backend(low_precision, fusion, monkeypatch):
    """The kernels (interpreted on the CPU) through the one node, as through the ops."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    config = dict(noise=fastae.MaskingNoise(0.3, seed=5), sparsity=fastae.KLSparsity(0.1, 0.5))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _triton_dtype(low_precision, device)
    model = _deep(dict(config, sizes=(6, 5, 3), activation="sigmoid"), dtype).to(device)
    x = torch.rand(6, 7, dtype=dtype, device=device)
    with fastae.use_backend("triton"):
        _assert_same(model, x, [lambda out: out.loss + out.code.sum()], monkeypatch)


@pytest.mark.parametrize("tied", [True, False])
def test_deep_second_order(tied, monkeypatch):
    config = dict(sizes=(6, 5, 3), tied=tied, noise=fastae.MaskingNoise(0.3, seed=5))
    model = _deep(dict(config, activation="sigmoid", sparsity=fastae.KLSparsity(0.1, 0.5)))
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_second_order(model, x, lambda out: out.code.sum(), monkeypatch)


# ----------------------------------------------------------------------------- stack

STACK_CONFIGS = [
    dict(tied=tied, noise=noise, output=output, loss=loss)
    for tied, noise, (output, loss) in itertools.product(
        [True, False], NOISES, [("sigmoid", "bce"), ("identity", "mse")]
    )
]


def _stack(config, widths=(7, 6, 5, 3), dtype=torch.float64):
    """A StackModule of sigmoid layers as StackedAutoencoder builds them: the bottom with
    ``config``'s output and loss, the upper ones reconstructing codes with BCE."""
    torch.manual_seed(0)
    layers = [
        fastae.Autoencoder(
            widths[k], widths[k + 1], **dict(config, output="sigmoid", loss="bce") if k else config
        )
        for k in range(len(widths) - 1)
    ]
    return StackModule(layers).to(dtype)


@pytest.mark.parametrize("config", STACK_CONFIGS, ids=str)
def test_stack_step_equals_the_ops_composed(config, monkeypatch):
    model = _stack(config)
    x = torch.rand(6, 7, dtype=torch.float64)
    g_code = torch.randn(6, 3, dtype=torch.float64)
    uses = [lambda out: out.loss, lambda out: (out.code * g_code).sum() + out.per_sample[2]]
    _assert_same(model, x, uses, monkeypatch)


def test_stack_step_is_the_deep_autoencoders_step():
    """A sigmoid stack without penalties trains as the DeepAutoencoder of its weights."""
    config = dict(tied=False, noise=fastae.MaskingNoise(0.3, seed=5), output="sigmoid")
    stack = _stack(dict(config, loss="bce"), widths=(7, 6, 3))
    deep = fastae.DeepAutoencoder(7, (6, 3), activation="sigmoid", **config).double()
    bottom, top = stack.layers
    with torch.no_grad():
        for mine, theirs in [
            (deep.weights, (bottom.weight, top.weight)),
            (deep.biases, (bottom.bias, top.bias)),
            (deep.decoder_weights, (bottom.decoder_weight, top.decoder_weight)),
            (deep.decoder_biases, (bottom.decoder_bias, top.decoder_bias)),
        ]:
            for p, q in zip(mine, theirs, strict=True):
                p.copy_(q)
    x = torch.rand(6, 7, dtype=torch.float64)
    outs = [model(x) for model in (stack, deep)]
    for out in outs:
        out.loss.backward()
    for name in ("loss", "per_sample", "code"):
        torch.testing.assert_close(getattr(outs[0], name), getattr(outs[1], name), rtol=0, atol=0)
    pairs = [
        (bottom.weight, deep.weights[0]), (top.weight, deep.weights[1]),
        (bottom.decoder_weight, deep.decoder_weights[0]),
        (top.decoder_bias, deep.decoder_biases[1]),
    ]  # fmt: skip
    for p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [{"contractive": 0.2}, {"sparsity": fastae.L1Sparsity(0.1)}, {"activation": "relu"}],
    ids=str,
)
@pytest.mark.parametrize("layer", [0, 1])
def test_other_stacks_compose_the_ops(change, layer):
    """Per-layer penalties, or units whose codes the upper layers reconstruct linearly, are
    not a DeepAutoencoder's network: the ops composed."""
    model = _stack(dict(tied=True, output="sigmoid", loss="bce"), widths=(7, 6, 3))
    for name, value in change.items():
        setattr(model.layers[layer], name, value)
    if change.get("activation") and layer:
        model.layers[layer].loss_name, model.layers[layer].output = "mse", "identity"
    out = model(torch.rand(6, 7, dtype=torch.float64))
    assert "DeepAutoencoderStep" not in type(out.loss.grad_fn).__name__


@pytest.mark.parametrize("low_precision", [False, True], ids=["wide", "bfloat16"])
def test_stack_triton_backend(low_precision, monkeypatch):
    """The kernels (interpreted on the CPU) through the one node, as through the ops."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _triton_dtype(low_precision, device)
    config = dict(tied=True, noise=fastae.MaskingNoise(0.3, seed=5), output="sigmoid", loss="bce")
    model = _stack(config, dtype=dtype).to(device)
    x = torch.rand(6, 7, dtype=dtype, device=device)
    with fastae.use_backend("triton"):
        _assert_same(model, x, [lambda out: out.loss + out.code.sum()], monkeypatch)


# ----------------------------------------------------------------------------- VAE

VAE_CONFIGS = [
    dict(activation=a, output=o, loss=loss, beta=beta)
    for (a, (o, loss)), beta in itertools.product(
        [
            ("relu", ("sigmoid", "bce")),
            ("sigmoid", ("identity", "mse")),
            ("tanh", ("sigmoid", "mse")),
            ("softplus", ("sigmoid", "bce")),
        ],
        [1.0, 0.25],
    )
]
VAE_PARAMS = [
    "encoder.weight", "encoder.bias", "posterior.weight", "posterior.bias",
    "decoder_hidden.weight", "decoder_hidden.bias", "decoder.weight", "decoder.bias",
]  # fmt: skip


DEEP = (6, 5, 4)  # hidden widths of a deep VAE: three layers each side
DEEP_VAE_PARAMS = [
    f"{layer}.{kind}"
    for layer in ["encoder", "encoder_stack.0", "encoder_stack.1", "posterior",
                  "decoder_hidden", "decoder_stack.0", "decoder_stack.1", "decoder"]
    for kind in ("weight", "bias")
]  # fmt: skip


def _vae(config=None, dtype=torch.float64, hidden=5):
    torch.manual_seed(0)
    return fastae.VAE(7, hidden, 3, **(config or {})).to(dtype)


def _vae_outputs_and_grads(model, x, uses, one_node, monkeypatch, seed=11):
    monkeypatch.setattr(steps, "ONE_NODE_STEP", one_node)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the draw of a seed=None step
    out = model(x, seed=seed)
    assert ("VAEStep" in type(out.loss.grad_fn).__name__) == one_node
    sum(use(out) for use in uses).backward()
    values = [out.loss, out.elbo, out.reconstruction, out.kl, out.per_sample, out.mu]
    values += [out.logvar, out.z]
    needs = torch.tensor([v.requires_grad for v in values])  # compared with the values
    return [needs] + [v.detach() for v in values], [p.grad for p in model.parameters()]


def _assert_same_vae(model, x, uses, monkeypatch, seed=11):
    got = _vae_outputs_and_grads(model, x, uses, True, monkeypatch, seed)
    want = _vae_outputs_and_grads(model, x, uses, False, monkeypatch, seed)
    _assert_identical(got[0] + got[1], want[0] + want[1])


@pytest.mark.parametrize("hidden", [5, DEEP], ids=["one_layer", "deep"])
@pytest.mark.parametrize("config", VAE_CONFIGS, ids=str)
def test_vae_loss_step_equals_the_ops_composed(config, hidden, monkeypatch):
    model = _vae(config, hidden=hidden)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_vae(model, x, [lambda out: out.loss], monkeypatch)


def test_vae_fresh_seed_draws_as_the_ops(monkeypatch):
    """seed=None: the one node draws its Philox seed from torch's generator as the ops do."""
    model = _vae()
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_vae(model, x, [lambda out: out.loss], monkeypatch, seed=None)


@pytest.mark.parametrize("hidden", [5, DEEP], ids=["one_layer", "deep"])
@pytest.mark.parametrize("config", VAE_CONFIGS[::3], ids=str)
def test_vae_every_output_used(config, hidden, monkeypatch):
    """Gradients through every output besides the loss (ELBO, both loss terms, the
    posterior parameters and the sample) reach the parameters as through the ops."""
    model = _vae(config, hidden=hidden)
    x = torch.rand(6, 7, dtype=torch.float64)
    # random weights on every element: where three gradients reach one tensor, the order of
    # their sum shows in the last bits
    g = torch.randn(5, 6, dtype=torch.float64)
    g_code = torch.randn(3, 6, 3, dtype=torch.float64)
    uses = [
        lambda out: out.loss * 0.5,
        lambda out: (out.elbo * g[0]).sum(),
        lambda out: (out.reconstruction * g[1]).sum(),
        lambda out: (out.kl * g[2]).sum(),
        lambda out: (out.per_sample * g[3]).sum(),
        lambda out: (out.mu * g_code[0]).sum(),
        lambda out: (out.logvar * g_code[1]).sum(),
        lambda out: (out.z * g_code[2]).sum(),
    ]
    _assert_same_vae(model, x, uses, monkeypatch)


@pytest.mark.parametrize(
    "use",
    [
        lambda out: out.mu.square().sum(),
        lambda out: out.z.sum() + out.logvar[0, 1],
        lambda out: out.kl.sum(),
        lambda out: out.reconstruction.mean(),
    ],
    ids=["mu", "z_logvar", "kl", "reconstruction"],
)
@pytest.mark.parametrize("hidden", [5, DEEP], ids=["one_layer", "deep"])
def test_vae_some_outputs_used(use, hidden, monkeypatch):
    """A loss on some outputs only skips the backward passes the others would need."""
    model = _vae(hidden=hidden)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_vae(model, x, [use], monkeypatch)


@pytest.mark.parametrize("hidden", [5, DEEP], ids=["one_layer", "deep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vae_low_precision_step(dtype, hidden, monkeypatch):
    """float32 and bfloat16 parameters (the KL and the losses in float32 either way)."""
    model = _vae(dtype=dtype, hidden=hidden)
    x = torch.rand(16, 7, dtype=dtype)
    _assert_same_vae(model, x, [lambda out: out.loss], monkeypatch)


# layers frozen together (a parameter's name starts with its layer's)
GROUPS = ["encoder", "encoder+posterior"]
DEEP_GROUPS = [
    "encoder+encoder_stack", "encoder+encoder_stack+posterior", "encoder_stack",
    "decoder_hidden+decoder_stack", "decoder_stack", "encoder_stack+decoder_stack",
]  # fmt: skip


@pytest.mark.parametrize(
    ("hidden", "frozen"),
    [(5, name) for name in VAE_PARAMS + GROUPS]
    + [(DEEP, name) for name in DEEP_VAE_PARAMS[::3] + DEEP_GROUPS],
)  # fmt: skip
def test_vae_some_parameters_frozen(hidden, frozen, monkeypatch):
    model = _vae(hidden=hidden)
    names = dict(model.named_parameters())
    if frozen in names:
        frozen_names = [frozen]
    else:
        layers = frozen.split("+")
        frozen_names = [n for n in names if n.split(".")[0] in layers]
    for name in frozen_names:
        names[name].requires_grad_(False)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_vae(model, x, [lambda out: out.loss], monkeypatch)
    assert all(names[name].grad is None for name in frozen_names)
    assert all(p.grad is not None for n, p in names.items() if n not in frozen_names)


def test_vae_bad_input_named(monkeypatch):
    model = _vae(dtype=torch.float32)
    with pytest.raises(ValueError, match="^x must lie in"):
        model(torch.rand(4, 7) + 1)
    with pytest.raises(ValueError, match="x must have at least one row"):
        model(torch.rand(0, 7))
    with pytest.raises(ValueError, match="seed must be in"):
        model(torch.rand(4, 7), seed=-1)


@pytest.mark.parametrize(
    ("hidden", "low_precision", "fusion"),
    [(5, low, fusion) for low in (False, True) for fusion in ("gemm", "split")]
    + [(DEEP, False, "gemm"), (DEEP, True, "split")],
)  # fmt: skip
def test_vae_triton_backend(hidden, low_precision, fusion, monkeypatch):
    """The kernels (interpreted on the CPU) through the one node, as through the ops."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTAE_ENCODER_FUSION", fusion)
    monkeypatch.setenv("FASTAE_DECODER_FUSION", fusion)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _vae(dtype=_triton_dtype(low_precision, device), hidden=hidden).to(device)
    dtype = model.encoder.weight.dtype
    x = torch.rand(6, 7, dtype=dtype, device=device)
    with fastae.use_backend("triton"):
        _assert_same_vae(model, x, [lambda out: out.loss + out.z.sum()], monkeypatch)


@pytest.mark.parametrize("hidden", [5, DEEP], ids=["one_layer", "deep"])
def test_vae_second_order(hidden, monkeypatch):
    model = _vae(hidden=hidden)
    x = torch.rand(6, 7, dtype=torch.float64)
    _assert_same_second_order(model, x, lambda out: out.mu.sum(), monkeypatch, seed=4)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["autoencoder", "deep", "vae", "deep_vae"])
def test_training_runs_equal_the_ops_composed(kind, monkeypatch):
    """Three epochs of fastae.fit (Adam, shuffled batches, fresh noise and eps seeds each step)
    end with the same weights and losses, bit for bit, whether each step is one node or the
    ops composed."""
    data = torch.rand(40, 7, dtype=torch.float64)

    def train(one_node):
        monkeypatch.setattr(steps, "ONE_NODE_STEP", one_node)
        if kind in ("vae", "deep_vae"):
            model = _vae(hidden=DEEP if kind == "deep_vae" else 5)
        elif kind == "deep":
            config = dict(noise=fastae.MaskingNoise(0.2), sparsity=fastae.KLSparsity(0.1, 0.5))
            model = _deep(dict(config, sizes=(6, 5, 3), activation="sigmoid", tied=True))
        else:
            config = dict(noise=fastae.MaskingNoise(0.2), sparsity=fastae.KLSparsity(0.1, 0.5))
            model = _model(dict(config, contractive=0.2))
        history = fastae.fit(
            model, data, epochs=3, batch_size=12, lr=1e-2, seed=3, progress=False,
            validation_data=data[:8],
        )  # fmt: skip
        return model.state_dict(), history.loss + history.val_loss

    (got, got_losses), (want, want_losses) = train(True), train(False)
    assert got_losses == want_losses
    assert list(got) == list(want)
    _assert_identical(list(got.values()), list(want.values()))


@pytest.mark.parametrize("kind", ["autoencoder", "deep", "vae"])
def test_a_layer_without_bias(kind, monkeypatch):
    """A bias set to None (the ops take bias=None) gets no gradient from the one node, which
    autograd would refuse; the others get the ops' gradients."""
    x = torch.rand(6, 7, dtype=torch.float64)
    if kind == "vae":
        model = _vae()
        model.decoder = torch.nn.Linear(5, 7, bias=False, dtype=torch.float64)
        _assert_same_vae(model, x, [lambda out: out.loss], monkeypatch)
        return
    if kind == "deep":
        model = _deep(dict(sizes=(6, 4)))
        model.biases[0] = None
    else:
        model = _model(dict(sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2))
        model.bias = None
    _assert_same(model, x, [lambda out: out.loss], monkeypatch)


@pytest.mark.parametrize("kind", ["autoencoder", "deep", "vae"])
def test_backward_traced_by_compiled_autograd(kind, monkeypatch):
    """An eager step (one node) whose backward compiled autograd traces: the backward calls
    the ops, not their bodies (dynamo cannot trace the bodies' numpy Philox, which redraws the
    noise and eps here), with the gradients of the backward run eagerly."""
    monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
    torch.manual_seed(0)
    noise = fastae.MaskingNoise(0.3, seed=5)
    if kind == "autoencoder":
        model = fastae.Autoencoder(7, 5, noise=noise, contractive=0.2)
    elif kind == "deep":
        model = fastae.DeepAutoencoder(7, [5, 3], noise=noise)
    else:
        model = fastae.VAE(7, 5, 3)
    eager_model = torch.compiler.disable(model)
    x = torch.rand(6, 7)

    def step(x):
        loss = eager_model(x).loss
        assert "Step" in type(loss.grad_fn).__name__  # the one node
        loss.backward()
        return loss.detach()

    def grads(traced: bool):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(1)  # the same seeds drawn for the noise and eps
        if traced:
            with torch._dynamo.config.patch(compiled_autograd=True):
                loss = torch.compile(step, backend="aot_eager")(x)
            torch._dynamo.reset()
        else:
            loss = step(x)
        return [loss] + [p.grad for p in model.parameters()]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("low_precision", [False, True], ids=["wide", "bfloat16"])
def test_l1_sparsity_step_through_the_kernels_equals_the_ops_composed(low_precision, monkeypatch):
    """With an L1 penalty the gradient of the sparsity term reaches each code unit (one value
    per unit, broadcast by autograd through the sum): through the kernels (interpreted on the
    CPU) the one node gives the ops' gradients."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _triton_dtype(low_precision, device)
    model = _model(dict(activation="sigmoid", sparsity=fastae.L1Sparsity(0.2)), dtype).to(device)
    x = torch.rand(6, 7, dtype=dtype, device=device)
    with fastae.use_backend("triton"):
        _assert_same(model, x, [lambda out: out.loss], monkeypatch)


@pytest.mark.parametrize(
    ("sparsity", "penalty"),
    [
        (fastae.L1Sparsity(0.2), lambda rho_hat: 0.2 * rho_hat.sum()),
        (fastae.KLSparsity(0.1, 0.5), lambda rho_hat: 0.5 * naive_kl(0.1, rho_hat)),
    ],
    ids=["l1", "kl"],
)
def test_sparsity_penalty_alone_reaches_the_encoder(sparsity, penalty):
    """Backpropagating the sparsity penalty alone (no reconstruction loss) gives the encoder's
    weight and bias the gradient of the penalty on the mean sigmoid activations, derived here
    from h = sigmoid(x W^T + b) in float64."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(7, 5, activation="sigmoid", sparsity=sparsity).double()
    x = torch.rand(6, 7, dtype=torch.float64)
    out = model(x)
    assert "Step" in type(out.loss.grad_fn).__name__  # the one-node step
    out.penalties["sparsity"].backward()

    weight = model.weight.detach().clone().requires_grad_(True)
    bias = model.bias.detach().clone().requires_grad_(True)
    rho_hat = torch.sigmoid(x @ weight.t() + bias).mean(0)
    want_weight, want_bias = torch.autograd.grad(penalty(rho_hat), (weight, bias))
    assert model.weight.grad is not None and model.bias.grad is not None
    torch.testing.assert_close(model.weight.grad, want_weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bias.grad, want_bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hidden", [5, (6, 5, 4)], ids=["one_layer", "deep"])
def test_vae_posterior_bias_alone_trainable_keeps_the_latents_differentiable(hidden):
    """With the encoder layers and the posterior weight frozen but the posterior bias
    trainable, mu, logvar, z and the KL term still depend on a trainable parameter, so they
    require a gradient; d sum(mu) / d bq is the batch size for mu's entries of bq and zero for
    logvar's (posterior = h Wq^T + bq, mu its first half)."""
    torch.manual_seed(0)
    model = fastae.VAE(7, hidden, 3).double()
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("encoder", "encoder_stack") or name == "posterior.weight":
            p.requires_grad_(False)
    x = torch.rand(6, 7, dtype=torch.float64)
    out = model(x, seed=11)
    assert "VAEStep" in type(out.loss.grad_fn).__name__  # the one-node step
    assert out.mu.requires_grad and out.logvar.requires_grad
    assert out.z.requires_grad and out.kl.requires_grad
    out.mu.sum().backward()
    want = torch.tensor([6.0, 6.0, 6.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(model.posterior.bias.grad, want, rtol=0, atol=0)


def test_training_forward_on_a_dual_input_carries_the_tangent():
    """A training-mode forward (parameters requiring gradients) on an input carrying a
    forward-mode tangent (torch.autograd.forward_ad) gives the loss the directional derivative
    along it, matching a float64 central difference, and still backpropagates to the
    weights."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    model = fastae.Autoencoder(7, 5, activation="sigmoid").double()
    x = torch.rand(6, 7, dtype=torch.float64) * 0.8 + 0.1
    direction = torch.randn(6, 7, dtype=torch.float64)
    with forward_ad.dual_level():
        out = model(forward_ad.make_dual(x, direction))
        tangent = forward_ad.unpack_dual(out.loss).tangent
        out.loss.backward()
    eps = 1e-6
    with torch.no_grad():
        ahead = model(x + eps * direction).loss
        behind = model(x - eps * direction).loss
    assert tangent is not None
    torch.testing.assert_close(tangent, (ahead - behind) / (2 * eps), rtol=1e-6, atol=1e-9)
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_reconstruction_loss_alone_of_an_l1_model_has_the_reconstruction_gradient():
    """A model with an L1 penalty whose reconstruction loss alone is backpropagated (the
    penalty left out) gives the gradients of mean_i ||h_i W + c - x_i||^2, h =
    sigmoid(x W^T + b) (tied MSE autoencoder), derived here in float64."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(
        7, 5, activation="sigmoid", output="identity", loss="mse", sparsity=fastae.L1Sparsity(0.2)
    ).double()
    x = torch.rand(6, 7, dtype=torch.float64)
    out = model(x)
    assert "Step" in type(out.loss.grad_fn).__name__  # the one-node step
    out.reconstruction_loss.backward()

    weight, bias, decoder_bias = (
        p.detach().clone().requires_grad_(True)
        for p in (model.weight, model.bias, model.decoder_bias)
    )
    h = torch.sigmoid(x @ weight.t() + bias)
    loss = (h @ weight + decoder_bias - x).square().sum(1).mean()
    want = torch.autograd.grad(loss, (weight, bias, decoder_bias))
    got = (model.weight.grad, model.bias.grad, model.decoder_bias.grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
