"""Bad input raises ValueError or TypeError whose message names the argument."""

import copy
import math
import pickle
import types
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

import fastae
from fastae import _checks, ops
from fastae.data import load_digits
from fastae.modules import StackModule
from fastae.noise import GaussianNoise, MaskingNoise, SaltPepperNoise


def names(arg: str) -> str:
    """A regex matching ``arg`` as a whole word at the start of the message."""
    return rf"^{arg}\b"


def good_layer(dtype=torch.float32):
    return (
        torch.rand(4, 5, dtype=dtype),
        torch.randn(3, 5, dtype=dtype),
        torch.randn(3, dtype=dtype),
    )


def good_decoder(dtype=torch.float32):
    return (
        torch.rand(4, 3, dtype=dtype),
        torch.randn(5, 3, dtype=dtype),
        torch.randn(5, dtype=dtype),
        torch.rand(4, 5, dtype=dtype),
    )


# ----------------------------------------------------------------------------- encode

X, W, B = good_layer()
ENCODE_CASES = {
    "x 1-D": (ValueError, "x", dict(x=torch.rand(5))),
    "x 3-D": (ValueError, "x", dict(x=torch.rand(2, 4, 5))),
    "x empty": (ValueError, "x", dict(x=torch.rand(0, 5))),
    "x integer": (TypeError, "x", dict(x=torch.randint(0, 5, (4, 5)))),
    "x bool": (TypeError, "x", dict(x=torch.rand(4, 5) > 0.5)),
    "x list": (TypeError, "x", dict(x=[[1.0] * 5] * 4)),
    "x numpy": (TypeError, "x", dict(x=np.random.rand(4, 5))),
    "x sparse": (TypeError, "x", dict(x=torch.rand(4, 5).to_sparse())),
    "weight 1-D": (ValueError, "weight", dict(weight=torch.randn(5))),
    "weight 3-D": (ValueError, "weight", dict(weight=torch.randn(1, 3, 5))),
    "weight features": (ValueError, "weight", dict(weight=torch.randn(3, 6))),
    "weight transposed": (ValueError, "weight", dict(weight=torch.randn(5, 3))),
    "weight float64": (TypeError, "weight", dict(weight=torch.randn(3, 5, dtype=torch.float64))),
    "weight float16": (TypeError, "weight", dict(weight=torch.randn(3, 5).half())),
    "weight integer": (TypeError, "weight", dict(weight=torch.randint(0, 3, (3, 5)))),
    "weight meta": (ValueError, "weight", dict(weight=torch.randn(3, 5, device="meta"))),
    "weight no rows": (ValueError, "weight", dict(weight=torch.randn(0, 5), bias=None)),
    "bias 2-D": (ValueError, "bias", dict(bias=torch.randn(1, 3))),
    "bias size": (ValueError, "bias", dict(bias=torch.randn(4))),
    "bias float64": (TypeError, "bias", dict(bias=torch.randn(3, dtype=torch.float64))),
    "bias integer": (TypeError, "bias", dict(bias=torch.arange(3))),
    "bias meta": (ValueError, "bias", dict(bias=torch.randn(3, device="meta"))),
    "activation unknown": (ValueError, "activation", dict(activation="gelu")),
    "activation case": (ValueError, "activation", dict(activation="Sigmoid")),
    "activation not str": (ValueError, "activation", dict(activation=torch.sigmoid)),
    "noise dict": (TypeError, "noise", dict(noise={"kind": "masking", "p": 0.5})),
    "noise float": (TypeError, "noise", dict(noise=0.5)),
}


@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_bad_input(case):
    error, arg, override = ENCODE_CASES[case]
    kwargs = dict(x=X, weight=W, bias=B, activation="sigmoid", noise=None) | override
    x, weight, bias = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(error, match=names(arg)):
        ops.encode(x, weight, bias, **kwargs)


def test_x_or_h_on_another_device_than_weight():
    with pytest.raises(ValueError, match=names("weight")):
        ops.encode(torch.rand(4, 5, device="meta"), W, B)
    with pytest.raises(ValueError, match=names("weight")):
        ops.decode_loss(torch.rand(4, 3, device="meta"), V, C, target=T)


def test_encode_good_input_passes():
    h, rho_hat, jac = ops.encode(X, W, B, noise=MaskingNoise(0.5))
    assert h.shape == (4, 3) and rho_hat.shape == (3,) and jac.shape == ()


# ----------------------------------------------------------------------------- corrupt


@pytest.mark.parametrize(
    "x, noise, error, arg",
    [
        (torch.rand(5), MaskingNoise(0.5), ValueError, "x"),
        (torch.randint(0, 2, (3, 4)), MaskingNoise(0.5), TypeError, "x"),
        (torch.rand(3, 4), None, TypeError, "noise"),
        (torch.rand(3, 4), "masking", TypeError, "noise"),
        (torch.rand(3, 4), 0.5, TypeError, "noise"),
        (torch.rand(3, 0), MaskingNoise(0.5), ValueError, "x"),
    ],
)
def test_corrupt_bad_input(x, noise, error, arg):
    with pytest.raises(error, match=names(arg)) as raised:
        ops.corrupt(x, noise)
    if arg == "noise":  # corrupt needs a spec: the message does not offer None
        allowed = "GaussianNoise, MaskingNoise or SaltPepperNoise"
        assert str(raised.value) == f"noise must be {allowed}, got {type(noise).__name__}"


# ----------------------------------------------------------------------------- noise specs

NOISE_CASES = [
    (lambda: MaskingNoise(p=1.0), ValueError, "p"),
    (lambda: MaskingNoise(p=-0.1), ValueError, "p"),
    (lambda: MaskingNoise(p=1.5), ValueError, "p"),
    (lambda: MaskingNoise(p=math.nan), ValueError, "p"),
    (lambda: MaskingNoise(p=math.inf), ValueError, "p"),
    (lambda: MaskingNoise(p="0.5"), TypeError, "p"),
    (lambda: MaskingNoise(p=True), TypeError, "p"),
    (lambda: MaskingNoise(p=torch.tensor(0.5)), TypeError, "p"),
    (lambda: MaskingNoise(p=0.5, rescale=1), TypeError, "rescale"),
    (lambda: MaskingNoise(p=0.5, seed=-1), ValueError, "seed"),
    (lambda: MaskingNoise(p=0.5, seed=2**63), ValueError, "seed"),
    (lambda: MaskingNoise(p=0.5, seed=1.0), TypeError, "seed"),
    (lambda: MaskingNoise(p=0.5, seed=True), TypeError, "seed"),
    (lambda: SaltPepperNoise(p=1.0), ValueError, "p"),
    # below 1 in float64, 1 in float32 (where a rescaled mask would divide by 1 - p = 0)
    (lambda: MaskingNoise(p=1 - 2**-26, rescale=True), ValueError, "p"),
    (lambda: SaltPepperNoise(p=1 - 2**-26), ValueError, "p"),
    (lambda: SaltPepperNoise(p=-0.01), ValueError, "p"),
    (lambda: SaltPepperNoise(p=0.2, low=math.nan), ValueError, "low"),
    (lambda: SaltPepperNoise(p=0.2, high=math.inf), ValueError, "high"),
    (lambda: SaltPepperNoise(p=0.2, high="1"), TypeError, "high"),
    # finite in float64 but not in float32, where the corruption is computed
    (lambda: SaltPepperNoise(p=0.5, low=-1e39), ValueError, "low"),
    (lambda: SaltPepperNoise(p=0.5, high=1e39), ValueError, "high"),
    (lambda: SaltPepperNoise(p=0.5, low=-1e39, high=1e39), ValueError, "low"),
    (lambda: SaltPepperNoise(p=0.5, high=10**400), ValueError, "high"),
    (lambda: GaussianNoise(sigma=-0.5), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=-1e-9), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=math.inf), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=math.nan), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=None), TypeError, "sigma"),
    (lambda: GaussianNoise(sigma=1e39), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=3.5e38), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=10**400), ValueError, "sigma"),
    (lambda: GaussianNoise(sigma=0.1, seed="1"), TypeError, "seed"),
    (lambda: MaskingNoise(0.5).with_seed(-3), ValueError, "seed"),
]


