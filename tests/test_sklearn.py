"""fastae.sklearn: AutoencoderTransformer and AutoencoderOutlierDetector."""

import copy
import importlib
import math
import pickle
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn import exceptions as sklearn_exceptions  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.ensemble import IsolationForest  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastae  # noqa: E402
from fastae.sklearn import (  # noqa: E402
    AutoencoderOutlierDetector,
    AutoencoderTransformer,
    hold_out,
)

# tiny defaults keep scikit-learn's ~50 checks per estimator fast
TINY = {"n_components": 4, "epochs": 3, "batch_size": 32, "random_state": 0}


@parametrize_with_checks(
    [
        AutoencoderTransformer(**TINY),
        AutoencoderOutlierDetector(**TINY),
        AutoencoderOutlierDetector(model="vae", hidden=8, **TINY),
        AutoencoderTransformer(early_stopping=True, n_iter_no_change=1, **TINY),
        AutoencoderTransformer(model="vae", hidden=8, **TINY),
        AutoencoderOutlierDetector(hidden_layer_sizes=(6,), **TINY),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def _rng_state():
    return torch.random.get_rng_state().clone()


# ----------------------------------------------------------------------------- transformer


def test_transform_shapes_names_and_inverse(digits):
    x, _ = digits
    model = AutoencoderTransformer(12, scale=None, epochs=30, lr=1e-2, random_state=0)
    model.fit(x[:600])
    codes = model.transform(x[:50])
    assert codes.shape == (50, 12) and codes.dtype == np.float64
    assert np.all((codes > 0) & (codes < 1))  # sigmoid units
    assert model.transform(x[:5].astype(np.float32)).dtype == np.float32
    names = model.get_feature_names_out()
    assert list(names[:2]) == ["autoencodertransformer0", "autoencodertransformer1"]
    recon = model.inverse_transform(codes)
    assert recon.shape == (50, 64)
    baseline = ((x[:50] - x[:600].mean(0)) ** 2).sum(1).mean()
    assert ((recon - x[:50]) ** 2).sum(1).mean() < 0.5 * baseline
    with pytest.raises(ValueError, match="n_components"):
        model.inverse_transform(codes[:, :3])
    with pytest.raises(ValueError, match="^Input X contains NaN"):
        model.inverse_transform(np.full_like(codes[:2], np.nan))
    scores = model.score_samples(x[:50])
    assert scores.shape == (50,) and np.all(scores < 0)
    assert model.score(x[:50]) == pytest.approx(scores.mean())


def test_vae_transformer_codes_are_posterior_means(digits):
    """model="vae": transform gives mu, inverse_transform decodes it, score_samples is minus
    the negative ELBO above its minimum (BCE: the inputs' entropy taken off); in a pipeline
    the codes serve a classifier as PCA's would."""
    from fastae.sklearn import bernoulli_entropy

    x, y = digits
    model = AutoencoderTransformer(8, model="vae", scale=None, epochs=20, random_state=0)
    model.fit(x[:600])
    assert isinstance(model.module_, fastae.VAE) and model.module_.latent == 8
    assert model.module_.activation == "relu" and model.loss_ == "bce"
    assert model.get_feature_names_out().shape == (8,)
    x_t = torch.tensor(x[:50], dtype=torch.float64)
    vae = copy.deepcopy(model.module_).double().eval()
    with fastae.use_backend("reference"), torch.no_grad():
        mu = vae.encode(x_t)
        np.testing.assert_allclose(model.transform(x[:50]), mu.numpy(), rtol=1e-10)
        np.testing.assert_allclose(model.inverse_transform(mu.numpy()), vae.decode(mu).numpy(),
                                   rtol=1e-10)  # fmt: skip
        expected = vae.negative_elbo(x_t) - bernoulli_entropy(x_t)
        np.testing.assert_allclose(-model.score_samples(x[:50]), expected.numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="n_components"):
        model.inverse_transform(mu.numpy()[:, :3])
    for name, value in (("noise", fastae.MaskingNoise(0.2)), ("hidden_layer_sizes", (16,))):
        with pytest.raises(ValueError, match=f"{name} applies to model='autoencoder'"):
            AutoencoderTransformer(model="vae", **{name: value}).fit(x[:50])
    # and the other way round: a VAE's settings beside an autoencoder are not dropped
    for make in (AutoencoderTransformer, AutoencoderOutlierDetector):
        for name, value in (("hidden", 64), ("hidden", (128,)), ("beta", 0.5)):
            with pytest.raises(
                ValueError, match=rf"^{name} applies to model='vae', not model='autoencoder'"
            ):
                make(epochs=1, **{name: value}).fit(x[:50])
        make(epochs=1, hidden=np.int64(128), beta=1).fit(x[:50])  # the defaults' values
    pipe = make_pipeline(
        AutoencoderTransformer(16, model="vae", scale=None, epochs=20, lr=3e-3, random_state=0),
        LogisticRegression(max_iter=1000),
    )
    pipe.fit(x[:1200], y[:1200])
    assert pipe.score(x[1200:], y[1200:]) > 0.8


def test_drop_in_for_pca_in_a_pipeline(digits):
    x, y = digits
    pipe = make_pipeline(
        AutoencoderTransformer(16, scale=None, epochs=10, random_state=0),
        LogisticRegression(max_iter=500),
    )
    pipe.fit(x[:1200], y[:1200])
    assert pipe.score(x[1200:], y[1200:]) > 0.85
    search = GridSearchCV(
        make_pipeline(AutoencoderTransformer(epochs=2, random_state=0), LogisticRegression()),
        {"autoencodertransformer__n_components": [4, 8]},
        cv=2,
    )
    search.fit(x[:300], y[:300])
    assert search.best_params_["autoencodertransformer__n_components"] in (4, 8)


def test_weight_decay_reaches_every_adam_the_estimators_train_with(digits, monkeypatch):
    """weight_decay is the L2 penalty of each Adam an estimator builds: fit's, partial_fit's
    (read again at each call), the stack's pretraining and fine-tuning, the classifier's."""
    made = []

    def recording(*args, **kwargs):
        made.append(default_optimizer(*args, **kwargs))
        return made[-1]

    default_optimizer = fastae.training.default_optimizer
    monkeypatch.setattr(fastae.training, "default_optimizer", recording)
    monkeypatch.setattr(fastae.sklearn, "default_optimizer", recording)
    x, y = digits[0][:60], digits[1][:60]
    decayed = {"weight_decay": 0.03, "random_state": 0}
    small = {"epochs": 1} | decayed
    for estimator, target in (
        (AutoencoderTransformer(4, **small), None),
        (AutoencoderOutlierDetector(4, hidden_layer_sizes=(8,), **small), None),
        (fastae.SemiSupervisedAutoencoder(4, **small), y),
        (fastae.StackedAutoencoder([8, 4], pretrain_epochs=1, finetune_epochs=1, **decayed), None),
    ):
        made.clear()
        estimator.fit(x, target)
        expected = 3 if isinstance(estimator, fastae.StackedAutoencoder) else 1
        decays = [group["weight_decay"] for adam in made for group in adam.param_groups]
        assert decays == [0.03] * expected, type(estimator).__name__
    streaming = AutoencoderTransformer(4, **small).partial_fit(x)
    assert streaming._optimizer_state["param_groups"][0]["weight_decay"] == 0.03
    streaming.set_params(weight_decay=0.5).partial_fit(x)
    assert streaming._optimizer_state["param_groups"][0]["weight_decay"] == 0.5
    assert made[-1].state  # the moments of the first call, carried into the second


def test_an_estimator_pickled_before_weight_decay_trains_on_without_it(digits):
    """An estimator whose state holds no weight_decay (pickled before it was a parameter)
    reports, clones and trains with the default, 0."""
    x = digits[0][:60]
    model = AutoencoderTransformer(4, epochs=1, random_state=0).partial_fit(x)
    state = model.__getstate__()
    del state["weight_decay"]
    older = AutoencoderTransformer.__new__(AutoencoderTransformer)
    older.__setstate__(state)
    assert older.get_params()["weight_decay"] == 0.0 and clone(older).weight_decay == 0.0
    older.partial_fit(x)
    assert older._optimizer_state["param_groups"][0]["weight_decay"] == 0.0


def test_weight_decay_shrinks_the_weights_and_is_checked(digits):
    x = digits[0][:200]
    norms = [
        AutoencoderTransformer(8, tied=False, weight_decay=decay, epochs=10, random_state=0)
        .fit(x)
        .module_.weight.norm()
        .item()
        for decay in (0.0, 0.3)
    ]
    assert norms[1] < 0.7 * norms[0], norms  # 0.59 on the CPU
    for value, error, message in (
        (-1e-3, ValueError, r"^weight_decay must be >= 0, got -0.001"),
        (float("nan"), ValueError, r"^weight_decay must be finite"),
        ("1e-3", TypeError, r"^weight_decay must be a real number, got str"),
    ):
        with pytest.raises(error, match=message):
            AutoencoderTransformer(4, weight_decay=value, epochs=1).fit(x)


def test_regularizers_reach_the_module(digits):
    x, _ = digits
    noise, sparsity = fastae.MaskingNoise(0.2), fastae.KLSparsity(0.05, 0.1)
    model = AutoencoderTransformer(
        8, noise=noise, sparsity=sparsity, contractive=0.3, epochs=1, random_state=0
    ).fit(x[:100])
    assert model.module_.noise is noise
    assert model.module_.sparsity is sparsity
    assert model.module_.contractive == 0.3
    assert model.noise is noise  # parameters stay as given
    with pytest.raises(TypeError, match="sparsity"):
        AutoencoderTransformer(sparsity=0.05).fit(x[:20])
    with pytest.raises(TypeError, match="noise"):
        AutoencoderTransformer(noise="masking").fit(x[:20])


def test_a_seeded_cpu_fit_leaves_cuda_alone(digits, monkeypatch):
    """On a machine with GPUs, a fit on the CPU neither reads nor seeds their generators:
    it does not start CUDA (which a process forked from one that had could not)."""
    x, _ = digits
    expected = AutoencoderTransformer(6, epochs=2, random_state=3, device="cpu")
    expected = expected.fit(x[:200]).transform(x[:20])

    def starts_cuda(*args, **kwargs):
        raise AssertionError("CUDA started by a fit on the CPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    # what Adam asks where CUDA is available (without a context: False, starting none)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for name in ("init", "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, starts_cuda)
    before = _rng_state()
    model = AutoencoderTransformer(6, epochs=2, random_state=3, device="cpu").fit(x[:200])
    np.testing.assert_array_equal(model.transform(x[:20]), expected)
    assert torch.equal(before, _rng_state())


@pytest.mark.cuda
def test_a_seeded_gpu_run_draws_as_manual_seed_and_puts_the_generators_back():
    device = torch.device("cuda")
    fastae.training.seed_torch(11, device)
    on_gpu, on_cpu = torch.rand(5, device=device), torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(on_gpu, torch.rand(5, device=device)) and torch.equal(on_cpu, torch.rand(3))
    before = torch.cuda.get_rng_state(), torch.get_rng_state()
    with fastae.sklearn._seeded(3, device):
        torch.rand(4, device=device), torch.rand(4)
    assert torch.equal(torch.cuda.get_rng_state(), before[0])
    assert torch.equal(torch.get_rng_state(), before[1])


def test_random_state_is_resolved_in_fit_and_leaves_torch_alone(digits):
    x, _ = digits
    before = _rng_state()
    a = AutoencoderTransformer(6, epochs=2, random_state=3).fit(x[:200]).transform(x[:20])
    b = AutoencoderTransformer(6, epochs=2, random_state=3).fit(x[:200]).transform(x[:20])
    c = AutoencoderTransformer(6, epochs=2, random_state=4).fit(x[:200]).transform(x[:20])
    assert torch.equal(before, _rng_state())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    rs = np.random.RandomState(0)
    d = AutoencoderTransformer(6, epochs=2, random_state=rs).fit(x[:200]).transform(x[:20])
    e = AutoencoderTransformer(6, epochs=2, random_state=rs).fit(x[:200]).transform(x[:20])
    assert not np.allclose(d, e)  # a RandomState instance advances between fits
    f = AutoencoderTransformer(6, epochs=2, random_state=np.int64(3)).fit(x[:200])
    np.testing.assert_array_equal(f.transform(x[:20]), a)
    AutoencoderTransformer(6, epochs=1, random_state=np.random).fit(x[:200])  # sklearn's too


@pytest.mark.parametrize(
    "random_state, error, message",
    [(np.random.default_rng(0), TypeError,
      r"^random_state must be None, an int or a numpy RandomState, got Generator "
      r"\(np\.random\.RandomState\(seed\) is one\)$"),
     ("0", TypeError, r"^random_state must be None, an int or a numpy RandomState, got str$"),
     (1.5, TypeError, r"^random_state must be None, an int or a numpy RandomState, got float$"),
     (True, TypeError, r"^random_state must be None, an int or a numpy RandomState, got bool$"),
     (-1, ValueError, r"^random_state must be in \[0, 2\*\*32 - 1\], got -1$"),
     (2**32, ValueError, r"^random_state must be in \[0, 2\*\*32 - 1\], got 4294967296$")],
)  # fmt: skip
def test_a_bad_random_state_is_named(random_state, error, message):
    x = np.random.default_rng(0).random((30, 4))
    labels = np.arange(30) % 2
    for estimator, y in [
        (AutoencoderTransformer(2, epochs=1), None),
        (AutoencoderOutlierDetector(2, epochs=1), None),
        (fastae.SemiSupervisedAutoencoder(2, epochs=1), labels),
        (fastae.StackedAutoencoder((3, 2), pretrain_epochs=1, finetune_epochs=1), None),
        (fastae.DECClustering(2, refine_epochs=1), None),
    ]:
        with pytest.raises(error, match=message):
            estimator.set_params(random_state=random_state).fit(x, y)
        assert not hasattr(estimator, "n_features_in_")


@pytest.mark.parametrize(
    "scale, data, loss",
    [("standard", "pixels", "mse"), ("minmax", "pixels", "bce"), (None, "unit", "bce"),
     (None, "pixels", "mse"), (None, "centered", "mse")],
)  # fmt: skip
def test_scaling_options_pick_the_loss(digits, scale, data, loss):
    x, _ = digits
    x = {"unit": x[:100], "pixels": 16 * x[:100], "centered": x[:100] - 0.5}[data]
    model = AutoencoderTransformer(4, scale=scale, epochs=1, random_state=0).fit(x)
    assert model.loss_ == loss
    assert model.module_.loss_name == loss
    assert model.module_.output == ("sigmoid" if loss == "bce" else "identity")
    recon = model.inverse_transform(model.transform(x))
    assert recon.shape == x.shape and np.isfinite(recon).all()
    # values outside the training range are clipped for BCE, not rejected
    assert np.isfinite(model.transform(x * 3 + 1)).all()


def test_bad_parameters_name_themselves(digits):
    x = digits[0][:20]
    with pytest.raises(ValueError, match="scale"):
        AutoencoderTransformer(scale="robust").fit(x)
    with pytest.raises(ValueError, match="loss"):
        AutoencoderTransformer(loss="l1").fit(x)
    with pytest.raises(ValueError, match="inputs in \\[0, 1\\]"):
        AutoencoderTransformer(scale=None, loss="bce").fit(x * 16)
    with pytest.raises(ValueError, match="n_components"):
        AutoencoderTransformer(n_components=0).fit(x)
    with pytest.raises(ValueError, match="epochs"):
        AutoencoderTransformer(epochs=0).fit(x)
    with pytest.raises(ValueError, match="device"):
        AutoencoderTransformer(device="tpu").fit(x)
    with pytest.raises(
        ValueError, match="^device must be 'auto', 'cpu' or a CUDA device, got 'mps'"
    ):
        AutoencoderTransformer(device="mps").fit(x)
    with pytest.raises(ValueError, match="contamination"):
        AutoencoderOutlierDetector(contamination=0.7).fit(x)
    # IsolationForest's "auto" offsets its own score scale; reconstruction errors have none
    with pytest.raises(TypeError, match=r"^contamination must be a float .*no 'auto'"):
        AutoencoderOutlierDetector(contamination="auto").fit(x)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        AutoencoderTransformer(cuda_graph="yes").fit(x)
    # verbose as scikit-learn's estimators take it: a bool or an int >= 0 ("no" showed a bar)
    for estimator, error in (
        (AutoencoderTransformer(verbose="no"), TypeError),
        (fastae.StackedAutoencoder([4], verbose=-1), ValueError),
        (
            fastae.DECClustering(2, verbose=0.5, autoencoder=AutoencoderTransformer(2, epochs=1)),
            TypeError,
        ),
    ):
        with pytest.raises(error, match=r"^verbose must be a bool or an int >= 0, got"):
            estimator.fit(x)
    graphed = AutoencoderOutlierDetector(device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device.*'cpu'"):
        graphed.fit(x)
    assert not hasattr(graphed, "module_")  # refused before anything was fitted


def test_fits_from_threads_repeat_a_sequential_fit(digits):
    """Seeded fits from several threads take turns with torch's generators: each equals the
    fit run alone, and the calling thread's generator is left as it was."""
    x = digits[0][:300]

    def codes():
        model = AutoencoderTransformer(
            8, noise=fastae.MaskingNoise(0.3), epochs=2, random_state=0, device="cpu"
        )
        return model.fit(x).transform(x[:20])

    alone = codes()
    before = _rng_state()
    results = [None] * 4

    def fit_into(i):
        results[i] = codes()

    threads = [threading.Thread(target=fit_into, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_array_equal(result, alone)
    assert torch.equal(_rng_state(), before)


def _detector_vae(**params):
    return AutoencoderOutlierDetector(3, model="vae", hidden=8, **params)


@pytest.mark.parametrize(
    "make",
    [
        lambda **params: AutoencoderTransformer(3, **params),
        lambda **params: AutoencoderOutlierDetector(3, **params),
        _detector_vae,
    ],
    ids=["transformer", "detector", "detector-vae"],
)
def test_a_fit_that_raises_leaves_the_estimator_as_it_was(make, digits, monkeypatch):
    """Failures found only after X is read (the hold-out, BCE's range, a diverging or
    interrupted training) leave every attribute as before the fit: an unfitted estimator
    stays unfitted, a fitted one predicts as it did, and partial_fit's stream of seeds is
    not advanced."""
    x = digits[0][:80]
    model = make(epochs=1, random_state=0, device="cpu", early_stopping=True)
    with pytest.raises(ValueError, match="early_stopping holds out 1 of X's 1 sample"):
        model.fit(x[:1])
    assert not any(name.endswith("_") for name in vars(model))
    with pytest.raises(sklearn_exceptions.NotFittedError):
        model.score_samples(x)
    model.set_params(early_stopping=False).fit(x)
    fitted, scores = dict(vars(model)), model.score_samples(x)

    def unchanged():
        assert vars(model).keys() == fitted.keys()
        assert all(vars(model)[name] is value for name, value in fitted.items())
        np.testing.assert_array_equal(model.score_samples(x), scores)

    for change, data in [({"early_stopping": True}, x[:1]), ({"scale": None}, x * 16)]:
        model.set_params(**change, loss="bce")
        with pytest.raises(ValueError, match="early_stopping holds out|inputs in \\[0, 1\\]"):
            model.fit(data)
        model.set_params(early_stopping=False, scale="standard", loss="auto")
        unchanged()

    def interrupted(module, *args, **kwargs):
        with torch.no_grad():
            next(module.parameters()).add_(1.0)  # training had begun
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fastae.sklearn, "fit", interrupted)
        for method in (model.fit, model.partial_fit):
            with pytest.raises(KeyboardInterrupt):
                method(x)
            unchanged()
    # partial_fit's seeds: a failed call in between draws none of them
    model.partial_fit(x)
    twin = copy.deepcopy(model)
    with monkeypatch.context() as patch:
        patch.setattr(fastae.sklearn, "fit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model.partial_fit(x)
    np.testing.assert_array_equal(
        model.partial_fit(x).score_samples(x), twin.partial_fit(x).score_samples(x)
    )


def test_a_partial_fit_that_diverges_leaves_adams_moments_as_they_were(digits):
    """The moments partial_fit keeps for the next call are not trained in place by a call
    that then fails: after a diverging call the estimator goes on as one that never made it."""
    x = digits[0][:300]  # 100 rows a call: two steps, the second's loss inf at lr=1e30
    for make in (AutoencoderTransformer, AutoencoderOutlierDetector):
        model = make(3, lr=1e-2, random_state=0, device="cpu").partial_fit(x[:100])
        twin = copy.deepcopy(model)
        with pytest.raises(ValueError, match="^training diverged"):
            model.set_params(lr=1e30).partial_fit(x[100:200])
        for index, moments in twin._optimizer_state["state"].items():
            for name, value in moments.items():
                assert torch.equal(model._optimizer_state["state"][index][name], value), name
        model.set_params(lr=1e-2).partial_fit(x[200:])
        np.testing.assert_array_equal(
            model.score_samples(x), twin.partial_fit(x[200:]).score_samples(x)
        )


def test_a_fit_that_raises_keeps_the_callers_random_state_object(digits):
    """A RandomState given as random_state stays the estimator's own after a failed fit,
    its stream put back to where it was (the fit drew from it)."""
    x = digits[0][:100]
    stream = np.random.RandomState(0)
    model = AutoencoderTransformer(3, epochs=1, lr=1e30, random_state=stream)
    with pytest.raises(ValueError, match="^training diverged"):
        model.fit(x)
    assert model.random_state is stream
    np.testing.assert_array_equal(
        stream.randint(2**31, size=4), np.random.RandomState(0).randint(2**31, size=4)
    )


def test_neg_reconstruction_error_scores_in_the_inputs_units(digits):
    """The scorer is minus the mean summed squared error of the round trip in X's units,
    whatever the scaling and loss (the transformers' score is not: it is in their scaled
    space and loss units), for fastae's transformers and PCA alike."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV

    x = digits[0][:300] * 16  # pixel units
    for scale in ("standard", "minmax", None):
        model = AutoencoderTransformer(8, scale=scale, epochs=3, random_state=0).fit(x)
        round_trip = model.inverse_transform(model.transform(x))
        expected = -np.square(x - round_trip).sum(1).mean()
        assert fastae.neg_reconstruction_error(model, x) == pytest.approx(expected, rel=1e-12)
    full = PCA(64).fit(x)  # every component: an exact round trip
    assert fastae.neg_reconstruction_error(full, x) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="^Input X contains NaN"):
        fastae.neg_reconstruction_error(full, np.where(x > 15, np.nan, x))
    detector = AutoencoderOutlierDetector(2, epochs=1).fit(x)
    message = r"^neg_reconstruction_error scores a transformer with transform and inverse_tr"
    for estimator in (detector, make_pipeline(AutoencoderTransformer(2), detector)):
        with pytest.raises(TypeError, match=message):
            fastae.neg_reconstruction_error(estimator, x)
    search = GridSearchCV(
        AutoencoderTransformer(8, epochs=3, random_state=0), {"scale": ["standard", "minmax"]},
        scoring=fastae.neg_reconstruction_error, cv=2,
    ).fit(x)  # fmt: skip
    assert search.best_score_ == max(search.cv_results_["mean_test_score"])
    assert all(score < 0 for score in search.cv_results_["mean_test_score"])


def test_torch_tensors_are_read_as_the_arrays_of_their_values():
    """A tensor X (one that requires grad too) is read as the numpy array of its values, in
    its precision (bfloat16, which numpy lacks, widened exactly to float32): the same fit,
    codes, scores and round trip as that array gives."""
    x = np.random.default_rng(0).random((40, 5))
    bf16 = torch.tensor(x).bfloat16()
    cases = [
        (torch.tensor(x), x),
        (torch.tensor(x, dtype=torch.float32).requires_grad_(), x.astype(np.float32)),
        (bf16, bf16.float().numpy()),
    ]
    for tensor, array in cases:
        from_tensor = AutoencoderTransformer(2, epochs=1, random_state=0).fit(tensor)
        from_array = AutoencoderTransformer(2, epochs=1, random_state=0).fit(array)
        codes = from_tensor.transform(tensor)
        assert codes.dtype == array.dtype
        np.testing.assert_array_equal(codes, from_array.transform(array))
        np.testing.assert_array_equal(
            from_tensor.inverse_transform(torch.from_numpy(codes)),
            from_array.inverse_transform(codes),
        )
        assert fastae.neg_reconstruction_error(
            from_tensor, tensor
        ) == fastae.neg_reconstruction_error(from_array, array)
        detector = AutoencoderOutlierDetector(2, epochs=1, random_state=0).fit(tensor)
        np.testing.assert_array_equal(
            detector.score_samples(tensor),
            AutoencoderOutlierDetector(2, epochs=1, random_state=0).fit(array).score_samples(array),
        )
    with pytest.raises(TypeError, match=r"^X must be a dense \(strided\) tensor, got a torch"):
        AutoencoderTransformer(2, epochs=1).fit(torch.tensor(x).to_sparse())
    with pytest.raises(ValueError, match=r"^X is on the meta device: it holds no values$"):
        AutoencoderTransformer(2, epochs=1).fit(torch.empty(40, 5, device="meta"))


@pytest.mark.parametrize("scale", ["standard", "minmax"])
def test_a_global_output_container_leaves_the_inner_scaling_numpy(scale):
    """sklearn.set_config(transform_output="pandas") asks transformers for DataFrames: the
    estimators' own outputs follow it, their inner scaler's (which they read as arrays) does
    not. (Where pandas is missing, asking a transformer for one raises ImportError.)"""
    import sklearn

    x = np.random.default_rng(0).random((60, 5))
    transformer = AutoencoderTransformer(2, epochs=1, scale=scale, random_state=0).fit(x)
    detector = AutoencoderOutlierDetector(2, epochs=1, scale=scale, random_state=0).fit(x)
    codes, scores = transformer.transform(x), detector.score_samples(x)
    with sklearn.config_context(transform_output="pandas"):
        refitted = AutoencoderTransformer(2, epochs=1, scale=scale, random_state=0).fit(x)
        np.testing.assert_array_equal(
            refitted.inverse_transform(codes), transformer.inverse_transform(codes)
        )
        detector = AutoencoderOutlierDetector(2, epochs=1, scale=scale, random_state=0).fit(x)
        np.testing.assert_array_equal(detector.score_samples(x), scores)
        detector.partial_fit(x)
        assert fastae.neg_reconstruction_error(transformer, x) < 0


def test_masked_arrays_are_refused_where_they_mask_values():
    """scikit-learn reads a masked array's data, mask dropped; fastae refuses one that masks
    values (in X or y), and reads one that masks none as its data."""
    x = np.random.default_rng(0).random((40, 5))
    masked = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    fitted = AutoencoderTransformer(2, epochs=1, random_state=0).fit(masked)
    expected = AutoencoderTransformer(2, epochs=1, random_state=0).fit(x).transform(x)
    np.testing.assert_array_equal(fitted.transform(masked), expected)
    masked[3, 4] = np.ma.masked
    with pytest.raises(ValueError, match=r"^X is a masked array with 1 masked values, and "):
        fitted.transform(masked)
    with pytest.raises(ValueError, match=r"^X is a masked array with 1 masked values, and "):
        AutoencoderOutlierDetector(2, epochs=1).fit(masked)
    labels = np.ma.masked_array(np.arange(40) % 2, mask=np.arange(40) == 0)
    with pytest.raises(ValueError, match=r"^y is a masked array with 1 masked values, and "):
        fastae.SemiSupervisedAutoencoder(2, epochs=1).fit(x, labels)


@pytest.mark.parametrize("model", ["autoencoder", "vae"])
@pytest.mark.parametrize("scale", ["standard", "minmax"])
def test_predictions_scale_and_copy_x_chunk_by_chunk(model, scale, digits, monkeypatch):
    """Predicting scales X and makes its tensors one chunk of rows at a time (a large X is
    never copied whole, on the host or to the device), with the values of one pass."""
    x = digits[0][:100]
    detector = AutoencoderOutlierDetector(
        3, model=model, scale=scale, epochs=1, random_state=0, device="cpu"
    ).fit(x)
    methods = ("score_samples", "feature_scores", "transform")
    whole = {m: getattr(detector, m)(x) for m in methods if hasattr(detector, m)}
    monkeypatch.setattr(fastae.sklearn, "PREDICT_CHUNK", 16)
    rows = []
    tensor = detector._tensor

    def counted(scaled, *args, **kwargs):
        rows.append(len(scaled))
        return tensor(scaled, *args, **kwargs)

    monkeypatch.setattr(detector, "_tensor", counted)
    for method, expected in whole.items():
        rows.clear()
        np.testing.assert_allclose(getattr(detector, method)(x), expected, rtol=1e-6, atol=1e-9)
        assert rows == [16] * 6 + [4], method


def test_predictions_follow_the_fitted_model_not_later_parameters(digits):
    """set_params without a refit changes nothing a fitted estimator predicts."""
    x = digits[0][:80]
    detector = AutoencoderOutlierDetector(3, epochs=1, random_state=0, device="cpu").fit(x)
    assert detector.anomaly_score_ == "reconstruction"
    scores = detector.score_samples(x)
    np.testing.assert_array_equal(detector.set_params(model="vae").score_samples(x), scores)
    vae = _detector_vae(epochs=1, random_state=0, device="cpu").fit(x)
    assert vae.anomaly_score_ == "elbo"
    scores, labels = vae.score_samples(x), vae.predict(x)
    for kind in ("reconstruction", "bogus"):
        vae.set_params(anomaly_score=kind)
        np.testing.assert_array_equal(vae.score_samples(x), scores)
        np.testing.assert_array_equal(vae.predict(x), labels)
    vae.set_params(anomaly_score="reconstruction").fit(x)
    assert vae.anomaly_score_ == "reconstruction"
    assert not np.array_equal(vae.score_samples(x), scores)


def test_pickle_and_clone(digits):
    x, _ = digits
    model = AutoencoderTransformer(6, noise=fastae.GaussianNoise(0.1), epochs=2, random_state=0)
    model.fit(x[:200])
    assert all(p.grad is None for p in model.module_.parameters())  # no memory held for them
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(model.transform(x[:30]), restored.transform(x[:30]))
    fresh = clone(model)
    assert not hasattr(fresh, "module_")
    assert fresh.get_params() == model.get_params()


def test_an_unpickled_estimator_runs_where_its_device_is_missing(digits, monkeypatch):
    """Fitted on cuda:1, unpickled on a machine with one GPU: it runs on that GPU; without
    CUDA on the CPU (the device choice, with the machine's GPUs stubbed)."""
    x, _ = digits
    model = AutoencoderTransformer(4, epochs=1, random_state=0, device="cpu").fit(x[:60])
    cuda1, cpu = torch.device("cuda", 1), torch.device("cpu")
    model.device_ = cuda1  # as fitted there (pickling moves the module to the CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored = pickle.loads(pickle.dumps(model))
    assert restored.device_ == cpu
    np.testing.assert_array_equal(restored.transform(x[:5]), model.transform(x[:5]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert fastae.sklearn.usable_device(cuda1) == torch.device("cuda", 0)
    assert fastae.sklearn.usable_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert fastae.sklearn.usable_device(torch.device("cuda")) == torch.device("cuda")
    assert fastae.sklearn.usable_device(cpu) == cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert fastae.sklearn.usable_device(cuda1) == cuda1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fastae.sklearn.usable_device(cuda1) == cpu


@pytest.mark.cuda
def test_gpu_is_used_when_present_and_pickles_to_cpu(digits):
    x, _ = digits
    model = AutoencoderOutlierDetector(6, epochs=2, random_state=0).fit(x[:300])
    assert model.device_.type == "cuda"
    assert next(model.module_.parameters()).is_cuda
    state = model.__getstate__()
    assert not next(state["module_"].parameters()).is_cuda
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_allclose(model.score_samples(x[:50]), restored.score_samples(x[:50]))
    cpu = clone(model).set_params(device="cpu").fit(x[:300])
    assert cpu.device_.type == "cpu"


@pytest.mark.cuda
def test_partial_fit_on_the_gpu_pickles_adam_to_cpu(digits):
    x, _ = digits
    model = AutoencoderTransformer(4, batch_size=32, random_state=0)
    model.partial_fit(x[:100]).partial_fit(x[100:200])
    moments = model.__getstate__()["_optimizer_state"]["state"]
    assert all(not t.is_cuda for state in moments.values() for t in state.values())
    assert model._optimizer_state["state"][0]["exp_avg"].is_cuda  # the estimator's own stay
    restored = pickle.loads(pickle.dumps(model))
    model.partial_fit(x[200:300])
    restored.partial_fit(x[200:300])
    assert restored.device_.type == "cuda"
    np.testing.assert_allclose(model.transform(x[:50]), restored.transform(x[:50]), rtol=1e-5)
    on_cpu = restored.set_params(device="cpu").partial_fit(x[300:400])  # Adam moves too
    assert on_cpu.device_.type == "cpu" and on_cpu.n_iter_ == 4


@pytest.mark.cuda
@pytest.mark.parametrize("model_kind", ["autoencoder", "vae"])
def test_cuda_graph_training_scores_like_eager_training(digits, model_kind):
    """The same seed, batches and updates whether each step is replayed from a CUDA graph:
    the scores agree to float32 rounding over three epochs."""
    x, _ = digits
    kwargs = {"model": model_kind, "epochs": 3, "random_state": 0}
    eager = AutoencoderOutlierDetector(6, **kwargs).fit(x[:300])
    graphed = AutoencoderOutlierDetector(6, cuda_graph=True, **kwargs).fit(x[:300])
    np.testing.assert_allclose(eager.loss_curve_, graphed.loss_curve_, rtol=1e-4)
    np.testing.assert_allclose(
        eager.score_samples(x[:50]), graphed.score_samples(x[:50]), rtol=1e-3, atol=1e-4
    )


# ----------------------------------------------------------------------------- detector


def test_outlier_detector_conventions(digits):
    x, _ = digits
    # 501 rows: the 95th percentile of their scores is one of them (index 475), an inlier
    # as in PyOD (and IsolationForest); the threshold lies halfway to the lowest flagged score
    train, test = x[:501], x[501:701]
    detector = AutoencoderOutlierDetector(8, scale=None, contamination=0.05, epochs=5)
    detector.set_params(random_state=0).fit(train)
    scores = detector.score_samples(test)
    np.testing.assert_allclose(detector.decision_function(test), scores - detector.offset_)
    assert set(np.unique(detector.predict(test))) <= {-1, 1}
    np.testing.assert_array_equal(
        detector.predict(test), np.where(scores >= detector.offset_, 1, -1)
    )
    # PyOD's attributes: higher = more abnormal, labels 0/1 on the training data
    np.testing.assert_allclose(detector.decision_scores_, -detector.score_samples(train))
    assert detector.threshold_ == -detector.offset_
    scores = detector.decision_scores_
    quantile = np.percentile(scores, 95.0)
    assert (scores == quantile).sum() == 1
    np.testing.assert_array_equal(detector.labels_, scores > quantile)  # PyOD's labels
    assert detector.labels_.sum() == 25  # above the quantile: 5% of 500 others
    highest_in, lowest_flagged = quantile, scores[scores > quantile].min()
    assert detector.threshold_ == pytest.approx((highest_in + lowest_flagged) / 2, rel=1e-15)
    np.testing.assert_array_equal(detector.labels_, (detector.predict(train) == -1).astype(int))
    # a training row rescored a rounding apart (another batching or dtype) keeps its label
    nudged = scores * (1 + 1e-9 * np.where(detector.labels_, -1, 1))
    np.testing.assert_array_equal(detector.labels_, nudged > detector.threshold_)


@pytest.mark.parametrize("method", ["linear", "unify"])
def test_predict_proba_maps_anomaly_scores_as_pyod(digits, method):
    """PyOD's recipe, computed here apart: MinMaxScaler fitted on the training scores, or erf
    of the scores standardized by their mean and population deviation; both clipped."""
    from scipy.special import erf
    from sklearn.preprocessing import MinMaxScaler

    x, _ = digits
    train, test = x[:400], x[400:600]
    detector = AutoencoderOutlierDetector(8, epochs=3, random_state=0).fit(train)
    scores = -detector.score_samples(test).astype(np.float64)
    train_scores = detector.decision_scores_.astype(np.float64)
    if method == "linear":
        scaler = MinMaxScaler().fit(train_scores.reshape(-1, 1))
        expected = scaler.transform(scores.reshape(-1, 1)).ravel()
    else:
        expected = erf((scores - train_scores.mean()) / (train_scores.std() * np.sqrt(2)))
    expected = expected.clip(0, 1)
    proba = detector.predict_proba(test, method=method)
    assert proba.shape == (200, 2)
    np.testing.assert_allclose(proba[:, 1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    # more abnormal, more likely an outlier; the training extremes map to 0 and 1 (linear)
    order = np.argsort(scores)
    assert np.all(np.diff(proba[order, 1]) >= 0)
    if method == "linear":
        train_proba = detector.predict_proba(train)[:, 1]
        assert train_proba.min() == 0.0 and train_proba.max() == pytest.approx(1.0)
    assert 0.0 < proba[:, 1].mean() < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"scale": None}, {"scale": "standard"}, {"scale": "minmax", "hidden_layer_sizes": (16,)},
     {"scale": None, "model": "vae", "anomaly_score": "reconstruction"}],
    ids=["bce", "mse", "deep", "vae"],
)  # fmt: skip
def test_feature_scores_split_the_anomaly_score(digits, kwargs):
    """Rows sum to the anomaly score (float64 input: float64 arithmetic); each feature's share
    is nonnegative; a feature pushed far out of its range carries its sample's score."""
    x, _ = digits
    detector = AutoencoderOutlierDetector(8, epochs=5, random_state=0, **kwargs).fit(x[:400])
    test = x[400:460].copy()
    shares = detector.feature_scores(test)
    assert shares.shape == (60, 64) and shares.dtype == np.float64
    assert shares.min() > -1e-12
    np.testing.assert_allclose(shares.sum(1), -detector.score_samples(test), rtol=1e-9)
    float32 = detector.feature_scores(test.astype(np.float32)).sum(1)
    np.testing.assert_allclose(float32, -detector.score_samples(test), rtol=1e-4)
    test[:, 20] = 30.0  # far beyond any digit pixel, scaled or not
    assert (detector.feature_scores(test).argmax(1) == 20).all()


def test_feature_scores_of_a_vae_leave_its_kl_to_the_code(digits):
    x, _ = digits
    detector = AutoencoderOutlierDetector(4, model="vae", scale=None, epochs=5, random_state=0)
    detector.fit(x[:300])
    test = x[300:320]
    with torch.no_grad():
        mu, logvar = detector.module_.double().posterior_parameters(torch.tensor(test))
        detector.module_.float()
    kl = fastae.reference.gaussian_kl(mu, logvar).numpy()
    np.testing.assert_allclose(
        detector.feature_scores(test).sum(1) + kl, -detector.score_samples(test), rtol=1e-9
    )


def test_predict_confidence_is_pyods_exceed(digits):
    """ExCeeD as PyOD computes it, here apart: counts of training scores at or below each test
    score, the binomial's CDF, flipped for predicted inliers."""
    from scipy.stats import binom

    x, _ = digits
    train, test = x[:400], x[400:600]
    detector = AutoencoderOutlierDetector(8, epochs=3, contamination=0.05, random_state=0)
    detector.fit(train)
    scores = -detector.score_samples(test)
    n = 400
    below = np.array([np.count_nonzero(detector.decision_scores_ <= s) for s in scores])
    expected = 1 - binom.cdf(n - int(n * 0.05), n, (1 + below) / (2 + n))
    inlier = detector.predict(test) == 1
    expected[inlier] = 1 - expected[inlier]
    confidence = detector.predict_confidence(test)
    np.testing.assert_allclose(confidence, expected, rtol=1e-9, atol=1e-12)
    assert ((confidence >= 0) & (confidence <= 1)).all() and 0 < inlier.mean() < 1
    # far beyond every training score: an outlier for certain
    assert detector.predict_confidence(test[:1] + 50.0)[0] > 0.999
    proba, again = detector.predict_proba(test, method="unify", return_confidence=True)
    np.testing.assert_array_equal(again, confidence)
    np.testing.assert_array_equal(proba, detector.predict_proba(test, method="unify"))
    with pytest.raises(TypeError, match="return_confidence"):
        detector.predict_proba(test, return_confidence="yes")


def test_predict_proba_checks_its_method_and_a_zero_spread(digits):
    x, _ = digits
    detector = AutoencoderOutlierDetector(8, epochs=2, random_state=0)
    with pytest.raises(sklearn_exceptions.NotFittedError):
        detector.predict_proba(x[:5])
    detector.fit(x[:200])
    with pytest.raises(ValueError, match="method must be one of"):
        detector.predict_proba(x[:5], method="logistic")
    # every training score equal: the spread counts as 1 (no division by zero)
    detector.decision_scores_ = np.full(200, 2.0, dtype=np.float32)
    scores = -detector.score_samples(x[:5])
    proba = detector.predict_proba(x[:5], method="linear")
    np.testing.assert_allclose(proba[:, 1], np.clip(scores - 2.0, 0, 1), rtol=1e-6)
    assert np.isfinite(detector.predict_proba(x[:5], method="unify")).all()


def test_outlier_detector_finds_off_manifold_points():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 20))
    normal = rng.normal(size=(600, 3)) @ basis + 0.05 * rng.normal(size=(600, 20))
    inliers = rng.normal(size=(100, 3)) @ basis + 0.05 * rng.normal(size=(100, 20))
    outliers = rng.normal(size=(20, 20)) * normal.std(0)
    test = np.vstack([inliers, outliers])
    truth = np.r_[np.zeros(100), np.ones(20)]
    detector = AutoencoderOutlierDetector(3, activation="tanh", epochs=40, random_state=0)
    detector.fit(normal)
    assert roc_auc_score(truth, -detector.score_samples(test)) > 0.9
    assert (detector.predict(outliers) == -1).mean() > 0.8


def test_held_out_digit_is_found(digits):
    """Held-out digit: the reconstruction error (BCE above its minimum) flags the unseen class."""
    x, y = digits
    normal = x[(y != 0)][:900]
    test = np.vstack([x[y != 0][900:1100], x[y == 0][:60]])
    truth = np.r_[np.zeros(200), np.ones(60)]
    detector = AutoencoderOutlierDetector(32, scale=None, epochs=15, random_state=0).fit(normal)
    assert detector.loss_ == "bce"
    # a perfect reconstruction scores 0: the inputs' entropy is taken off the BCE
    assert detector.decision_scores_.min() > -1e-4
    auroc = roc_auc_score(truth, -detector.score_samples(test))
    forest = IsolationForest(random_state=0).fit(normal)
    assert auroc > 0.75
    assert auroc > roc_auc_score(truth, -forest.score_samples(test)) - 0.05


def test_bce_scores_are_the_kl_divergence_from_the_reconstruction(digits):
    """With BCE, -score_samples is sum_k KL(x_k || x^_k) = sum_k x log(x / x^) + (1 - x)
    log((1 - x) / (1 - x^)) written out from the fitted module's reconstruction (the VAE's
    "reconstruction" score decodes the posterior mean); the entropy taken off the BCE is 0 for
    binary rows and log 2 an element at 1/2."""
    x = digits[0][:200]
    for detector in (
        AutoencoderOutlierDetector(8, scale=None, epochs=2, random_state=0),
        AutoencoderOutlierDetector(
            4, model="vae", hidden=16, anomaly_score="reconstruction", scale=None, epochs=2,
            random_state=0,
        ),
    ):  # fmt: skip
        detector.fit(x)
        assert detector.loss_ == "bce"
        module = copy.deepcopy(detector.module_).double().eval()
        inputs = torch.tensor(x[:20], dtype=torch.float64)
        with torch.no_grad():
            x_hat = module.reconstruct(inputs)
        kl = torch.xlogy(inputs, inputs / x_hat) + torch.xlogy(
            1 - inputs, (1 - inputs) / (1 - x_hat)
        )
        np.testing.assert_allclose(-detector.score_samples(x[:20]), kl.sum(1).numpy(), rtol=1e-6)
    rows = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    entropy = fastae.sklearn.bernoulli_entropy(rows)
    torch.testing.assert_close(entropy, torch.tensor([0.0, 3 * math.log(2)], dtype=torch.float64))


def test_vae_detector_finds_the_held_out_digit(digits):
    """model="vae": the negative ELBO (KL to the prior plus BCE above its minimum) flags the
    unseen class, and the same input gets the same score wherever it sits."""
    x, y = digits
    normal = x[(y != 0)][:900]
    test = np.vstack([x[y != 0][900:1100], x[y == 0][:60]])
    truth = np.r_[np.zeros(200), np.ones(60)]
    detector = AutoencoderOutlierDetector(
        4, model="vae", scale=None, epochs=15, lr=1e-2, random_state=0
    )
    detector.fit(normal)
    assert isinstance(detector.module_, fastae.VAE)
    assert detector.module_.activation == "relu" and detector.module_.hidden == 128
    scores = detector.score_samples(test)
    auroc = roc_auc_score(truth, -scores)
    forest = IsolationForest(random_state=0).fit(normal)
    assert auroc > 0.8
    assert auroc > roc_auc_score(truth, -forest.score_samples(test)) + 0.05
    # deterministic: z = mu at inference, so neither repeats nor batch neighbours change it
    np.testing.assert_array_equal(detector.score_samples(test), scores)
    np.testing.assert_allclose(detector.score_samples(test[7:8]), scores[7:8], rtol=1e-5)
    # the ELBO score is the reconstruction score plus the posterior's KL (>= 0)
    module = copy.deepcopy(detector.module_).double().eval()
    mu, logvar = module.posterior_parameters(torch.tensor(test, dtype=torch.float64))
    with torch.no_grad():
        kl = fastae.reference.gaussian_kl(mu, logvar).numpy()
    assert np.all(kl >= 0)
    # refit (the score kind is fitted): the same weights, scored by reconstruction alone
    refit = clone(detector).set_params(anomaly_score="reconstruction").fit(normal)
    for name, value in detector.module_.state_dict().items():
        torch.testing.assert_close(refit.module_.state_dict()[name], value, rtol=0, atol=0)
    np.testing.assert_allclose(-scores, -refit.score_samples(test) + kl, rtol=1e-4)


def test_vae_detector_arguments(digits):
    x, _ = digits
    small = x[:100]
    with pytest.raises(ValueError, match="model must be one of"):
        AutoencoderOutlierDetector(model="gan").fit(small)
    with pytest.raises(ValueError, match="anomaly_score='elbo' needs model='vae'"):
        AutoencoderOutlierDetector(anomaly_score="elbo").fit(small)
    with pytest.raises(ValueError, match="anomaly_score must be None or one of"):
        AutoencoderOutlierDetector(model="vae", anomaly_score="likelihood").fit(small)
    for name, value in (
        ("noise", fastae.MaskingNoise(0.2)),
        ("sparsity", fastae.L1Sparsity(0.1)),
        ("contractive", 0.1),
    ):
        with pytest.raises(ValueError, match=f"{name} applies to model='autoencoder'"):
            AutoencoderOutlierDetector(model="vae", **{name: value}).fit(small)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        AutoencoderOutlierDetector(model="vae", hidden=0).fit(small)
    with pytest.raises(ValueError, match=r"^hidden\[1\] must be a positive int"):
        AutoencoderOutlierDetector(model="vae", hidden=(8, 0)).fit(small)
    with pytest.raises(TypeError, match=r"^hidden must be a positive int or a non-empty sequence"):
        AutoencoderOutlierDetector(model="vae", hidden="8").fit(small)
    deep = AutoencoderOutlierDetector(2, model="vae", hidden=(16, 8), epochs=2, random_state=0)
    deep.fit(small)
    assert deep.module_.hidden_sizes == (16, 8) and deep.decision_scores_.shape == (100,)
    assert deep.loss_ == "mse"  # standardized: the score is the negative ELBO itself
    scores = deep.module_.eval().negative_elbo(torch.tensor(deep._scale(small[:5])).float())
    np.testing.assert_allclose(-deep.score_samples(small[:5]), scores.detach(), rtol=1e-4)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        AutoencoderOutlierDetector(model="vae", beta=-1.0).fit(small)
    with pytest.raises(ValueError, match="activation must be one of \\('auto'"):
        AutoencoderOutlierDetector(activation="gelu").fit(small)


@pytest.mark.parametrize(
    "scale, model, loss",
    [("minmax", "autoencoder", "auto"), (None, "autoencoder", "auto"), ("minmax", "vae", "auto"),
     ("minmax", "autoencoder", "mse"), (None, "vae", "mse")],
)  # fmt: skip
def test_detector_scores_grow_outside_the_training_range(scale, model, loss):
    """Test inputs are not clipped to the training range: a feature at 1e6 is an outlier."""
    x = np.random.default_rng(0).random((120, 5))
    vae = {"hidden": 8} if model == "vae" else {}
    detector = AutoencoderOutlierDetector(
        2, model=model, scale=scale, loss=loss, epochs=3, random_state=0, **vae
    ).fit(x)
    edge, far = np.full((1, 5), 0.5), np.full((1, 5), 0.5)
    edge[0, 4], far[0, 4] = 1.0, 1e6
    score_edge, score_far = detector.score_samples(edge)[0], detector.score_samples(far)[0]
    assert score_far < score_edge
    assert detector.predict(far)[0] == -1
    far[0, 4] = 1e155  # a squared distance beyond float64: -inf, without a numpy warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detector.score_samples(far)[0] == -np.inf and detector.predict(far)[0] == -1
    far[0, 4] = 1e6
    if scale is None and detector.loss_ == "bce":
        # the same clipped input, plus the squared excess beyond [0, 1]
        assert score_far == pytest.approx(score_edge - (1e6 - 1.0) ** 2)
    # the training scores are those of score_samples
    np.testing.assert_allclose(detector.decision_scores_, -detector.score_samples(x))


def test_bce_reads_inputs_beyond_zero_one_clipped():
    """With BCE (scale=None on [0, 1] data) the module sees X clipped to [0, 1]: rows beyond
    it have the clipped rows' codes, and the detector scores them as the clipped rows plus
    the squared excess sum_k e_k^2."""
    x = np.random.default_rng(0).random((60, 4))
    beyond = x[:5] + 0.7
    clipped = np.clip(beyond, 0.0, 1.0)
    model = AutoencoderTransformer(3, scale=None, epochs=2, random_state=0).fit(x)
    assert model.loss_ == "bce"
    np.testing.assert_array_equal(model.transform(beyond), model.transform(clipped))
    detector = AutoencoderOutlierDetector(3, scale=None, epochs=2, random_state=0).fit(x)
    excess = np.square(beyond - clipped).sum(1)
    np.testing.assert_allclose(
        -detector.score_samples(beyond), -detector.score_samples(clipped) + excess, rtol=1e-12
    )


def test_estimators_train_in_float32_under_a_float64_default_dtype(digits):
    """Modules built while torch's default dtype is float64 (or its default device the meta
    device) train in float32 on the CPU, on the float32 data the estimators make, and fit
    as under torch's defaults for a random_state."""
    from fastae.applications import SemiSupervisedAutoencoder, StackedAutoencoder

    x, y = digits[0][:120], digits[1][:120]
    makers = [
        lambda: AutoencoderTransformer(**TINY),
        lambda: AutoencoderOutlierDetector(**TINY),
        lambda: AutoencoderOutlierDetector(model="vae", hidden=16, **TINY),
        lambda: StackedAutoencoder((8, 4), pretrain_epochs=1, finetune_epochs=1, random_state=0),
        lambda: SemiSupervisedAutoencoder(4, epochs=1, random_state=0),
    ]
    usual = [make().fit(x, y) for make in makers]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for make, second in zip(makers, usual, strict=True):
            with torch.device("meta"):
                first = make().fit(x, y)
            assert {p.dtype for p in first.module_.parameters()} == {torch.float32}
            assert all(np.isfinite(first.loss_curve_))
            for method in ("transform", "score_samples", "predict_proba"):
                if hasattr(first, method):
                    got = getattr(first, method)(x[:5])
                    np.testing.assert_array_equal(got, getattr(second, method)(x[:5]))
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda v: AutoencoderTransformer(2, lr=v), "lr"),
        (lambda v: AutoencoderTransformer(2, contractive=v), "contractive"),
        (lambda v: AutoencoderOutlierDetector(2, model="vae", beta=v), "beta"),
        (
            lambda v: fastae.SemiSupervisedAutoencoder(2, reconstruction_weight=v),
            "reconstruction_weight",
        ),
        (lambda v: fastae.SemiSupervisedAutoencoder(2, lr=v), "lr"),
        (lambda v: fastae.DECClustering(2, alpha=v), "alpha"),
        (lambda v: fastae.DECClustering(2, lr=v), "lr"),
        (lambda v: fastae.DECClustering(2, reconstruction_weight=v), "reconstruction_weight"),
    ],
)
@pytest.mark.parametrize("value", [1e39, 2**2000])
def test_weights_and_rates_must_be_finite_in_float32(make, name, value):
    """The training math runs in float32: a weight or rate beyond its range (or an int
    beyond float64's) is refused naming the parameter, not trained into an inf loss whose
    advice is the learning rate."""
    x = np.random.RandomState(0).rand(30, 4)
    y = np.arange(30) % 2
    with pytest.raises(ValueError, match=rf"^{name} must be finite"):
        make(value).fit(x, y)


def test_ints_beyond_int64_are_numbers_or_refused_by_name():
    """An int beyond int64 is a rate like any other (numpy's isfinite raised a TypeError on
    it), and a size beyond torch's is refused naming it."""
    x = np.random.RandomState(0).rand(30, 4)
    with pytest.raises(ValueError, match="^training diverged: the training loss is"):
        AutoencoderTransformer(2, lr=2**64, epochs=3, random_state=0).fit(x)
    with pytest.raises(ValueError, match=r"^n_components must be below 2\*\*63"):
        AutoencoderTransformer(2**64, epochs=1).fit(x)
    with pytest.raises(ValueError, match=r"^epochs must be below 2\*\*63"):
        AutoencoderTransformer(2, epochs=2**63).fit(x)


def test_data_beyond_float32_and_diverged_training_are_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"^X has values beyond float32's range"):
        AutoencoderOutlierDetector(2, scale=None, epochs=1).fit(rng.random((40, 3)) * 1e39)
    with pytest.raises(
        ValueError, match=r"^training diverged: the training loss is (inf|nan) in epoch 1; scale X"
    ):
        AutoencoderOutlierDetector(2, scale=None, epochs=1).fit(rng.random((40, 3)) * 1e20)
    # the same data scaled trains
    AutoencoderOutlierDetector(2, epochs=1).fit(rng.random((40, 3)) * 1e39)
    # scaled data that diverges: the advice is the learning rate
    with pytest.raises(
        ValueError,
        match=r"^training diverged: the training loss is (inf|nan) in epoch \d; lower lr$",
    ):
        AutoencoderOutlierDetector(2, model="vae", lr=1e9, epochs=3, random_state=0).fit(
            rng.random((40, 3))
        )
    # one step (epochs=1, the batch all rows; or a partial_fit of one batch) that diverges
    # shows in no loss: a detector's training rows that score NaN or inf (a VAE whose step
    # left finite but large weights: its variance overflows) leave no threshold to set
    x = np.random.RandomState(0).randn(30, 5)
    with pytest.raises(
        ValueError, match=r"^training diverged: \d+ of the 30 training rows score NaN or inf"
    ):
        AutoencoderOutlierDetector(2, model="vae", lr=10, epochs=1, random_state=0).fit(x)
    detector = AutoencoderOutlierDetector(2, model="vae", random_state=0).partial_fit(x)
    threshold = detector.threshold_
    with pytest.raises(ValueError, match=r"^training diverged: \d+ of the 30 training rows"):
        detector.set_params(lr=10).partial_fit(x)
    assert detector.threshold_ == threshold and np.isfinite(threshold)


def test_detector_partial_fit_warns_of_a_chunk_too_small_for_its_threshold():
    x = np.random.default_rng(0).random((60, 4))
    detector = AutoencoderOutlierDetector(2, contamination=0.1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector.partial_fit(x[:10])  # 10 rows: one outlier at 10%
    with pytest.warns(
        UserWarning, match=r"^partial_fit set threshold_ from X's 9 rows, fewer "
    ) as caught:
        detector.partial_fit(x[10:19])
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"from X's 1 row, fewer than 1 / contamination = 10:"):
        detector.partial_fit(x[19:20])


@pytest.mark.parametrize("make", [AutoencoderOutlierDetector, AutoencoderTransformer])
def test_partial_fit_warns_of_a_chunk_mostly_outside_the_minmax_range(make):
    """The scaler stays the first chunk's: a drifted chunk beyond its range would train as a
    constant (clipped to its bounds), which a warning says; a chunk with a few values beyond
    the range (or under scale="standard") trains without one."""
    rng = np.random.default_rng(0)
    first, near, drifted = rng.random((40, 4)), rng.random((40, 4)) * 1.1, 5 + rng.random((40, 4))
    estimator = make(2, scale="minmax", random_state=0).partial_fit(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator.partial_fit(near)  # about 9% of the values beyond 1
        make(2, random_state=0).partial_fit(first).partial_fit(drifted)  # standardized
    message = r"^partial_fit: 100% of X's values lie outside the range scaler_ was fitted to "
    with pytest.warns(UserWarning, match=message) as caught:
        estimator.partial_fit(drifted)
    assert caught[0].filename == __file__
    assert np.all(estimator._scale(drifted) == 1.0)  # what it trained on
    with pytest.warns(UserWarning, match=r"^warm_start=True: 100% of X's values lie outside"):
        make(2, scale="minmax", warm_start=True, epochs=1, random_state=0).fit(first).fit(drifted)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the ValueError alone
def test_finite_float64_rows_that_overflow_when_scaled_are_errors():
    # float64 X passes check_array but may overflow to inf when scaled by a scaler fitted on
    # data far smaller: an error, as float32's range, not NaN scores and argmax labels
    rng = np.random.default_rng(0)
    x = rng.random((60, 6))
    far = x[:3].copy()
    far[0] = 1e308
    message = r"^X has values beyond float64's range after scaling \(largest magnitude inf\)"
    detector = AutoencoderOutlierDetector(3, epochs=1, random_state=0).fit(x)
    for method in ("score_samples", "decision_function", "predict", "feature_scores"):
        with pytest.raises(ValueError, match=message):
            getattr(detector, method)(far)
    transformer = AutoencoderTransformer(3, epochs=1, random_state=0).fit(x)
    for method in ("transform", "score_samples"):
        with pytest.raises(ValueError, match=message):
            getattr(transformer, method)(far)
    labels = np.arange(60) % 3
    labels[::2] = -1
    classifier = fastae.SemiSupervisedAutoencoder(3, epochs=1, random_state=0).fit(x, labels)
    for method in ("predict", "predict_proba"):
        with pytest.raises(ValueError, match=message):
            getattr(classifier, method)(far)
    with pytest.raises(ValueError, match=message):
        fastae.DECClustering(3, refine_epochs=1, random_state=0).fit(x).predict(far)
    assert np.isfinite(detector.score_samples(far[1:])).all()


@pytest.mark.parametrize(
    "make, options",
    [
        (AutoencoderOutlierDetector, {"n_components": 2, "epochs": 1}),
        (fastae.StackedAutoencoder, {"sizes": (3, 2), "pretrain_epochs": 1, "finetune_epochs": 1}),
    ],
)
def test_a_seeded_noise_spec_is_warned_of_at_the_callers_line(make, options):
    x = np.random.default_rng(0).random((30, 4))
    estimator = make(noise=fastae.MaskingNoise(0.3, seed=0), random_state=0, **options)
    with pytest.warns(UserWarning, match=r"seed=0\) has a seed: .*random_state") as caught:
        estimator.fit(x)
    assert {warning.filename for warning in caught} == {__file__}


def test_a_warning_through_scikit_learns_mixins_names_the_callers_line():
    x = np.random.default_rng(0).random((30, 4))
    transformer = AutoencoderTransformer(2, noise=fastae.MaskingNoise(0.3, seed=0), epochs=1)
    with pytest.warns(UserWarning, match=r"seed=0\) has a seed: ") as caught:
        transformer.fit_transform(x)  # TransformerMixin.fit_transform calls fit
    assert {warning.filename for warning in caught} == {__file__}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the ValueError alone
def test_minmax_ranges_that_would_drop_a_column_are_errors():
    rng = np.random.default_rng(0)
    x = rng.random((60, 6))
    # a range beyond float64: MinMaxScaler's scale would be 0, the column all zeros
    huge = x.copy()
    huge[:, 0] = np.where(x[:, 0] > 0.5, 1e308, -1e308)
    with pytest.raises(
        ValueError, match=r"^X's column ranges overflow float64 \(values up to 1e\+308"
    ):
        AutoencoderTransformer(3, scale="minmax", epochs=1).fit(huge)
    # a range below MinMaxScaler's absolute cut-off: the column would be taken as constant
    with pytest.raises(
        ValueError, match=r"^X's column 0 spans only 9\.8\d*e-17, which scale='minmax' treats"
    ):
        AutoencoderOutlierDetector(3, scale="minmax", epochs=1).fit(x * 1e-16)
    assert AutoencoderTransformer(3, epochs=1).fit(x * 1e-16).transform(x * 1e-16).std(0).min() > 0
    # rounding noise about a constant (also about 0), and a constant, stay constant columns
    noisy = x.copy()
    noisy[:, 1] = 0.3
    noisy[::2, 1] = 0.1 + 0.2
    noisy[:, 2] = 0.0
    noisy[:, 3] = (x[:, 0] + 0.1) - x[:, 0] - 0.1
    assert 0 < np.ptp(noisy[:, 1]) < 1e-16 and 0 < np.ptp(noisy[:, 3]) < 1e-15
    fitted = AutoencoderTransformer(3, scale="minmax", epochs=1).fit(noisy)
    assert (fitted.scaler_.scale_[1:4] == 1.0).all()
    # float32 X is scaled in float64 (as it is transformed): a small column beside large
    # ones, and ranges beyond float32's, keep their values
    mixed = np.c_[x[:, 0] * 1e-6, x[:, 1:] * 3].astype(np.float32)
    fitted = AutoencoderOutlierDetector(3, scale="minmax", epochs=1).fit(mixed)
    assert fitted.scaler_.scale_[0] == pytest.approx(1 / np.ptp(mixed[:, 0].astype(np.float64)))
    assert fitted.predict(np.c_[[1e-4], mixed[:1, 1:]].astype(np.float32))[0] == -1
    wide = np.where(x > 0.5, 3e38, -3e38).astype(np.float32)
    scaled = AutoencoderTransformer(3, scale="minmax", epochs=1).fit(wide)._scale(wide)
    assert set(np.unique(scaled)) == {0.0, 1.0}


@pytest.mark.parametrize("model, rate", [("autoencoder", 1e-2), ("vae", 3e-3)])
def test_the_auto_learning_rate_follows_the_model(model, rate):
    x = np.random.default_rng(0).random((40, 5))
    for make in (AutoencoderTransformer, AutoencoderOutlierDetector):
        fitted = make(2, model=model, random_state=0).partial_fit(x)
        assert fitted.lr == "auto" and fitted._optimizer_state["param_groups"][0]["lr"] == rate
        fitted = make(2, model=model, lr=0.05, random_state=0).partial_fit(x)
        assert fitted._optimizer_state["param_groups"][0]["lr"] == 0.05
    for text in ("fast", "AUTO"):  # a str is "auto" or nothing
        with pytest.raises(
            ValueError, match=f'^lr must be "auto" or a positive number, got {text!r}'
        ):
            AutoencoderTransformer(2, lr=text).fit(x)
    with pytest.raises(TypeError, match="^lr must be a real number, got list"):
        AutoencoderTransformer(2, lr=[0.1]).fit(x)


def test_numpy_scalar_parameters():
    x = np.random.default_rng(0).random((40, 5))
    search = GridSearchCV(
        AutoencoderOutlierDetector(2, model="vae", epochs=1, random_state=0),
        {"hidden": np.arange(4, 9, 4)},
        cv=2,
        scoring=lambda estimator, X, y=None: estimator.score_samples(X).mean(),
        error_score="raise",
    ).fit(x)
    assert search.best_estimator_.module_.hidden in (4, 8)
    model = AutoencoderTransformer(
        np.int64(2), tied=np.bool_(False), contractive=np.float32(0.1), epochs=np.int64(1),
        batch_size=np.int32(16), lr=np.float32(0.01), random_state=0,
    ).fit(x)  # fmt: skip
    assert model.module_.tied is False and model.module_.contractive == pytest.approx(0.1)
    with pytest.raises(TypeError, match=r"^tied\b"):
        AutoencoderTransformer(tied=1).fit(x)


@pytest.mark.parametrize("make", [AutoencoderTransformer, AutoencoderOutlierDetector])
def test_failed_fit_leaves_the_estimator_as_it_was(make):
    from sklearn.exceptions import NotFittedError

    x = np.random.default_rng(0).random((40, 5))
    for bad in (
        dict(epochs=0),
        dict(tied=1),
        dict(lr=-1.0),
        dict(tol=-1.0),
        dict(hidden_layer_sizes=(0,)),
    ):
        model = make(2, random_state=0, **bad)
        with pytest.raises((ValueError, TypeError)):
            model.fit(x)
        with pytest.raises(NotFittedError):
            model.score_samples(x)
    model = make(2, epochs=1, random_state=0).fit(x)
    before = model.score_samples(x)
    refits = [(dict(epochs=0), "epochs"), (dict(epochs=1, validation_fraction=1.5), "validation")]
    for bad, name in refits:
        model.set_params(**bad)
        with pytest.raises(ValueError, match=rf"^{name}"):
            model.fit(x[:, :3])
    assert model.n_features_in_ == 5
    np.testing.assert_array_equal(model.score_samples(x), before)
    with pytest.raises(ValueError, match="3 features"):
        model.score_samples(x[:, :3])


# ----------------------------------------------------------------------------- deep models


def test_hidden_layer_sizes_make_a_deep_autoencoder(digits):
    x, y = digits
    transformer = AutoencoderTransformer(
        8, hidden_layer_sizes=(32, 16), activation="relu", tied=False, epochs=5, random_state=0
    ).fit(x[:300])
    module = transformer.module_
    assert isinstance(module, fastae.DeepAutoencoder) and module.sizes == (32, 16, 8)
    assert module.activation == "relu" and not module.tied
    codes = transformer.transform(x[:20])
    assert codes.shape == (20, 8) and transformer.inverse_transform(codes).shape == (20, 64)
    flat = AutoencoderTransformer(8, epochs=1, random_state=0).fit(x[:50])
    assert type(flat.module_) is fastae.Autoencoder
    # a deep detector finds the held-out digit as a one-layer one does
    normal, test = x[:1300][y[:1300] != 0], x[1300:]
    detector = AutoencoderOutlierDetector(
        16, hidden_layer_sizes=(32,), scale=None, noise=fastae.MaskingNoise(0.3), epochs=40,
        random_state=0,
    ).fit(normal)  # fmt: skip
    assert roc_auc_score(y[1300:] == 0, -detector.score_samples(test)) > 0.85


def test_hidden_layer_sizes_are_checked():
    x = np.random.default_rng(0).random((40, 5))
    # an int is one layer, as scikit-learn's MLP takes it
    one = AutoencoderTransformer(2, hidden_layer_sizes=np.int64(8), epochs=1).fit(x)
    assert one.module_.sizes == (8, 2)
    for value in (8.0, "8", True):
        message = r"^hidden_layer_sizes must be a positive int or a sequence"
        with pytest.raises(TypeError, match=message):
            AutoencoderTransformer(2, hidden_layer_sizes=value).fit(x)
    with pytest.raises(ValueError, match=r"^hidden_layer_sizes\[0\] must be a positive int"):
        AutoencoderTransformer(2, hidden_layer_sizes=0).fit(x)
    with pytest.raises(ValueError, match=r"^hidden_layer_sizes\[1\] must be a positive int"):
        AutoencoderTransformer(2, hidden_layer_sizes=(4, 0)).fit(x)
    with pytest.raises(ValueError, match=r"^contractive needs hidden_layer_sizes=\(\)"):
        AutoencoderOutlierDetector(2, hidden_layer_sizes=(4,), contractive=0.1).fit(x)
    with pytest.raises(ValueError, match=r"^hidden_layer_sizes applies to model='autoencoder'"):
        AutoencoderOutlierDetector(2, model="vae", hidden_layer_sizes=(4,)).fit(x)
    with pytest.raises(ValueError, match=r"^sparsity KLSparsity needs activation 'sigmoid'"):
        AutoencoderTransformer(
            2, hidden_layer_sizes=(4,), activation="relu", sparsity=fastae.KLSparsity(0.1)
        ).fit(x)


# ----------------------------------------------------------------------------- early stopping


def test_hold_out_splits_the_rows_at_random():
    train, val = hold_out(50, 0.1, seed=3)
    assert val.shape == (5,) and train.shape == (45,) and val.dtype == torch.int64
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    again = hold_out(50, 0.1, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(hold_out(50, 0.1, seed=4)[1], val)
    assert sorted(val.tolist()) != list(range(5))  # drawn, not the first rows
    assert hold_out(3, 0.01, seed=0)[1].shape[0] == 1  # at least one
    with pytest.raises(ValueError, match=r"holds out 1 of X's 1 sample \(validation_fraction"):
        hold_out(1, 0.1, seed=0)
    with pytest.raises(ValueError, match="holds out 5 of X's 5 samples.*none to train on"):
        hold_out(5, 0.95, seed=0)


@pytest.mark.parametrize("model", ["autoencoder", "vae"])
def test_early_stopping_keeps_the_best_epoch_on_held_out_rows(digits, model):
    x = digits[0][:500]
    patience, tol = 3, 1e-3
    vae = {"hidden": 32} if model == "vae" else {}
    detector = AutoencoderOutlierDetector(
        8, model=model, epochs=500, early_stopping=True, n_iter_no_change=patience,
        tol=tol, validation_fraction=0.2, random_state=0, **vae,
    ).fit(x)  # fmt: skip
    curve = detector.validation_loss_curve_
    assert 1 + patience < detector.n_iter_ < 500
    assert len(curve) == len(detector.loss_curve_) == detector.n_iter_
    # stopped after `patience` epochs without an improvement of more than tol
    best = detector.n_iter_ - 1 - patience
    assert detector.best_validation_loss_ == curve[best]
    assert min(curve[:best]) - tol > curve[best] and min(curve[best + 1 :]) >= curve[best] - tol
    # the module holds the best epoch's weights: its loss on the held-out rows is that epoch's
    seed = clone(detector)._draw_seed()
    _, held = hold_out(500, 0.2, seed)
    inputs = torch.tensor(detector._scale(x[held.numpy()]), dtype=torch.float32)
    with torch.no_grad():
        loss = detector.module_(inputs).loss.item()
    assert loss == pytest.approx(curve[best], rel=1e-6)
    # the threshold covers every row, held-out ones included
    assert detector.decision_scores_.shape == (500,)


def test_early_stopping_trains_on_the_rows_it_does_not_hold_out(digits, monkeypatch):
    seen = {}

    def spy(module, data, **kwargs):
        seen["data"], seen["validation"] = data, kwargs["validation_data"]
        return fastae.fit(module, data, **kwargs)

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    x = digits[0][:300]
    model = AutoencoderTransformer(4, epochs=2, early_stopping=True, random_state=0).fit(x)
    data, validation = seen["data"].numpy(), seen["validation"].numpy()
    assert data.shape == (270, 64) and validation.shape == (30, 64)
    rows = np.concatenate([data, validation]).astype(np.float64)
    scaled = model._scale(x).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(scaled, axis=0))
    assert len(np.unique(rows, axis=0)) == len(np.unique(x, axis=0))  # no row in both


def test_tol_and_n_iter_no_change_serve_early_stopping_alone(digits):
    x = digits[0][:100]
    model = AutoencoderTransformer(4, epochs=6, tol=1e9, n_iter_no_change=1, random_state=0)
    model.fit(x)
    assert model.n_iter_ == 6
    assert model.validation_loss_curve_ is None and model.best_validation_loss_ is None
    # no epoch improves on the first by more than tol: n_iter_no_change more, then stop
    model.set_params(early_stopping=True, n_iter_no_change=2).fit(x)
    assert model.n_iter_ == 3 and model.best_validation_loss_ == model.validation_loss_curve_[0]


@pytest.mark.parametrize("make", [AutoencoderTransformer, AutoencoderOutlierDetector])
def test_early_stopping_parameters_name_themselves(make):
    x = np.random.default_rng(0).random((40, 5))
    bad = [
        (dict(validation_fraction=0.0), ValueError, r"^validation_fraction must be > 0"),
        (dict(validation_fraction=1.0), ValueError, r"^validation_fraction must be < 1"),
        (dict(validation_fraction="0.1"), TypeError, r"^validation_fraction must be a real"),
        (dict(n_iter_no_change=0), ValueError, r"^n_iter_no_change must be a positive int"),
        (dict(tol=-1e-3), ValueError, r"^tol must be >= 0"),
        (dict(tol=float("nan")), ValueError, r"^tol must be finite"),
        (dict(early_stopping="yes"), TypeError, r"^early_stopping must be a bool"),
    ]
    for params, error, message in bad:
        for early in (True, False):  # checked whether or not they are used
            params = {"early_stopping": early} | params
            with pytest.raises(error, match=message):
                make(2, epochs=1, **params).fit(x)


def test_verbose_training_keeps_a_record(capsys):
    x = np.random.default_rng(0).random((40, 5))
    AutoencoderTransformer(2, epochs=2, verbose=True, random_state=0).fit(x)
    err = capsys.readouterr().err
    assert err.endswith("\n") and "loss=" in err.splitlines()[-1]


# ----------------------------------------------------------------------------- optional extra


def test_import_fastae_does_not_import_sklearn():
    code = (
        "import sys, fastae; "
        "assert 'sklearn' not in sys.modules, 'sklearn imported'; "
        "assert 'AutoencoderTransformer' in dir(fastae)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_sklearn_gives_a_clear_error(monkeypatch):
    for name in [n for n in sys.modules if n == "sklearn" or n.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("fastae.sklearn", "fastae.applications"):
        if name in sys.modules:
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install 'fastae\[apps\]'"):
        importlib.import_module("fastae.sklearn")
    with pytest.raises(ImportError, match=r"pip install 'fastae\[apps\]'"):
        fastae.AutoencoderOutlierDetector  # noqa: B018
    with pytest.raises(AttributeError):
        fastae.NoSuchThing  # noqa: B018


# ----------------------------------------------------------------------------- warm start


def _scaled_tensor(model, x):
    return torch.tensor(model._scale(x), dtype=torch.float32)


def _train_on(module, data, seed, lr=1e-2, **kwargs):
    return fastae.fit(module, data, batch_size=32, lr=lr, seed=seed, progress=False, **kwargs)


@pytest.mark.parametrize("model", ["autoencoder", "vae"])
def test_warm_start_trains_on_from_the_fitted_weights(digits, model):
    x = digits[0]
    vae = {"hidden": 16} if model == "vae" else {}
    detector = AutoencoderOutlierDetector(
        4, model=model, epochs=3, batch_size=32, warm_start=True, random_state=0, **vae
    ).fit(x[:300])
    first_curve, scaler = list(detector.loss_curve_), copy.deepcopy(detector.scaler_)
    expected = copy.deepcopy(detector.module_).train()
    more = x[300:500] * 0.5  # other rows, which the fitted scaler scales
    detector.set_params(epochs=2).fit(more)
    # the fitted weights trained 2 more epochs on `more`, scaled as the first fit's X
    history = _train_on(expected, _scaled_tensor(detector, more), clone(detector)._draw_seed(),
                        lr=1e-2 if model == "autoencoder" else 3e-3, epochs=2)  # fmt: skip
    torch.testing.assert_close(detector.module_.state_dict(), expected.state_dict(), rtol=0, atol=0)
    np.testing.assert_array_equal(detector.scaler_.mean_, scaler.mean_)
    assert detector.n_iter_ == 5 and detector.loss_curve_ == first_curve + history.loss
    assert detector.decision_scores_.shape == (200,)  # scores and threshold: the last X's
    # without warm_start, fit starts afresh
    fresh = detector.set_params(warm_start=False, epochs=3).fit(x[:300])
    assert fresh.n_iter_ == 3 and fresh.loss_curve_ == first_curve


def test_warm_start_adds_its_training_time_to_train_seconds(monkeypatch):
    """train_seconds_ sums the wall time of the fit and of each warm-started fit after it."""
    histories = []

    def spy(module, data, **kwargs):
        histories.append(fastae.fit(module, data, **kwargs))
        return histories[-1]

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    x = np.random.default_rng(0).random((40, 5))
    model = AutoencoderTransformer(3, epochs=2, random_state=0).fit(x)
    first = model.train_seconds_
    assert first == histories[0].seconds
    model.set_params(warm_start=True, epochs=1).fit(x)
    assert model.train_seconds_ == first + histories[1].seconds > first


def test_warm_start_refuses_a_model_it_cannot_continue(digits):
    x = digits[0][:200]
    model = AutoencoderOutlierDetector(4, epochs=1, warm_start=True, random_state=0).fit(x)
    before = model.score_samples(x)
    changes = [
        (dict(n_components=5), r"^warm_start=True trains on from the fitted Autoencoder\(64 -> 4"),
        (dict(tied=False), r"^warm_start=True trains on from the fitted Autoencoder"),
        (dict(activation="tanh"), r"now give Autoencoder\(64 -> 4, activation='tanh'.*keep "),
        (dict(hidden_layer_sizes=(8,)), r"now give DeepAutoencoder\(64 -> 8 -> 4"),
        (dict(model="vae", activation="sigmoid"), r"now give VAE\(64 -> 128 -> 4"),
        (dict(scale="minmax"), r"^warm_start=True keeps the fitted scaler_ \(scale='standard'\)"),
        (dict(loss="bce"), r"^warm_start=True keeps the fitted loss_ 'mse'"),
    ]
    for change, message in changes:
        with pytest.raises(ValueError, match=message):
            model.set_params(**change).fit(x)
        model.set_params(**AutoencoderOutlierDetector(4, epochs=1, warm_start=True).get_params())
    with pytest.raises(ValueError, match="has 63 features"):
        model.fit(x[:, :63])
    with pytest.raises(TypeError, match=r"^warm_start must be a bool"):
        model.set_params(warm_start=1).fit(x)
    np.testing.assert_array_equal(model.score_samples(x), before)
    assert model.n_iter_ == 1
    # BCE on unscaled data: rows outside [0, 1] cannot continue it
    bce = AutoencoderTransformer(4, scale=None, epochs=1, warm_start=True).fit(x)
    assert bce.loss_ == "bce"
    with pytest.raises(ValueError, match=r"^loss='bce' needs inputs in \[0, 1\]"):
        bce.fit(x * 2)


# ----------------------------------------------------------------------------- partial_fit


def test_partial_fit_is_one_epoch_from_the_fitted_weights_with_adam_carried_over(digits):
    x = digits[0]
    model = AutoencoderTransformer(4, epochs=1, batch_size=32, random_state=0).fit(x[:200])
    expected = copy.deepcopy(model.module_).train()
    adam = fastae.training.default_optimizer(expected, 1e-2)
    seeds = np.random.RandomState(clone(model)._draw_seed())
    chunks = (x[200:300], x[300:350], x[350:450])
    for i, chunk in enumerate(chunks):
        if i == 2:  # lr set between calls takes effect
            model.set_params(lr=1e-3)
            adam.param_groups[0]["lr"] = 1e-3
        model.partial_fit(chunk)
        _train_on(expected, _scaled_tensor(model, chunk), int(seeds.randint(2**31 - 1)),
                  lr=None, epochs=1, optimizer=adam)  # fmt: skip
    torch.testing.assert_close(model.module_.state_dict(), expected.state_dict(), rtol=0, atol=0)
    assert model.n_iter_ == 4 and len(model.loss_curve_) == 4
    assert model._optimizer_state["state"][0]["step"].item() == 4 + 2 + 4  # ceil(rows / 32)
    # a fit starts afresh: no Adam state, and a fresh seed stream for later partial_fits
    model.set_params(lr=1e-2).fit(x[:200])
    assert model._optimizer_state is None and model._partial_seeds is None
    assert model.n_iter_ == 1


def test_partial_fit_from_scratch_and_through_pickle(digits, monkeypatch):
    seeds = []

    def spy(module, data, **kwargs):
        seeds.append(kwargs["seed"])
        return fastae.fit(module, data, **kwargs)

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    x = digits[0]
    model = AutoencoderTransformer(4, batch_size=32, early_stopping=True, random_state=0)
    model.partial_fit(x[:100])
    scaler = copy.deepcopy(model.scaler_)
    assert model.n_iter_ == 1 and model.validation_loss_curve_ is None  # no rows held out
    model.partial_fit(x[100:200] * 3)  # the first call's scaler stays
    np.testing.assert_array_equal(model.scaler_.scale_, scaler.scale_)
    twin = pickle.loads(pickle.dumps(model))
    for chunk in (x[200:300], x[300:400]):
        model.partial_fit(chunk)
        twin.partial_fit(chunk)
    np.testing.assert_array_equal(model.transform(x[:50]), twin.transform(x[:50]))
    assert model.n_iter_ == twin.n_iter_ == 4
    # each call draws the next seed of one stream seeded from random_state (the twin's too)
    stream = np.random.RandomState(clone(model)._draw_seed())
    expected = [int(stream.randint(2**31 - 1)) for _ in range(4)]
    assert seeds == expected[:2] + [expected[2], expected[2], expected[3], expected[3]]
    assert model.get_feature_names_out().tolist() == [
        f"autoencodertransformer{i}" for i in range(4)
    ]
    with pytest.raises(ValueError, match="has 63 features"):
        model.partial_fit(x[:10, :63])
    with pytest.raises(ValueError, match=r"^partial_fit keeps the fitted scaler_"):
        model.set_params(scale=None).partial_fit(x[:10])


@pytest.mark.parametrize("model_kind", ["autoencoder", "vae"])
def test_detector_partial_fit_trains_as_the_transformer_and_thresholds_the_last_chunk(
    digits, model_kind
):
    x = digits[0]
    params = {"n_components": 4, "batch_size": 32, "random_state": 0, "contamination": 0.2}
    vae = {"hidden": 16} if model_kind == "vae" else {}
    detector = AutoencoderOutlierDetector(model=model_kind, **params, **vae)
    chunks = (x[:150], x[150:300], x[300:420])
    if model_kind == "autoencoder":  # the same training as the transformer's partial_fit
        transformer = AutoencoderTransformer(
            **{k: v for k, v in params.items() if k != "contamination"}
        )
        for chunk in chunks:
            transformer.partial_fit(chunk)
    twin = None
    for i, chunk in enumerate(chunks):
        detector.partial_fit(chunk)
        if i == 0:
            twin = pickle.loads(pickle.dumps(detector))
        else:
            twin.partial_fit(chunk)
        scores = -detector.score_samples(chunk)
        np.testing.assert_allclose(detector.decision_scores_, scores, rtol=1e-12)
        quantile = np.percentile(scores, 80.0)
        lowest_flagged = scores[scores > quantile].min()
        highest_in = scores[scores <= quantile].max()
        assert highest_in < detector.threshold_ < lowest_flagged
        assert detector.threshold_ == pytest.approx((highest_in + lowest_flagged) / 2)
        assert detector.offset_ == -detector.threshold_
        np.testing.assert_array_equal(detector.labels_, scores > quantile)
        np.testing.assert_array_equal(detector.labels_, scores > detector.threshold_)
    assert detector.n_iter_ == 3 and len(detector.decision_scores_) == 120
    torch.testing.assert_close(detector.module_.state_dict(), twin.module_.state_dict())
    if model_kind == "autoencoder":
        torch.testing.assert_close(
            detector.module_.state_dict(), transformer.module_.state_dict(), rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="contamination must be in"):
        detector.set_params(contamination=0.7).partial_fit(x[:10])


def test_auto_loss_is_squared_error_after_standard_scaling():
    """Standardized data lies in [0, 1] only by accident (one row, constant columns): "auto"
    takes squared error there, so a stream fed one row at a time keeps training."""
    x = np.random.default_rng(0).random((50, 4))
    streamed = AutoencoderTransformer(3, random_state=0).partial_fit(x[:1])
    assert streamed.loss_ == "mse"
    streamed.partial_fit(x[1:2])
    constant = AutoencoderTransformer(3, epochs=1, random_state=0).fit(np.full((20, 4), 7.0))
    assert constant.loss_ == "mse"
    assert AutoencoderTransformer(3, epochs=1, scale="minmax").fit(x).loss_ == "bce"


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_standard_scaling_that_overflows_is_named():
    """Values near 1e154 square beyond float64: the variance overflow is the error, before
    any training, not a divergence or a call for the scaling already in use."""
    x = np.random.default_rng(0).random((50, 4)) * 1e154
    with pytest.raises(ValueError, match=r"^X's column variances overflow float64"):
        AutoencoderTransformer(3, epochs=1).fit(x)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_transformer_scores_rows_beyond_the_minmax_range(loss):
    """score_samples scores a row beyond the training range by how far it lies (as the
    outlier detector does), not as the clipped row at the range's edge."""
    x = np.random.default_rng(0).random((60, 4))
    model = AutoencoderTransformer(3, epochs=5, scale="minmax", loss=loss, random_state=0)
    model.fit(x)
    edge, far = x[:3].copy(), x[:3].copy()
    edge[:, 0], far[:, 0] = x[:, 0].max(), 50 * x[:, 0].max()
    assert (model.score_samples(far) < model.score_samples(edge) - 100).all()


def test_minmax_scores_of_rows_inside_the_range_are_those_of_the_scaled_rows(digits):
    """Scoring scales without clipping (X * scale_ + min_): for rows inside the training
    range that is MinMaxScaler's transform, so the score is the squared error of the round
    trip in the scaled space. Data whose columns do not start at 0 (min_ != 0)."""
    x = digits[0][:200] * 3.0 + 2.0  # every column's minimum is 2: min_ = -2 / range
    detector = AutoencoderOutlierDetector(
        6, scale="minmax", loss="mse", epochs=2, random_state=0, device="cpu"
    ).fit(x)
    assert (detector.scaler_.min_ != 0).all()
    scaled = detector.scaler_.transform(x[:20])
    with torch.no_grad():
        module = copy.deepcopy(detector.module_).double()
        recon = module.reconstruct(torch.tensor(scaled)).numpy()
    expected = np.square(scaled - recon).sum(1)
    np.testing.assert_allclose(-detector.score_samples(x[:20]), expected, rtol=1e-9)


def test_predict_confidence_counts_the_outliers_exactly_at_the_fitted_contamination(digits):
    """floor(n * contamination) for contamination as written (100 rows at 0.29: 29, where the
    float product 28.999... truncates to 28), and as fitted: set_params without a refit
    changes neither predict nor the confidence in it."""
    from scipy.stats import binom

    x = digits[0][:100]
    detector = AutoencoderOutlierDetector(4, contamination=0.29, epochs=1, random_state=0)
    scores = -detector.fit(x).score_samples(x)
    below = np.searchsorted(np.sort(detector.decision_scores_), scores, side="right")
    outlier = binom.sf(100 - 29, 100, (1 + below) / 102.0)
    expected = np.where(detector.predict(x) == -1, outlier, 1 - outlier)
    confidence = detector.predict_confidence(x)
    np.testing.assert_allclose(confidence, expected, rtol=1e-9, atol=1e-12)
    detector.set_params(contamination=0.4)
    np.testing.assert_array_equal(detector.predict_confidence(x), confidence)
    older = copy.copy(detector)  # as pickled before the count was kept: its contamination's
    del older._expected_outliers
    older.set_params(contamination=0.29)
    np.testing.assert_array_equal(older.predict_confidence(x), confidence)


def test_predict_confidence_of_the_training_rows_counts_ties_as_below(digits):
    """ExCeeD on the training rows themselves: each row's own score counts among those at or
    below it (searchsorted side="right"), and the row whose score is the 95th percentile (501
    rows at contamination 0.05: the percentile is one of them) is an inlier, its decision
    positive, so its confidence is the inlier's (1 - the outlier's)."""
    from scipy.stats import binom

    x, _ = digits
    train = x[:501]
    detector = AutoencoderOutlierDetector(8, scale=None, contamination=0.05, epochs=2)
    detector.set_params(random_state=0).fit(train)
    scores = detector.decision_scores_
    n = len(train)
    below = (scores[None, :] <= scores[:, None]).sum(1)
    outlier = binom.sf(n - int(n * 0.05), n, (1 + below) / (n + 2.0))
    predicted = detector.predict(train)
    expected = np.where(predicted == -1, outlier, 1 - outlier)
    on_quantile = scores == np.percentile(scores, 95.0)
    assert on_quantile.sum() == 1 and predicted[on_quantile][0] == 1
    assert detector.decision_function(train)[on_quantile][0] > 0
    np.testing.assert_allclose(detector.predict_confidence(train), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", ["standard", "minmax"])
def test_inverse_transform_undoes_the_scaling(digits, scale):
    """inverse_transform decodes the codes and maps them back through the fitted scaler_: in
    X's units (pixels 0..16 here), not the scaled space the module works in."""
    x = digits[0][:200] * 16.0
    model = AutoencoderTransformer(8, scale=scale, epochs=2, random_state=0, device="cpu").fit(x)
    codes = model.transform(x[:20])
    with torch.no_grad():
        module = copy.deepcopy(model.module_).double()
        decoded = module.decode(torch.tensor(codes)).numpy()
    np.testing.assert_allclose(
        model.inverse_transform(codes), model.scaler_.inverse_transform(decoded), rtol=1e-9
    )


def test_a_minmax_column_spanning_exactly_ten_epsilons_is_kept():
    """MinMaxScaler treats a range below 10 epsilons as constant (a strict bound): a column
    whose range is exactly 10 * float64's epsilon is scaled as any other, not refused."""
    span = 10 * np.finfo(np.float64).eps
    x = np.outer(np.linspace(0.0, 1.0, 20), np.full(3, span))
    assert (np.ptp(x, axis=0) == span).all()
    model = AutoencoderTransformer(2, scale="minmax", epochs=1, random_state=0).fit(x)
    np.testing.assert_allclose(model.scaler_.transform(x)[:, 0], np.linspace(0.0, 1.0, 20))


def test_the_threshold_lies_between_the_scores_it_separates(digits, monkeypatch):
    """Halfway between the highest score left in and the lowest flagged; where those are
    adjacent floats (none between), the one left in; where the top rows tie (none above the
    quantile), the quantile itself, flagging none."""
    x = digits[0][:20]
    detector = AutoencoderOutlierDetector(2, contamination=0.05, epochs=1, random_state=0).fit(x)
    # adjacent floats whose halfway rounds up (to the even mantissa) onto the flagged one
    left_in = np.nextafter(1.0, 2.0)
    adjacent = np.r_[np.zeros(18), left_in, np.nextafter(left_in, 2.0)]
    assert adjacent[18] + (adjacent[19] - adjacent[18]) / 2 == adjacent[19]
    ties = np.r_[np.zeros(10), np.full(10, 5.0)]
    for scores, threshold, flagged in ((adjacent, left_in, [19]), (ties, 5.0, [])):
        monkeypatch.setattr(detector, "_anomaly_scores", lambda X, scores=scores: scores)
        detector._set_threshold(x)
        assert detector.threshold_ == threshold and detector.offset_ == -threshold
        assert np.flatnonzero(detector.labels_).tolist() == flagged
        # predict gives each row its label: a score on the threshold (decision 0) is an inlier
        np.testing.assert_array_equal(detector.predict(x) == -1, detector.labels_ == 1)


def test_fit_warns_where_x_cannot_hold_one_outlier_at_the_contamination(digits):
    x = digits[0][:10]
    with pytest.warns(UserWarning, match=r"^fit set threshold_ from X's 10 rows, fewer than "):
        AutoencoderOutlierDetector(2, contamination=0.05, epochs=1, random_state=0).fit(x)


def test_contamination_one_half_is_allowed_and_just_above_is_not(digits):
    """contamination lies in (0, 0.5]: 0.5 itself fits (a threshold at the median), values
    just past either end are refused."""
    x = digits[0][:100]
    detector = AutoencoderOutlierDetector(2, contamination=0.5, epochs=1, random_state=0).fit(x)
    assert detector.threshold_ == pytest.approx(np.median(detector.decision_scores_))
    for bad in (0.0, np.nextafter(0.5, 1.0)):
        with pytest.raises(ValueError, match=r"^contamination must be in \(0, 0\.5\]"):
            AutoencoderOutlierDetector(2, contamination=bad, epochs=1).fit(x)


@pytest.mark.parametrize("how", ["warm_start", "partial_fit"])
def test_continuing_a_fit_checks_x_against_the_fitted_features(digits, how):
    """warm_start's fit and partial_fit validate X against the fitted n_features_in_ (reset
    only by a fit from scratch): scikit-learn's error naming the estimator, also where no
    scaler stands between X and the weights (scale=None)."""
    x = digits[0][:100]
    model = AutoencoderTransformer(4, scale=None, epochs=1, warm_start=True, random_state=0)
    model.fit(x)
    message = r"^X has 63 features, but AutoencoderTransformer is expecting 64 features"
    with pytest.raises(ValueError, match=message):
        model.fit(x[:, :63]) if how == "warm_start" else model.partial_fit(x[:, :63])
    assert model.n_features_in_ == 64


def test_predictions_check_x_against_the_fitted_features():
    """transform validates X against n_features_in_ without resetting it: scikit-learn's
    error naming the estimator (not the scaler's), and the fitted count kept."""
    x = np.random.default_rng(0).random((40, 5))
    model = AutoencoderTransformer(3, epochs=2, random_state=0).fit(x)
    message = r"^X has 4 features, but AutoencoderTransformer is expecting 5"
    with pytest.raises(ValueError, match=message):
        model.transform(x[:, :4])
    assert model.n_features_in_ == 5


def test_predictions_run_in_eval_mode_and_restore_the_modules_mode(digits):
    """Predicting puts module_ in eval mode for the pass (no input corruption) and back in
    the mode it found: a module_ a caller set training scores as an evaluated one."""
    x = digits[0][:100]
    detector = AutoencoderOutlierDetector(
        4, scale=None, noise=fastae.MaskingNoise(0.5), epochs=1, random_state=0
    ).fit(x)
    evaluated = detector.score_samples(x)
    detector.module_.train()
    np.testing.assert_array_equal(detector.score_samples(x), evaluated)
    assert detector.module_.training


def test_verbose_zero_trains_silently(capsys):
    """verbose as scikit-learn takes it: the int 0 shows nothing, 1 the progress bar."""
    x = np.random.default_rng(0).random((40, 5))
    AutoencoderTransformer(2, epochs=2, verbose=0, random_state=0).fit(x)
    assert capsys.readouterr().err == ""
    AutoencoderTransformer(2, epochs=2, verbose=1, random_state=0).fit(x)
    assert "loss=" in capsys.readouterr().err
    AutoencoderTransformer(2, epochs=2, verbose=np.bool_(False), random_state=0).fit(x)
    assert capsys.readouterr().err == ""
    AutoencoderTransformer(2, epochs=2, verbose=np.bool_(True), random_state=0).fit(x)
    assert "loss=" in capsys.readouterr().err


def _unit_rows(rows=40, cols=4, seed=0):
    """Rows in [0, 1] whose columns span exactly [0, 1]."""
    x = np.random.default_rng(seed).random((rows, cols))
    x[0], x[1] = 0.0, 1.0
    return x


def test_a_minmax_range_of_ten_epsilons_times_the_largest_magnitude_is_noise():
    """The rounding-noise bound is strict: a column spanning exactly 10 * eps * max|X| is taken
    for a constant, not refused."""
    eps = np.finfo(np.float64).eps
    n = 20
    x = np.empty((n, 2))
    x[:, 0] = np.where(np.arange(n) % 2, 0.5, 0.5 - 5 * eps)  # range 5 eps = 10 eps * 0.5
    x[:, 1] = np.linspace(0.0, 0.5, n)
    assert np.ptp(x[:, 0]) == 10 * eps * np.abs(x).max()
    model = AutoencoderTransformer(2, scale="minmax", epochs=1, random_state=0).fit(x)
    assert np.ptp(model.scaler_.transform(x)[:, 0]) < 1e-12  # dropped as a constant


def test_partial_fit_does_not_warn_when_exactly_half_of_x_lies_outside_the_minmax_range():
    """The drift warning needs most of X (strictly more than half) outside the fitted range."""
    model = AutoencoderTransformer(2, scale="minmax", random_state=0).partial_fit(_unit_rows())
    half = np.tile([0.5, 2.0], (10, 2))  # 20 of 40 values beyond 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.partial_fit(half)
    with pytest.warns(UserWarning, match=r"^partial_fit: 55% of X's values lie outside"):
        model.partial_fit(np.r_[half[:9], np.full((1, 4), 2.0)])  # 22 of 40: most


def test_bce_excess_of_float32_rows_is_scored_in_float64():
    """A float32 row far beyond [0, 1] (scale=None, BCE) scores its squared excess in float64
    (1e40, finite), not float32 (inf)."""
    model = AutoencoderOutlierDetector(2, scale=None, epochs=1, random_state=0).fit(_unit_rows())
    assert model.loss_ == "bce"
    row = np.full((1, 4), 0.5, dtype=np.float32)
    row[0, 0] = 1e20
    score = -model.score_samples(row)
    assert np.isfinite(score).all()
    np.testing.assert_allclose(score, 1e40, rtol=1e-6)


def test_float32_predictions_put_the_modules_own_mode_back():
    """float32 X runs the fitted module_ itself (no float64 copy); its mode is put back as found."""
    x = _unit_rows().astype(np.float32)
    model = AutoencoderTransformer(2, epochs=1, random_state=0).fit(x)
    model.module_.eval()
    model.transform(x)
    assert not model.module_.training
    model.module_.train()
    model.transform(x)
    assert model.module_.training


def test_float64_predictions_use_the_reference_backend_whatever_the_backend_set():
    """float64 predictions are the reference float64 pass even where the triton backend is set."""
    x = _unit_rows()
    model = AutoencoderTransformer(2, epochs=1, random_state=0, device="cpu").fit(x)
    expected = model.transform(x)
    with fastae.use_backend("triton"):
        np.testing.assert_array_equal(model.transform(x), expected)


def test_a_warm_start_fit_keeps_partial_fits_seed_stream(monkeypatch):
    """Only a fit from scratch starts partial_fit's seed stream afresh: after a warm-started
    fit the next partial_fit draws the stream's next seed, not its first again."""
    seeds = []

    def spy(module, data, **kwargs):
        seeds.append(kwargs["seed"])
        return fastae.fit(module, data, **kwargs)

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    x = _unit_rows()
    model = AutoencoderTransformer(2, epochs=1, warm_start=True, random_state=0)
    model.partial_fit(x).fit(x).partial_fit(x)
    stream = np.random.RandomState(model._draw_seed())
    first, second = (int(stream.randint(np.iinfo(np.int32).max)) for _ in range(2))
    assert seeds == [first, model._draw_seed(), second]


def test_predict_proba_zero_spread_counts_as_one_inside_the_unit_range():
    """With every training score equal the spread counts as 1: (s - min) / 1 for scores within
    1 of it, not +-inf clipped to 0 or 1."""
    x = _unit_rows(60)
    detector = AutoencoderOutlierDetector(2, epochs=1, random_state=0).fit(x)
    scores = -detector.score_samples(x[:5])
    low = scores[0] - 0.5
    detector.decision_scores_ = np.full(60, low)
    proba = detector.predict_proba(x[:5], method="linear")
    assert proba[0, 1] == pytest.approx(0.5)
    np.testing.assert_allclose(proba[:, 1], np.clip(scores - low, 0.0, 1.0), rtol=1e-9)


def test_confidence_of_a_score_on_the_threshold_is_an_inliers(monkeypatch):
    """A score equal to threshold_ (top rows tied: none flagged) is predicted an inlier, so its
    confidence is the inlier's, 1 - P(Binomial(n, p) > n - expected)."""
    from scipy.stats import binom

    x = _unit_rows(20)
    detector = AutoencoderOutlierDetector(2, contamination=0.05, epochs=1, random_state=0)
    detector.fit(x)
    ties = np.r_[np.zeros(10), np.full(10, 5.0)]
    monkeypatch.setattr(detector, "_anomaly_scores", lambda X: ties)
    detector._set_threshold(x)
    assert detector.threshold_ == 5.0 and (detector.predict(x) == 1).all()
    below = np.searchsorted(np.sort(ties), ties, side="right")
    outlier = binom.sf(20 - 1, 20, (1 + below) / 22.0)
    np.testing.assert_allclose(detector.predict_confidence(x), 1.0 - outlier, rtol=1e-12)


def test_minmax_mse_feature_scores_of_rows_beyond_the_range_sum_to_their_score():
    """Under scale="minmax" and squared error, rows beyond the training range are not clipped,
    as score_samples scores them."""
    x = _unit_rows(60, 5)
    detector = AutoencoderOutlierDetector(2, scale="minmax", loss="mse", epochs=2,
                                          random_state=0).fit(x)  # fmt: skip
    beyond = x[:10] * 3.0 - 1.0
    np.testing.assert_allclose(
        detector.feature_scores(beyond).sum(1), -detector.score_samples(beyond), rtol=1e-9
    )


def test_inverse_transform_keeps_the_codes_precision():
    """float32 codes decode to float32 rows, float64 codes to float64 rows (as transform keeps
    X's)."""
    x = _unit_rows()
    model = AutoencoderTransformer(2, epochs=1, random_state=0).fit(x)
    codes32 = model.transform(x.astype(np.float32))
    assert codes32.dtype == np.float32
    assert model.inverse_transform(codes32).dtype == np.float32
    assert model.inverse_transform(codes32.astype(np.float64)).dtype == np.float64
    assert model.inverse_transform(torch.tensor(codes32)).dtype == np.float32