@pytest.mark.parametrize("make, error, arg", NOISE_CASES)
def test_noise_spec_bad_input(make, error, arg):
    with pytest.raises(error, match=names(arg)):
        make()


def test_noise_specs_accept_their_ranges():
    assert MaskingNoise(p=0.0).p == 0.0
    assert MaskingNoise(p=0.999).p == 0.999
    assert MaskingNoise(p=1 - 2**-24).p == 1 - 2**-24  # the largest float32 below 1
    assert GaussianNoise(sigma=0).sigma == 0.0
    assert MaskingNoise(p=0.5, seed=2**63 - 1).seed == 2**63 - 1


# ----------------------------------------------------------------------------- decode_loss

H, V, C, T = good_decoder()
DECODE_CASES = {
    "h 1-D": (ValueError, "h", dict(h=torch.rand(3))),
    "h empty": (ValueError, "h", dict(h=torch.rand(0, 3), target=torch.rand(0, 5))),
    "h integer": (TypeError, "h", dict(h=torch.randint(0, 2, (4, 3)))),
    "weight size": (ValueError, "weight", dict(weight=torch.randn(5, 4))),
    "weight 3-D": (ValueError, "weight", dict(weight=torch.randn(1, 5, 3))),
    "weight dtype": (TypeError, "weight", dict(weight=torch.randn(5, 3, dtype=torch.float64))),
    "weight bf16": (TypeError, "weight", dict(weight=torch.randn(5, 3).bfloat16())),
    "weight meta": (ValueError, "weight", dict(weight=torch.randn(5, 3, device="meta"))),
    "bias size": (ValueError, "bias", dict(bias=torch.randn(3))),
    "bias dtype": (TypeError, "bias", dict(bias=torch.randn(5).half())),
    "bias integer": (TypeError, "bias", dict(bias=torch.arange(5))),
    "target shape": (ValueError, "target", dict(target=torch.rand(4, 6))),
    "target transposed": (ValueError, "target", dict(target=torch.rand(5, 4))),
    "target rows": (ValueError, "target", dict(target=torch.rand(3, 5))),
    "target 1-D": (ValueError, "target", dict(target=torch.rand(20))),
    "target dtype": (TypeError, "target", dict(target=torch.rand(4, 5, dtype=torch.float64))),
    "target integer": (TypeError, "target", dict(target=torch.randint(0, 2, (4, 5)))),
    "target meta": (ValueError, "target", dict(target=torch.rand(4, 5, device="meta"))),
    "target None": (TypeError, "target", dict(target=None)),
    "target sparse": (TypeError, "target", dict(target=torch.rand(4, 5).to_sparse())),
    "output unknown": (ValueError, "output", dict(output="softmax", loss="mse")),
    "loss unknown": (ValueError, "loss", dict(loss="l1")),
    "loss not str": (ValueError, "loss", dict(loss=None)),
    "bce above 1": (ValueError, "target", dict(target=torch.rand(4, 5) + 0.5)),
    "bce below 0": (ValueError, "target", dict(target=torch.rand(4, 5) - 0.5)),
    "bce nan": (ValueError, "target", dict(target=torch.full((4, 5), math.nan))),
    # None would have turned the target check off, "no" left it on
    "check_target None": (TypeError, "check_target", dict(check_target=None)),
    "check_target str": (TypeError, "check_target", dict(check_target="no")),
    "check_target mse": (TypeError, "check_target", dict(loss="mse", check_target=0)),
    "return_reconstruction int": (
        TypeError,
        "return_reconstruction",
        dict(return_reconstruction=1),
    ),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_loss_bad_input(case):
    error, arg, override = DECODE_CASES[case]
    kwargs = dict(h=H, weight=V, bias=C, target=T, output="sigmoid", loss="bce") | override
    h, weight, bias = kwargs.pop("h"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(error, match=names(arg)):
        ops.decode_loss(h, weight, bias, **kwargs)


def test_bce_needs_sigmoid_output():
    with pytest.raises(ValueError, match="output"):
        ops.decode_loss(H, V, C, target=T, output="identity", loss="bce")


def test_bce_accepts_the_closed_unit_interval_and_mse_any_target():
    edges = torch.rand(4, 5).round()  # only 0 and 1
    assert ops.decode_loss(H, V, C, target=edges).shape == (4,)
    wide = torch.randn(4, 5) * 10
    assert torch.isfinite(
        ops.decode_loss(H, V, C, target=wide, output="identity", loss="mse")
    ).all()


# ----------------------------------------------------------------------------- modules


MODULE_CASES = [
    (dict(in_features=0), ValueError, "in_features"),
    (dict(in_features=True), ValueError, "in_features"),
    (dict(in_features=5.0), ValueError, "in_features"),
    (dict(hidden_features=-2), ValueError, "hidden_features"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(output="tanh"), ValueError, "output"),
    (dict(loss="huber"), ValueError, "loss"),
    (dict(output="identity", loss="bce"), ValueError, "loss"),
    (dict(tied=1), TypeError, "tied"),
    (dict(noise="masking"), TypeError, "noise"),
    (dict(sparsity=0.05), TypeError, "sparsity"),
    (dict(sparsity=fastae.KLSparsity(0.05), activation="relu"), ValueError, "sparsity"),
    (dict(contractive=-0.1), ValueError, "contractive"),
    (dict(contractive=math.nan), ValueError, "contractive"),
    (dict(contractive="1"), TypeError, "contractive"),
    (dict(contractive=10**400), ValueError, "contractive"),
    (dict(contractive=1e39), ValueError, "contractive"),  # inf in float32
]


@pytest.mark.parametrize("kwargs, error, arg", MODULE_CASES)
def test_autoencoder_bad_arguments(kwargs, error, arg):
    kwargs = dict(in_features=5, hidden_features=3) | kwargs
    d, hidden = kwargs.pop("in_features"), kwargs.pop("hidden_features")
    with pytest.raises(error, match=names(arg)):
        fastae.Autoencoder(d, hidden, **kwargs)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, "float32", torch.float8_e4m3fn])
@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: fastae.Autoencoder(5, 3, dtype=dtype),
        lambda dtype: fastae.DeepAutoencoder(5, (4, 3), dtype=dtype),
        lambda dtype: fastae.VAE(5, 4, 2, dtype=dtype),
    ],
    ids=["autoencoder", "deep", "vae"],
)
def test_modules_need_a_floating_point_dtype(make, dtype):
    """dtype= names itself where it is not one fastae computes in (a complex one was made
    and refused only at the first forward)."""
    with pytest.raises(TypeError, match=r"^dtype must be None or a floating-point torch.dtype"):
        make(dtype)


@pytest.mark.parametrize(
    "value, error", [(-0.1, ValueError), (math.inf, ValueError), ("1", TypeError)]
)
def test_contractive_set_later_is_checked(value, error):
    model = fastae.Autoencoder(5, 3, contractive=0.1)
    model.contractive = 0.5  # a schedule may change the weight between epochs
    with pytest.raises(error, match=names("contractive")):
        model.contractive = value
    assert model.contractive == 0.5


SET_UP = {
    "autoencoder": lambda **options: fastae.Autoencoder(5, 3, **options),
    "deep": lambda **options: fastae.DeepAutoencoder(5, (4, 3), **options),
    "vae": lambda **options: fastae.VAE(5, 4, 2, **options),
}


@pytest.mark.parametrize(
    "model, attribute, value, error, message",
    [
        ("autoencoder", "activation", "gelu", ValueError, "^activation must be one of"),
        ("deep", "output", "softmax", ValueError, "^output must be one of"),
        ("vae", "loss_name", "l1", ValueError, "^loss must be one of"),
        ("autoencoder", "noise", 0.3, TypeError, "^noise must be None, GaussianNoise"),
        ("deep", "sparsity", 0.1, TypeError, "^sparsity must be None, KLSparsity"),
        # a torch module too, which nn.Module would otherwise take for a child module
        ("autoencoder", "noise", torch.nn.Dropout(0.3), TypeError, "^noise .*, got Dropout$"),
        ("deep", "sparsity", torch.nn.Identity(), TypeError, "^sparsity .*, got Identity$"),
        ("vae", "activation", torch.nn.ReLU(), ValueError, "^activation must be one of"),
        ("autoencoder", "output", "identity", ValueError, "^loss 'bce' needs output 'sigmoid'"),
        ("vae", "output", "identity", ValueError, "^loss 'bce' needs output 'sigmoid'"),
    ],
)
def test_options_set_later_are_checked_at_the_assignment(model, attribute, value, error, message):
    """A model set up again after construction (or by a schedule) is refused what its
    constructor refuses, where the value is set, not trained on as something else."""
    made = SET_UP[model]()
    before = getattr(made, attribute)
    with pytest.raises(error, match=message):
        setattr(made, attribute, value)
    assert getattr(made, attribute) == before and attribute not in dict(made.named_children())
    with pytest.raises(error, match=message):
        SET_UP[model](**{"loss" if attribute == "loss_name" else attribute: value})


@pytest.mark.parametrize("model", ["autoencoder", "deep"])
def test_kl_sparsity_and_activation_are_checked_together_whichever_is_set_later(model):
    with_kl = SET_UP[model](activation="sigmoid", sparsity=fastae.KLSparsity(0.1))
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        with_kl.activation = "tanh"
    with_tanh = SET_UP[model](activation="tanh", output="identity", loss="mse")
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        with_tanh.sparsity = fastae.KLSparsity(0.1)


def test_a_model_set_up_again_trains_as_one_constructed_so():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    options = {"loss": "mse", "output": "identity", "noise": MaskingNoise(0.2, seed=1)}
    constructed = fastae.Autoencoder(5, 3, sparsity=fastae.L1Sparsity(0.1), **options)
    changed = fastae.Autoencoder(5, 3)
    changed.load_state_dict(constructed.state_dict())
    changed.loss_name, changed.output = "mse", "identity"  # the loss first: bce needs sigmoid
    changed.noise, changed.sparsity = options["noise"], fastae.L1Sparsity(0.1)
    want, got = constructed(x), changed(x)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert got.penalties.keys() == want.penalties.keys() == {"sparsity"}


@pytest.mark.parametrize(
    "make, error, arg",
    [
        (lambda: fastae.KLSparsity(rho=0.0), ValueError, "rho"),
        (lambda: fastae.KLSparsity(rho=1.0), ValueError, "rho"),
        (lambda: fastae.KLSparsity(rho=-0.2), ValueError, "rho"),
        (lambda: fastae.KLSparsity(rho=1.3), ValueError, "rho"),
        (lambda: fastae.KLSparsity(rho=math.nan), ValueError, "rho"),
        (lambda: fastae.KLSparsity(rho="0.1"), TypeError, "rho"),
        (lambda: fastae.KLSparsity(rho=0.1, weight=-1.0), ValueError, "weight"),
        (lambda: fastae.KLSparsity(rho=0.1, weight=math.inf), ValueError, "weight"),
        (lambda: fastae.L1Sparsity(weight=-0.5), ValueError, "weight"),
        (lambda: fastae.L1Sparsity(weight=math.nan), ValueError, "weight"),
        (lambda: fastae.L1Sparsity(weight=None), TypeError, "weight"),
        (lambda: fastae.L1Sparsity(weight=1e39), ValueError, "weight"),
        (lambda: fastae.KLSparsity(rho=0.1, weight=1e39), ValueError, "weight"),
    ],
)
def test_sparsity_bad_arguments(make, error, arg):
    with pytest.raises(error, match=names(arg)):
        make()


def test_autoencoder_forward_bad_input():
    model = fastae.Autoencoder(5, 3)
    with pytest.raises(ValueError, match=names("x")):
        model(torch.rand(5))
    with pytest.raises(TypeError, match=names("x")):
        model(torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=names("x")):
        model(torch.rand(4, 6))
    with pytest.raises(TypeError, match=names("x")):
        model.encode(torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=names("x")):
        model.reconstruction_error(torch.rand(4, 6))
    with pytest.raises(ValueError, match=names("x")):
        model(torch.rand(4, 5) * 3)  # BCE needs inputs in [0, 1]
    with pytest.raises(ValueError, match=names("h")):
        model.decode(torch.rand(3))
    with pytest.raises(ValueError, match=names("h")):
        model.decode(torch.rand(4, 5))  # the model has 3 hidden units
    with pytest.raises(TypeError, match=names("h")):
        model.decode(torch.rand(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=names("h")):
        model.decode(torch.randint(0, 2, (4, 3)))
    with pytest.raises(ValueError, match=names("x")):
        model.reconstruct(torch.rand(2, 3, 5))


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "kwargs, error, arg",
    [
        (dict(epochs=0), ValueError, "epochs"),
        (dict(epochs=2.0), ValueError, "epochs"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=True), ValueError, "batch_size"),
        (dict(patience=0), ValueError, "patience"),
        (dict(patience=1.5), ValueError, "patience"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=math.nan), ValueError, "lr"),
        (dict(lr=1e39), ValueError, "lr"),  # inf in float32, where Adam steps
        (dict(lr=2**2000), ValueError, "lr"),  # beyond float64 too
        (dict(data=torch.rand(6, 5, 1)), ValueError, "data"),
        (dict(data=5), TypeError, "data"),
        (dict(validation_data=torch.rand(7)), ValueError, "validation_data"),
        (dict(validation_data=3.0), TypeError, "validation_data"),
        # one-shot iterators would be used up after the first epoch
        (dict(data=iter([torch.rand(6, 5)])), TypeError, "data"),
        (dict(validation_data=(b for b in [torch.rand(6, 5)])), TypeError, "validation_data"),
        # empty data (BCE checked its range with aminmax, MSE reported a loss of 0)
        (dict(data=torch.rand(0, 5)), ValueError, "data"),
        (dict(validation_data=torch.rand(0, 5)), ValueError, "validation_data"),
        (dict(data=DataLoader(TensorDataset(torch.rand(0, 5)))), ValueError, "data"),
        (dict(validation_data=[]), ValueError, "validation_data"),
        # width and dtype are checked against the model, not inside it (which names x)
        (dict(data=torch.rand(6, 4)), ValueError, "data"),
        (dict(validation_data=torch.rand(6, 7)), ValueError, "validation_data"),
        (dict(data=torch.rand(6, 5, dtype=torch.float64)), TypeError, "data"),
        (dict(validation_data=torch.rand(6, 5).half()), TypeError, "validation_data"),
        (dict(data=torch.rand(6, 5).tolist()), TypeError, "data"),  # rows, not batches
        (dict(patience=True), ValueError, "patience"),
        (dict(min_delta=-1.0), ValueError, "min_delta"),
        (dict(min_delta=math.inf), ValueError, "min_delta"),
        (dict(min_delta="0"), TypeError, "min_delta"),
        (dict(seed=True), TypeError, "seed"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(shuffle="no"), TypeError, "shuffle"),
        (dict(progress=1), TypeError, "progress"),
        (dict(restore_best="no"), TypeError, "restore_best"),
        (dict(validation_split=0.0), ValueError, "validation_split"),
        (dict(validation_split=1.0), ValueError, "validation_split"),
        (dict(validation_split="0.1"), TypeError, "validation_split"),
        (dict(validation_split=0.9), ValueError, "validation_split"),  # 6 rows: none to train
        (
            dict(validation_split=0.5, validation_data=torch.rand(2, 5)),
            ValueError,
            "validation_split",
        ),  # fmt: skip
        (dict(validation_split=0.5, data=[torch.rand(6, 5)]), TypeError, "validation_split"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=-1), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm"),
        (dict(max_grad_norm="1"), TypeError, "max_grad_norm"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(weight_decay=math.inf), ValueError, "weight_decay"),
        (dict(weight_decay=True), TypeError, "weight_decay"),
        # strings and mappings are iterable, but not of batches
        (dict(data="abc"), TypeError, "data"),
        (dict(data={"x": torch.rand(6, 5)}), TypeError, "data"),
        (dict(validation_data=b"abc"), TypeError, "validation_data"),
        (dict(data=["ab", "cd"]), TypeError, "data"),  # batches that are not tensors
        # Keras's (x, x) pairs, which would train on two batches of every row
        (dict(data=(torch.rand(6, 5), torch.rand(6, 5))), TypeError, "data"),
        (
            dict(validation_data=(torch.rand(6, 5), torch.rand(6, 5))),
            TypeError,
            "validation_data",
        ),  # fmt: skip
        (dict(validation_data=[(0.5,)]), TypeError, "validation_data"),
        (dict(data=TensorDataset()), ValueError, "data"),
        (dict(validation_data=TensorDataset()), ValueError, "validation_data"),
        # arrays and tensors that hold no usable numbers
        (dict(data=np.array([["a"] * 5] * 6)), TypeError, "data"),
        (dict(data=np.ones((6, 5), dtype=object)), TypeError, "data"),
        (dict(data=np.ones((6, 5), dtype=complex)), TypeError, "data"),
        (dict(validation_data=np.ones((6, 5), dtype=np.complex64)), TypeError, "validation_data"),
        (dict(data=torch.rand(6, 5).to_sparse()), TypeError, "data"),
        (dict(data=torch.rand(6, 5, device="meta")), ValueError, "data"),
        (dict(validation_data=torch.rand(6, 5, device="meta")), ValueError, "validation_data"),
    ],
)
def test_fit_bad_arguments(kwargs, error, arg):
    model = fastae.Autoencoder(5, 3)
    kwargs = dict(data=torch.rand(6, 5), epochs=1, progress=False) | kwargs
    data = kwargs.pop("data")
    with pytest.raises(error, match=names(arg)):
        fastae.fit(model, data, **kwargs)


def test_fit_names_what_to_write_for_keras_arguments():
    """Keras's Model.fit arguments that fit takes otherwise: a TypeError saying what to write
    (Python's own message for any other unknown argument), before anything trains."""
    model = fastae.Autoencoder(5, 3)
    before = model.weight.detach().clone()
    x = torch.rand(6, 5)
    with pytest.raises(
        TypeError, match=r"^fit takes 2 positional arguments \(model, data\), got 3"
    ):
        fastae.fit(model, x, x)
    hints = {
        "y": "takes no target",
        "verbose": "use progress=",
        "callbacks": "pass one function as callback=",
        "learning_rate": "use lr=",
        "initial_epoch": "pass the same optimizer=",
        "sample_weight": "every row alike",
    }
    for name, hint in hints.items():
        with pytest.raises(TypeError, match=rf"^fit got Keras's argument '{name}': .*{hint}"):
            fastae.fit(model, x, **{name: 1})
    with pytest.raises(TypeError, match=r"^fit\(\) got an unexpected keyword argument 'bogus'"):
        fastae.fit(model, x, bogus=1)
    with pytest.raises(TypeError, match=r"^callback must be callable or None, got list: one func"):
        fastae.fit(model, x, callback=[print])
    assert torch.equal(model.weight, before)


def test_fit_warns_that_a_target_shaped_as_the_input_goes_unread():
    """Keras's fit(noisy, clean) ported as a DataLoader of (noisy, clean) pairs: fit trains
    on the batch's first item alone, and says so once; labels (integers) draw no warning."""
    noisy, clean = torch.rand(12, 5), torch.rand(12, 5)
    for pairs in (DataLoader(TensorDataset(noisy, clean), batch_size=4),
                  TensorDataset(noisy, clean)):  # fmt: skip
        with pytest.warns(
            UserWarning, match=r"^data yields \(input, target\) pairs of one shape"
        ) as got:
            fastae.fit(fastae.Autoencoder(5, 3), pairs, epochs=2, progress=False)
        assert len(got) == 1 and {w.filename for w in got} == {__file__}
    for labelled in (DataLoader(TensorDataset(noisy, torch.arange(12)), batch_size=4),
                     TensorDataset(noisy, torch.arange(12))):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fastae.fit(fastae.Autoencoder(5, 3), labelled, epochs=1, progress=False)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_fit_empty_data_names_data(loss):
    model = fastae.Autoencoder(5, 3, output="sigmoid" if loss == "bce" else "identity", loss=loss)
    with pytest.raises(ValueError, match=names("data")):
        fastae.fit(model, torch.rand(0, 5), epochs=2, progress=False)


def test_fit_nested_tensor_data_names_data():
    nested = torch.nested.nested_tensor([torch.rand(2, 5), torch.rand(3, 5)], layout=torch.jagged)
    with pytest.raises(TypeError, match=names("data") + " must be a dense"):
        fastae.fit(fastae.Autoencoder(5, 3), nested, epochs=1, progress=False)


def test_fit_says_a_one_shot_iterable_was_used_up():
    """An iterable that is not an iterator but yields its batches once (an IterableDataset
    over a stream, say) trains an epoch, then fit says why the next has no rows."""

    class Once:
        def __init__(self, batches):
            self.batches = iter(batches)

        def __iter__(self):
            return self.batches

    model = fastae.Autoencoder(5, 3)
    for name in ("data", "validation_data"):
        kwargs = {"data": torch.rand(6, 5), name: Once(list(torch.rand(6, 5).split(3)))}
        with pytest.raises(
            ValueError, match=names(name) + " yielded no rows in epoch 2, .*re-iterable"
        ):
            fastae.fit(model, epochs=2, progress=False, **kwargs)


def test_fit_says_why_batches_may_hold_no_rows():
    model = fastae.Autoencoder(5, 3)
    dropped = DataLoader(TensorDataset(torch.rand(10, 5)), batch_size=16, drop_last=True)
    for name in ("data", "validation_data"):
        kwargs = {"data": torch.rand(6, 5), name: dropped}
        with pytest.raises(ValueError, match=names(name) + " yielded no rows: .*drop_last=True"):
            fastae.fit(model, epochs=1, progress=False, **kwargs)


def test_fit_refuses_batching_options_its_batches_would_drop():
    """batch_size, shuffle and drop_last apply to the tensor, array or Dataset data fit
    batches: given for a DataLoader's (or a list's) batches alone they are errors; batch_size
    batches tensor validation data beside them."""
    model, rows = fastae.Autoencoder(5, 3), torch.rand(16, 5)
    loader = DataLoader(TensorDataset(rows), batch_size=4)
    applies = " applies to tensor, array or Dataset data"
    for kwargs in [{"batch_size": 8}, {"shuffle": False}, {"drop_last": True}]:
        with pytest.raises(ValueError, match=names(next(iter(kwargs))) + applies):
            fastae.fit(model, loader, epochs=1, progress=False, **kwargs)
    with pytest.raises(ValueError, match=names("shuffle") + applies):
        fastae.fit(model, list(rows.split(4)), epochs=1, progress=False, shuffle=True)
    history = fastae.fit(
        model, loader, validation_data=rows, batch_size=8, epochs=1, progress=False
    )
    assert len(history.val_loss) == 1


def test_fit_says_what_drop_last_leaves_and_which_datasets_it_reads():
    model, rows = fastae.Autoencoder(5, 3), torch.rand(10, 5)
    before = copy.deepcopy(model.state_dict())
    leaves = r"^drop_last=True with batch_size=16 leaves no batch of data's 10 rows to train on"
    for data in (rows, rows.numpy(), TensorDataset(rows), Subset(TensorDataset(rows), range(10))):
        with pytest.raises(ValueError, match=leaves):
            fastae.fit(model, data, batch_size=16, drop_last=True, progress=False)
    with pytest.raises(TypeError, match=names("drop_last") + " must be a bool, got int"):
        fastae.fit(model, rows, drop_last=1, progress=False)

    class Unsized(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return rows[index]

    with pytest.raises(TypeError, match=names("data") + " is a Unsized, a Dataset without __len__"):
        fastae.fit(model, Unsized(), progress=False)
    with pytest.raises(ValueError, match=names("validation_data") + " must have at least one row"):
        fastae.fit(model, rows, validation_data=Subset(TensorDataset(rows), []), progress=False)
    with pytest.raises(TypeError, match=names("data") + " must be a tensor, numpy array, Dataset,"):
        fastae.fit(model, {"x": rows}, progress=False)
    pixels = r"got torch.uint8 \(convert it, and rescale 8-bit pixels: x.float\(\) / 255\)$"
    with pytest.raises(TypeError, match=names("data") + r" must have the dtype .*" + pixels):
        fastae.fit(model, (rows * 255).to(torch.uint8), progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_fit_needs_a_model_with_parameters():
    with pytest.raises(TypeError, match=names("model")):
        fastae.fit(torch.nn.Identity(), torch.rand(6, 5), epochs=1, progress=False)
    frozen = fastae.Autoencoder(5, 3).requires_grad_(False)
    with pytest.raises(ValueError, match=names("model") + " has no parameter that requires"):
        fastae.fit(frozen, torch.rand(6, 5), epochs=1, progress=False)
    partly = fastae.Autoencoder(5, 3)
    partly.weight.requires_grad_(False)  # the biases still train
    assert len(fastae.fit(partly, torch.rand(6, 5), epochs=1, progress=False).loss) == 1


def test_fit_checks_its_model_and_optimizer():
    """A model that is no module, an optimizer that is none (a name, a class) or that steps
    another model's parameters (training would change nothing) are refused, by name."""
    model, data = fastae.Autoencoder(5, 3), torch.rand(6, 5)
    with pytest.raises(TypeError, match=names("model") + " must be a torch.nn.Module"):
        fastae.fit(lambda x: x, data, epochs=1, progress=False)
    for optimizer in ("adam", torch.optim.Adam):
        with pytest.raises(TypeError, match=names("optimizer") + " must be a torch.optim"):
            fastae.fit(model, data, epochs=1, optimizer=optimizer, progress=False)
    elsewhere = torch.optim.Adam(fastae.Autoencoder(5, 3).parameters())
    with pytest.raises(ValueError, match=names("optimizer") + " steps none of model's"):
        fastae.fit(model, data, epochs=1, optimizer=elsewhere, progress=False)
    biases = torch.optim.Adam([model.bias])  # some of them: the caller's choice
    before = model.weight.detach().clone()
    fastae.fit(model, data, epochs=1, optimizer=biases, progress=False)
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match=names("model") + " has parameters on the meta device"):
        fastae.fit(fastae.Autoencoder(5, 3, device="meta"), data, epochs=1, progress=False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=names("lr") + " sets the rate of fit's default Adam"):
        fastae.fit(model, data, epochs=1, optimizer=sgd, lr=0.5, progress=False)
    assert fastae.fit(model, data, epochs=1, optimizer=sgd, progress=False).lr == [0.1]
    with pytest.raises(ValueError, match=names("weight_decay") + " sets the L2 penalty of fit's"):
        fastae.fit(model, data, epochs=1, optimizer=sgd, weight_decay=0.1, progress=False)
    assert fastae.fit(model, data, epochs=1, progress=False).lr == [1e-3]


def test_loss_not_finite_pickles_with_its_fields():
    """A fit that diverges in a worker process reaches the parent as itself."""
    history = fastae.History(loss=[1.0, math.nan])
    error = pickle.loads(pickle.dumps(fastae.LossNotFinite("training", 2, math.nan, history, 1)))
    assert (error.which, error.epoch, error.restored_epoch) == ("training", 2, 1)
    assert error.history.loss[0] == 1.0 and math.isnan(error.loss)
    assert "back at the weights of epoch 1" in str(error)


def test_stack_module_checks_its_layers():
    Autoencoder = fastae.Autoencoder
    with pytest.raises(ValueError, match=r"^layers\[1\] takes 5 features, but"):
        StackModule([Autoencoder(6, 4), Autoencoder(5, 3)])
    with pytest.raises(TypeError, match=r"^layers\[1\] must be a fastae.Autoencoder"):
        StackModule([Autoencoder(6, 4), torch.nn.Linear(4, 3)])
    with pytest.raises(ValueError, match=r"^layers\[1\] is torch.float64"):
        StackModule([Autoencoder(6, 4), Autoencoder(4, 3).double()])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_salt_and_pepper_fill_values_must_fit_the_dtype(backend, kernel_device):
    """float16 would turn low=-1e6 into -inf: refused, naming the value, for corrupt and for
    encode; values that round to a finite float16 fill as rounded."""
    device = kernel_device if backend == "triton" else "cpu"
    x = torch.rand(4, 6, dtype=torch.float16, device=device)
    weight = torch.rand(3, 6, dtype=torch.float16, device=device)
    with fastae.use_backend(backend):
        with pytest.raises(ValueError, match="^noise's low=-1000000.0 is beyond torch.float16"):
            ops.corrupt(x, SaltPepperNoise(0.9, low=-1e6, high=1.0, seed=1))
        with pytest.raises(ValueError, match="^noise's high=100000.0 is beyond torch.float16"):
            ops.encode(x, weight, noise=SaltPepperNoise(0.9, low=0.0, high=1e5, seed=1))
        with pytest.raises(ValueError, match="^noise's high=65520.0 is beyond torch.float16"):
            ops.corrupt(x, SaltPepperNoise(0.9, low=0.0, high=65520.0, seed=1))
        filled = ops.corrupt(x, SaltPepperNoise(0.9, low=-6e4, high=6e4, seed=1))
        # beyond float16's largest value (65504) but rounding to it, not to inf
        rounded = ops.corrupt(x, SaltPepperNoise(0.9, low=0.0, high=65519.0, seed=1))
    assert set(filled[filled.abs() > 1].tolist()) <= {-6e4, 6e4} and filled.isfinite().all()
    assert rounded.max() == 65504.0
    # the fill values are rounded to float32 first: just below the threshold, that rounding
    # reaches it (and then inf), in float16 and bfloat16
    bf16_max = torch.finfo(torch.bfloat16).max
    for dtype, high in [
        (torch.float16, 65519.999999),
        (torch.bfloat16, math.nextafter(bf16_max + 2.0**119, 0)),
    ]:
        with fastae.use_backend(backend), pytest.raises(ValueError, match="x would be filled"):
            ops.corrupt(x.to(dtype), SaltPepperNoise(0.9, low=0.0, high=high, seed=1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gaussian_draws_and_rescaled_masks_must_fit_the_dtype(backend, kernel_device):
    """sigma eps reaches 5.68 sigma (Box-Muller with u1 >= 1e-7) and a rescaled mask scales
    kept entries by 1 / (1 - p): where either rounds to inf in x's dtype (float32 for float32
    and float64 inputs, where the noise is computed), refused naming the value; just inside,
    x~ stays finite."""
    device = kernel_device if backend == "triton" else "cpu"
    half = torch.rand(64, 64, dtype=torch.float16, device=device)
    weight = torch.rand(3, 64, dtype=torch.float16, device=device)
    sigma_limit = 65520.0 / ops._LARGEST_NORMAL_DRAW  # float16 rounds 65520 up to inf
    with fastae.use_backend(backend):
        with pytest.raises(ValueError, match=r"^noise's sigma=100000.0 times the largest"):
            ops.corrupt(half, GaussianNoise(1e5, seed=1))
        with pytest.raises(ValueError, match=r"^noise's sigma=11540.0 times .* torch.float16"):
            ops.encode(half, weight, noise=GaussianNoise(11540.0, seed=1))
        with pytest.raises(ValueError, match=r"range \(largest magnitude 3.40282e\+38\)"):
            ops.corrupt(half.double(), GaussianNoise(1e38, seed=1))
        with pytest.raises(ValueError, match=r"^noise's p=0.99999237.* = 131072, beyond torch"):
            ops.corrupt(half, MaskingNoise(1 - 2**-17, rescale=True, seed=1))
        kept = ops.corrupt(half, GaussianNoise(math.floor(sigma_limit), seed=1))
        rescaled = ops.corrupt(half, MaskingNoise(1 - 2**-15, rescale=True, seed=1))
        unscaled = ops.corrupt(half, MaskingNoise(1 - 2**-17, seed=1))  # no factor: allowed
        in_float32 = ops.corrupt(half.float(), MaskingNoise(1 - 2**-17, rescale=True, seed=1))
    assert math.floor(sigma_limit) == 11539
    assert kept.isfinite().all() and kept.abs().max() > 1000
    assert rescaled.isfinite().all() and unscaled.isfinite().all() and in_float32.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32", torch.float8_e4m3fn])
def test_load_digits_needs_a_floating_point_dtype(dtype):
    with pytest.raises(
        TypeError, match=r"^dtype must be a floating-point torch.dtype \(torch.float16"
    ):
        load_digits(dtype)


def test_fit_needs_a_forward_that_returns_a_loss():
    """fit trains ``model(x).loss``: a model returning a bare tensor is told so."""
    layer = torch.nn.Linear(5, 5)
    with pytest.raises(TypeError, match=names("model") + "'s forward must return"):
        fastae.fit(layer, torch.rand(6, 5), epochs=1, progress=False)


def test_fit_refuses_float16_parameters_for_its_default_adam():
    """Adam's moments in float16 divide by zero at the first step (its eps is 0 there):
    refused with the way out; an optimizer of the caller's own trains."""
    model = fastae.Autoencoder(5, 3).half()
    data = torch.rand(32, 5).half()
    with pytest.raises(ValueError, match=names("model") + ".*float16.*pass an optimizer"):
        fastae.fit(model, data, epochs=1, progress=False)
    adam = torch.optim.Adam(model.parameters())
    adam.zero_grad()
    model(data).loss.backward()
    adam.step()  # what fit's default optimizer would have done
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    model = fastae.Autoencoder(5, 3).half()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fastae.fit(model, data, epochs=2, optimizer=sgd, seed=0, progress=False)
    assert all(math.isfinite(loss) for loss in history.loss)
    model = fastae.Autoencoder(5, 3).to(torch.bfloat16)  # bfloat16 has float32's range
    history = fastae.fit(model, data.to(torch.bfloat16), epochs=2, seed=0, progress=False)
    assert all(math.isfinite(loss) for loss in history.loss)
    model = fastae.Autoencoder(5, 3)  # float16 compute, float32 parameters and moments
    with torch.autocast("cpu", dtype=torch.float16):
        history = fastae.fit(model, data.float(), epochs=2, seed=0, progress=False)
    assert all(math.isfinite(loss) for loss in history.loss)


def test_autocast_mixing_float64_names_the_dtypes_as_passed():
    """Under autocast float16/bfloat16/float32 inputs are cast and mix; float64 beside them is
    refused with the dtypes the caller passed (not the autocast dtype they were cast to)."""
    mixed = "torch.autocast, float16, bfloat16 and float32 mix: they are cast to torch.bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"^weight .* x \(torch.float64\), got torch.float32"):
            ops.encode(torch.rand(4, 5).double(), torch.randn(3, 5))
        with pytest.raises(TypeError, match=r"^bias .* x \(torch.float32\), got torch.float64 "):
            ops.encode(torch.rand(4, 5), torch.randn(3, 5), torch.randn(3).double())
        with pytest.raises(TypeError, match=r"^target .* h \(torch.float32\), got torch.float64"):
            ops.decode_loss(torch.rand(4, 3), torch.randn(5, 3), target=torch.rand(4, 5).double())
        with pytest.raises(TypeError, match=mixed):
            ops.decode_loss(torch.rand(4, 3).double(), torch.randn(5, 3), target=torch.rand(4, 5))
        cast, _, _ = ops.encode(torch.rand(4, 5).half(), torch.randn(3, 5), torch.randn(3))
        kept, _, _ = ops.encode(torch.rand(4, 5).double(), torch.randn(3, 5).double())
    assert cast.dtype == torch.bfloat16 and kept.dtype == torch.float64


@pytest.mark.parametrize("where", ["training", "validation"])
def test_fit_stops_at_a_non_finite_loss(where):
    """A NaN in batches a DataLoader yields to a model of the caller's (whose batches fit
    does not check: it may read NaN as missing; MSE lets it through) makes the epoch's loss
    NaN: fit raises, naming the loss and the epoch, instead of training on and reporting
    NaN."""

    class Mine(fastae.Autoencoder):
        pass

    model = Mine(5, 3, output="identity", loss="mse")
    data, val = torch.rand(32, 5), torch.rand(8, 5)
    (data if where == "training" else val)[3, 2] = math.nan
    loaders = [DataLoader(TensorDataset(t), batch_size=8) for t in (data, val)]
    with pytest.raises(fastae.LossNotFinite, match=f"^the {where} loss is nan in epoch 1") as error:
        fastae.fit(model, loaders[0], validation_data=loaders[1], epochs=3, seed=0, progress=False)
    assert isinstance(error.value, FloatingPointError)
    assert (error.value.which, error.value.epoch, math.isnan(error.value.loss)) == (where, 1, True)
    history = error.value.history
    assert math.isnan((history.loss if where == "training" else history.val_loss)[-1])
    assert error.value.restored_epoch is None  # no validation data kept a best epoch
    data[3, 2], val[3, 2] = math.inf, 0.5
    model = Mine(5, 3, output="identity", loss="mse")
    with pytest.raises(FloatingPointError, match="^the training loss is (nan|inf) in epoch 1"):
        fastae.fit(model, loaders[0], validation_data=val, epochs=3, seed=0, progress=False)


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("where", ["data", "validation_data"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_fit_refuses_a_batch_with_nan_or_inf_before_its_step(loss, where, value):
    """A DataLoader's batch for one of fastae's models is checked on the host as it arrives
    (no device sync), before the step it would poison: the batch before it trains, none after.
    """
    output = "sigmoid" if loss == "bce" else "identity"
    torch.manual_seed(0)
    model = fastae.Autoencoder(5, 3, output=output, loss=loss)
    expected = copy.deepcopy(model)
    rows = {"data": torch.rand(32, 5), "validation_data": torch.rand(16, 5)}
    rows[where][9, 2] = value  # in the second batch of data, or the second of validation_data
    loaders = {name: DataLoader(t, batch_size=8) for name, t in rows.items()}
    with pytest.raises(
        ValueError, match=rf"^{where} yielded a batch holding NaN or inf: training on it makes"
    ):
        fastae.fit(model, loaders["data"], validation_data=loaders["validation_data"],
                   epochs=2, progress=False)  # fmt: skip
    # the first batch's step; for validation_data, the first epoch's four (validation follows)
    trained = list(rows["data"].split(8))[: 1 if where == "data" else 4]
    fastae.fit(expected, trained, epochs=1, progress=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["mse", "bce"])
@pytest.mark.parametrize("where", ["data", "validation_data"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_fit_refuses_tensor_data_with_nan_or_inf_before_training(loss, where, value, capsys):
    """Data given whole is checked once, before any step: the weights stay as they were."""
    output = "sigmoid" if loss == "bce" else "identity"
    model = fastae.Autoencoder(5, 3, output=output, loss=loss)
    before = copy.deepcopy(model.state_dict())
    data = {"data": torch.rand(32, 5), "validation_data": torch.rand(8, 5)}
    data[where][3, 2] = value
    with pytest.raises(ValueError, match=rf"^{where} holds NaN or inf \(as torch.float32, the "):
        fastae.fit(model, data["data"], validation_data=data["validation_data"], progress=True)
    assert capsys.readouterr().err == ""  # no progress: no epoch began
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_fit_names_finite_arrays_that_overflow_the_models_dtype():
    model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    data = np.random.default_rng(0).random((16, 5))
    data[0, 0] = 1e300  # finite in float64, inf once converted to the model's float32
    with pytest.raises(ValueError, match=r"^data holds NaN or inf \(as torch.float32, the model"):
        fastae.fit(model, data, progress=False)


def test_a_bce_check_names_nan_as_nan():
    """Not 'values in [nan, nan]' with advice to rescale, as though the range were off."""
    x = torch.rand(4, 5)
    x[1, 1] = math.nan
    with pytest.raises(
        ValueError, match=r"^x holds NaN, where loss 'bce' needs values in \[0, 1\]$"
    ):
        fastae.Autoencoder(5, 3)(x)


def test_fit_names_the_epoch_it_restored_when_those_weights_are_not_finite_either():
    """Patience stops after epoch 2 and puts back epoch 1's weights, which hold an infinite
    parameter too (one the loss reads through a clamp, so every loss stays finite): the error
    says which epoch's weights the model holds, counted from 1 as the epochs are."""

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
            self.extra = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            out = self.model(x)
            return types.SimpleNamespace(loss=out.loss + 0 * self.extra.clamp(-1, 1).sum())

    torch.manual_seed(0)
    holder = Holder()
    sgd = torch.optim.SGD(holder.parameters(), lr=0.1)
    sgd.register_step_post_hook(lambda *_: holder.extra.detach().fill_(math.inf))
    with pytest.raises(fastae.LossNotFinite, match="back at the weights of epoch 1") as error:
        fastae.fit(
            holder, torch.rand(32, 5), epochs=5, batch_size=32, optimizer=sgd, patience=1,
            min_delta=1e6, seed=0, progress=False,
        )  # fmt: skip
    assert (error.value.which, error.value.epoch, error.value.restored_epoch) == (
        "parameters", 2, 1,
    )  # fmt: skip


def test_fit_refuses_to_return_weights_its_last_step_made_non_finite():
    """Each epoch's loss is taken before its steps, so the last step's update shows in none:
    a model that diverged there is not returned as trained (unless restore_best puts back a
    finite best epoch)."""
    data, val = torch.rand(32, 5), torch.rand(8, 5)

    def poisoned(model, at_step):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []

        def hook(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == at_step:
                with torch.no_grad():
                    model.bias.fill_(math.inf)

        sgd.register_step_post_hook(hook)
        return sgd

    torch.manual_seed(0)
    model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    kwargs = dict(epochs=2, batch_size=8, seed=0, progress=False)
    with pytest.raises(
        fastae.LossNotFinite,
        match=r"^the parameters hold NaN or inf after the last step of epoch 2: training "
        r"diverged \(try a lower lr or max_grad_norm\); the model keeps the weights of its",
    ) as error:
        fastae.fit(model, data, optimizer=poisoned(model, 8), **kwargs)
    assert (error.value.which, error.value.epoch, error.value.restored_epoch) == (
        "parameters",
        2,
        None,
    )
    assert math.isnan(error.value.loss) and len(error.value.history.loss) == 2
    assert all(math.isfinite(v) for v in error.value.history.loss) and not model.training
    # with validation data epoch 2's loss comes after the poisoned step (finite: the
    # infinite bias saturates the sigmoid) and is the worse: restore_best puts back epoch 1's
    # finite weights, and fit returns
    model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    history = fastae.fit(model, data, validation_data=val, optimizer=poisoned(model, 8), **kwargs)
    assert history.best_epoch == 0 and history.val_loss[1] > history.val_loss[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # what the optimizer does not step is not checked: an infinite mask left out of it, an
    # unused lazy layer's uninitialised parameter
    holder = torch.nn.Module()
    holder.model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    holder.mask = torch.nn.Parameter(torch.tensor([0.0, -math.inf]))
    holder.lazy = torch.nn.LazyLinear(3)
    holder.forward = holder.model.forward
    sgd = torch.optim.SGD(holder.model.parameters(), lr=0.1)
    history = fastae.fit(holder, data, optimizer=sgd, **kwargs)
    assert len(history.loss) == 2 and history.graphed_steps == 0
    # a parameter a callback thaws into a new parameter group is checked as well: the
    # epoch's one step leaves it infinite
    model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    model.bias.requires_grad_(False)
    sgd = torch.optim.SGD([model.weight, model.decoder_bias], lr=0.1)

    def thaw(epoch, history):
        if epoch == 1:
            model.bias.requires_grad_(True)
            sgd.add_param_group({"params": [model.bias]})
            sgd.register_step_post_hook(lambda *args: model.bias.detach().fill_(math.inf))

    with pytest.raises(fastae.LossNotFinite, match=r"^the parameters hold NaN or inf after"):
        fastae.fit(model, data, epochs=2, batch_size=32, optimizer=sgd, callback=thaw,
                   seed=0, progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- backend


@pytest.mark.parametrize("name", ["cuda", "Triton", "", None, 1])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match=names("backend")):
        fastae.set_backend(name)
    with pytest.raises(ValueError, match=names("backend")), fastae.use_backend(name):
        pass
    assert fastae.get_backend() in ("auto", "triton", "reference")


def test_fit_restores_the_best_epoch_when_a_later_one_diverges():
    """restore_best keeps its promise when training diverges: the model is back at the best
    epoch's weights (in eval mode) and the error carries the history."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(5, 3, output="identity", loss="mse")
    data, val = torch.rand(32, 5), torch.rand(8, 5)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []

    def poison_in_epoch_2(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 6:  # epoch 2's second of four steps
            with torch.no_grad():
                model.weight.fill_(math.nan)

    sgd.register_step_post_hook(poison_in_epoch_2)
    with pytest.raises(fastae.LossNotFinite, match="back at the weights of epoch 1") as error:
        fastae.fit(
            model, data, validation_data=val, epochs=4, batch_size=8, optimizer=sgd, seed=0,
            progress=False,
        )  # fmt: skip
    assert (error.value.which, error.value.epoch, error.value.restored_epoch) == ("training", 2, 1)
    assert len(error.value.history.val_loss) == 1 and not model.training
    with torch.no_grad():
        assert float(model(val).loss) == pytest.approx(error.value.history.val_loss[0], rel=1e-6)


def test_float32s_largest_value_is_finite_in_float32():
    """A weight must be finite in float32: float32's largest finite value itself is, the
    next float64 above it is not."""
    largest = float(np.finfo(np.float32).max)
    assert fastae.L1Sparsity(largest).weight == largest
    with pytest.raises(ValueError, match=r"^weight must be finite in float32"):
        fastae.L1Sparsity(np.nextafter(largest, np.inf))


@pytest.mark.parametrize("where", ["data", "validation_data"])
def test_fit_names_batches_that_are_not_tensors_of_rows(where):
    """Batches a DataLoader or list yields are named by fit's argument, with what to do."""
    rows = torch.rand(16, 5)

    def fit(batches):
        data = {"data": batches, "validation_data": rows}
        if where == "validation_data":
            data = {"data": rows, "validation_data": batches}
        fastae.fit(fastae.Autoencoder(5, 3), data["data"], epochs=1,
                   validation_data=data["validation_data"], progress=False)  # fmt: skip

    message = rf"^{where} must yield batches of rows \(2-D\), got a batch of shape \(5,\): "
    with pytest.raises(ValueError, match=message + r".*DataLoader\(dataset, batch_size=\.\.\.\)$"):
        fit(list(rows))  # single rows
    dicts = r"its batches are dicts; pass each one's input tensor \(batch\['x'\]\), or give a "
    with pytest.raises(TypeError, match=rf"^{where} must yield tensors .*, got a batch of dict: "):
        fit(DataLoader([{"x": row} for row in rows], batch_size=4))
    with pytest.raises(TypeError, match=rf"^{where} as a list must hold batch tensors .*: {dicts}"):
        fit([{"x": rows}])
    message = rf"^{where} must yield batches of the dtype of the model's parameters "
    with pytest.raises(
        TypeError, match=message + r"\(torch.float32\), got a batch of torch.float64$"
    ):
        fit(DataLoader(TensorDataset(rows.double()), batch_size=4))
    # the dtype is named before the values are checked (8-bit pixels lie outside [0, 1])
    pixels = (rows * 255).to(torch.uint8)
    scale = r" \(convert it, and rescale 8-bit pixels: x.float\(\) / 255\)$"
    with pytest.raises(
        TypeError, match=message + r"\(torch.float32\), got a batch of torch.uint8" + scale
    ):
        fit(DataLoader(pixels, batch_size=4))
    with pytest.raises(ValueError, match=rf"^{where} yielded an empty batch, of shape \(0, 5\)$"):
        fit([rows[:8], rows[:0]])
    message = rf"^{where} must yield batches of 5 columns \(the model's in_features\), got a "
    with pytest.raises(ValueError, match=message + r"batch of shape \(8, 4\)$"):
        fit([rows[:8, :4]])
    with pytest.raises(ValueError, match=message + r"batch of shape \(8, 5, 1\)$"):
        fit([rows[:8, :, None]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 batches pass under autocast
        fit([rows.bfloat16()])


def test_a_host_batch_passes_as_it_would_on_the_models_device(monkeypatch):
    """fit checks a batch's dtype on the host, before its copy: under autocast on the model's
    device (a stand-in for CUDA here), a bfloat16 host batch passes for a float32 model."""
    batch, weight = torch.rand(4, 5).bfloat16(), torch.empty(3, 5, device="meta")
    monkeypatch.setattr(_checks, "autocast_available", lambda device_type: True)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: device_type == "meta")
    assert _checks.autocast_together(batch, weight, torch.device("meta"))
    assert not _checks.autocast_together(batch, weight)  # where it is: not the model's device
    assert not _checks.autocast_together(batch.double(), weight, torch.device("meta"))


@pytest.mark.cuda
def test_fit_takes_host_batches_of_the_autocast_dtype_for_a_cuda_model():
    model = fastae.Autoencoder(5, 3).cuda()
    batches = [torch.rand(8, 5).bfloat16() for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        history = fastae.fit(model, batches, validation_data=batches, epochs=1, progress=False)
    assert math.isfinite(history.loss[0]) and math.isfinite(history.val_loss[0])


def test_fit_checks_batches_only_for_fastaes_models():
    """Another model may take batches of other dtypes or shapes (its own checks apply)."""

    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features = 3  # of its embeddings, not of the token ids it takes
            self.embedding = torch.nn.Embedding(10, 3)
            self.autoencoder = fastae.Autoencoder(3, 2, output="identity", loss="mse")

        def forward(self, tokens):
            return self.autoencoder(self.embedding(tokens).mean(1))

    tokens = torch.randint(0, 10, (16, 7))
    history = fastae.fit(Embedded(), [tokens], validation_data=[tokens], epochs=1, progress=False)
    assert len(history.loss) == len(history.val_loss) == 1


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensors_are_refused_as_nested_whatever_their_layout(layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strided nested tensors are a prototype
        x = torch.nested.nested_tensor([torch.rand(2, 5), torch.rand(3, 5)], layout=layout)
    with pytest.raises(
        TypeError, match=r"^x must be a dense \(strided\) tensor, got a nested one$"
    ):
        ops.encode(x, torch.randn(3, 5), torch.randn(3))


def test_autocast_does_not_relax_a_float64_models_dtype_check():
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(
            TypeError,
            match=r"^x must have the dtype of the model's parameters \(torch.float64\), "
            r"got torch.float32$",
        ),
    ):
        fastae.Autoencoder(5, 3).double()(torch.rand(4, 5))


def test_autocast_does_not_relax_a_models_device_check():
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(
            ValueError,
            match=r"^x must be on the device of the model's parameters \(meta\), got cpu$",
        ),
    ):
        fastae.Autoencoder(5, 3).to("meta")(torch.rand(4, 5))


def test_a_models_empty_batch_is_named_by_the_model():
    with pytest.raises(ValueError, match=r"^x must have at least one row, got shape \(0, 5\)$"):
        fastae.Autoencoder(5, 3)(torch.rand(0, 5))


def test_an_option_must_be_a_str_not_a_0d_numpy_array():
    with pytest.raises(
        ValueError,
        match=r"^activation must be one of \('sigmoid', 'tanh', 'relu', 'softplus'\), "
        r"got array\('relu', dtype='<U4'\)$",
    ):
        ops.encode(torch.rand(4, 5), torch.randn(3, 5), activation=np.array("relu"))


def test_fit_needs_a_scalar_loss():
    class PerSampleLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fastae.Autoencoder(5, 3)

        def forward(self, x):
            return types.SimpleNamespace(loss=self.inner(x).per_sample)

    with pytest.raises(
        TypeError,
        match=r"^model's forward must return an object whose \.loss is a scalar tensor, as "
        r"fastae's models do; got SimpleNamespace$",
    ):
        fastae.fit(PerSampleLoss(), torch.rand(8, 5), epochs=1, progress=False)
