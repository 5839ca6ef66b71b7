"""fastae.applications: semi-supervised classifier, stacked autoencoder, clustering on codes."""

import copy
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, make_blobs  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.exceptions import (  # noqa: E402
    ConvergenceWarning,
    DataConversionWarning,
    NotFittedError,
)
from sklearn.metrics import normalized_mutual_info_score  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastae  # noqa: E402
from fastae import applications  # noqa: E402
from fastae.applications import (  # noqa: E402
    DECClustering,
    DECModule,
    SemiSupervisedAutoencoder,
    SemiSupervisedModule,
    StackedAutoencoder,
    StackModule,
    cluster_codes,
    labelled_hold_out,
    soft_assignments,
    target_distribution,
)
from fastae.sklearn import AutoencoderOutlierDetector, AutoencoderTransformer  # noqa: E402

# y == -1 marks unlabelled samples (sklearn.semi_supervised's convention), so labels {-1, 1}
# leave one class: scikit-learn's check uses its own semi-supervised classifiers' integer
# labels instead (it names them in _choose_check_classifiers_labels); ours cannot opt in.
EXPECTED_FAILURES = {
    "SemiSupervisedAutoencoder": {
        "check_classifiers_classes": "y = -1 marks unlabelled samples, the check uses labels -1/1"
    }
}


@parametrize_with_checks(
    [
        # check_classifiers_train wants > 83% training accuracy on 3 blobs: 20 quick epochs
        SemiSupervisedAutoencoder(n_components=8, epochs=20, random_state=0),
        SemiSupervisedAutoencoder(n_components=4, model="vae", hidden=8, epochs=20, random_state=0),
        StackedAutoencoder((6, 3), pretrain_epochs=2, finetune_epochs=2, random_state=0),
        StackedAutoencoder(
            (6, 3), pretrain_epochs=2, finetune_epochs=2, early_stopping=True, random_state=0
        ),
        DECClustering(
            3, autoencoder=AutoencoderTransformer(2, epochs=2), refine_epochs=2, random_state=0
        ),
    ],
    expected_failed_checks=lambda estimator: EXPECTED_FAILURES.get(type(estimator).__name__, {}),
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def test_lazy_exports():
    assert fastae.SemiSupervisedAutoencoder is SemiSupervisedAutoencoder
    assert fastae.StackedAutoencoder is StackedAutoencoder
    assert fastae.DECClustering is DECClustering
    assert fastae.cluster_codes is cluster_codes


# ----------------------------------------------------------------------------- semi-supervised


def _split_labels(y, fraction, seed=0):
    rng = np.random.default_rng(seed)
    labeled = rng.random(len(y)) < fraction
    return np.where(labeled, y, -1), labeled


def test_semi_supervised_learns_from_few_labels(digits):
    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:1300], y[:1300], x[1300:], y[1300:]
    y_semi, labeled = _split_labels(y_tr, 0.1)
    model = SemiSupervisedAutoencoder(32, scale=None, epochs=25, lr=1e-2, random_state=0)
    model.fit(x_tr, y_semi)
    np.testing.assert_array_equal(model.classes_, np.arange(10))
    assert model.n_labeled_ == labeled.sum()
    assert model.score(x_te, y_te) > 0.75
    proba = model.predict_proba(x_te[:20])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(model.predict(x_te[:20]), model.classes_[proba.argmax(1)])
    np.testing.assert_allclose(np.exp(model.predict_log_proba(x_te[:20])), proba, rtol=1e-6)
    # float32 input (the float32 model's logits): the softmax in float64, each row summing to
    # 1 as scikit-learn's log_loss checks, to float64's rounding
    single = model.predict_proba(x_te[:20].astype(np.float32))
    assert single.dtype == np.float64
    np.testing.assert_allclose(single.sum(1), 1.0, rtol=0, atol=1e-14)
    assert model.encode(x_te[:7]).shape == (7, 32)


def test_semi_supervised_early_stopping(digits):
    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:1300], y[:1300], x[1300:], y[1300:]
    y_semi, _ = _split_labels(y_tr, 0.1)
    model = SemiSupervisedAutoencoder(
        32, scale=None, epochs=400, early_stopping=True, n_iter_no_change=4, random_state=0
    ).fit(x_tr, y_semi)
    curve = model.validation_loss_curve_
    assert model.n_iter_ < 400 and len(curve) == len(model.loss_curve_) == model.n_iter_
    assert model.best_validation_loss_ == curve[model.n_iter_ - 5]
    assert model.score(x_te, y_te) > 0.75
    with pytest.raises(ValueError, match=r"^validation_fraction must be < 1"):
        SemiSupervisedAutoencoder(validation_fraction=1).fit(x_tr, y_semi)
    plain = SemiSupervisedAutoencoder(4, epochs=2, random_state=0).fit(x_tr[:50], y_tr[:50])
    assert plain.validation_loss_curve_ is None and plain.best_validation_loss_ is None


def test_semi_supervised_hold_out_is_stratified_and_keeps_a_label_of_each_class():
    classes = np.array([-1.0] * 40 + [0.0] * 20 + [1.0] * 1 + [2.0] * 2)
    for seed in range(20):
        train, held = (rows.numpy() for rows in labelled_hold_out(classes, 0.5, seed))
        assert sorted(np.concatenate([train, held])) == list(range(len(classes)))
        # 32 of 63 rows, shared 40:20:1:2 by largest remainder, class 1 keeping its label
        assert [int((classes[held] == c).sum()) for c in (-1, 0, 1, 2)] == [21, 10, 0, 1]
        assert set(classes[train]) == {-1.0, 0.0, 1.0, 2.0}
    draws = {tuple(labelled_hold_out(classes, 0.5, seed)[1].tolist()) for seed in range(5)}
    assert len(draws) == 5  # drawn at random, from the seed
    # equal remainders: which classes give a row is drawn too, not always the first ones
    five_each = np.repeat(np.arange(10.0), 5)
    chosen = {
        tuple(np.unique(five_each[labelled_hold_out(five_each, 0.1, seed)[1].numpy()]))
        for seed in range(5)
    }
    assert len(chosen) > 1
    # one label per class, 10%: round(0.1) = 0 per class, but one unlabelled row is held out
    train, held = labelled_hold_out(np.array([-1.0, -1.0, 0.0, 1.0]), 0.1, 0)
    assert len(held) == 1 and held.item() in (0, 1) and len(train) == 3
    with pytest.raises(ValueError, match=r"^early_stopping has none of X's 2 samples to hold"):
        labelled_hold_out(np.array([0.0, 1.0]), 0.1, 0)
    # many small classes: the share held out follows the fraction, not each class's rounding
    three_each = np.repeat(np.arange(100.0), 3)
    for fraction in (0.1, 0.15, 0.17, 0.5):
        held = labelled_hold_out(three_each, fraction, 0)[1]
        assert len(held) == round(fraction * 300)
    assert len(labelled_hold_out(three_each, 0.9, 0)[1]) == 200  # each class keeps a label


def test_semi_supervised_early_stopping_trains_on_a_label_of_every_class(monkeypatch):
    """Each class's only label stays in training (a random hold-out of all rows took whole
    classes out: the head never saw them)."""
    x, y = load_digits(return_X_y=True)
    x, y = x[:200], y[:200]
    y_semi = np.full(200, -1)
    for c in range(10):
        y_semi[np.flatnonzero(y == c)[0]] = c
    drawn = []
    spy = lambda *args: drawn.append(labelled_hold_out(*args)) or drawn[-1]  # noqa: E731
    monkeypatch.setattr(applications, "labelled_hold_out", spy)
    model = SemiSupervisedAutoencoder(
        8, epochs=2, early_stopping=True, validation_fraction=0.3, random_state=1
    ).fit(x, y_semi)
    ((train, held),) = drawn
    assert set(y_semi[train.numpy()]) == set(range(-1, 10)) and len(held) == 60
    assert model.validation_loss_curve_ is not None


def test_semi_supervised_with_a_deep_autoencoder(digits):
    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:1300], y[:1300], x[1300:], y[1300:]
    y_semi, _ = _split_labels(y_tr, 0.1)
    model = SemiSupervisedAutoencoder(
        16, hidden_layer_sizes=(48,), activation="relu", scale=None, epochs=25, random_state=0
    ).fit(x_tr, y_semi)
    assert isinstance(model.module_.autoencoder, fastae.DeepAutoencoder)
    assert model.module_.autoencoder.sizes == (48, 16) and model.encode(x_te[:3]).shape == (3, 16)
    assert model.score(x_te, y_te) > 0.75
    with pytest.raises(ValueError, match=r"^contractive needs hidden_layer_sizes=\(\)"):
        SemiSupervisedAutoencoder(hidden_layer_sizes=(8,), contractive=0.1).fit(x_tr, y_semi)


def test_semi_supervised_with_a_vae(digits):
    """model="vae": the head reads the posterior mean, the autoencoder term is the negative
    ELBO; the cross-entropy alone (reconstruction_weight=0) trains the encoder through mu."""
    x, y = digits
    x_tr, y_tr, x_te, y_te = x[:1300], y[:1300], x[1300:], y[1300:]
    y_semi, _ = _split_labels(y_tr, 0.1)
    model = SemiSupervisedAutoencoder(
        16, model="vae", hidden=64, scale=None, epochs=25, random_state=0
    ).fit(x_tr, y_semi)
    vae = model.module_.autoencoder
    assert isinstance(vae, fastae.VAE) and vae.latent == 16 and vae.activation == "relu"
    assert model.module_.head.in_features == 16 and model.encode(x_te[:3]).shape == (3, 16)
    with torch.no_grad():
        mu = vae.encode(torch.tensor(x_te[:5], dtype=torch.float32))
    np.testing.assert_allclose(model.encode(x_te[:5]), mu.numpy(), rtol=1e-5, atol=1e-6)
    assert model.score(x_te, y_te) > 0.75
    batch = torch.cat([torch.tensor(x_tr[:32]).float(), torch.tensor(y_tr[:32])[:, None]], 1)
    module = SemiSupervisedModule(fastae.VAE(64, 16, 4), 10, reconstruction_weight=0.0)
    module(batch).loss.backward()
    assert module.autoencoder.posterior.weight.grad[:4].abs().sum() > 0  # the rows giving mu
    # the head reads mu, not the sampled z: no gradient reaches the rows giving logvar
    assert not module.autoencoder.posterior.weight.grad[4:].any()
    assert module.autoencoder.encoder.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="noise applies to model='autoencoder'"):
        SemiSupervisedAutoencoder(model="vae", noise=fastae.MaskingNoise(0.2)).fit(x_tr, y_semi)


def test_semi_supervised_head_reads_the_code_the_autoencoder_computes():
    """With noise, the head reads the code of the corrupted input in training mode (the one
    the autoencoder's loss is of), the clean code in eval mode."""
    torch.manual_seed(0)
    autoencoder = fastae.Autoencoder(6, 4, noise=fastae.MaskingNoise(0.5, seed=3))
    module = SemiSupervisedModule(autoencoder, 3, reconstruction_weight=0.5).train()
    x = torch.rand(8, 6)
    batch = torch.cat([x, torch.tensor([0, 1, 2, -1, 0, 1, 2, -1.0])[:, None]], 1)
    with torch.no_grad():
        out = module(batch)
        torch.testing.assert_close(out.logits, module.head(out.autoencoder.code), rtol=0, atol=0)
        assert not torch.allclose(out.logits, module.head(autoencoder.encode(x)))
        clean = module.eval()(batch)
        torch.testing.assert_close(clean.logits, module.logits(x), rtol=0, atol=0)


def test_semi_supervised_binary_decision_function(digits):
    """Two classes: the logit of classes_[1] less that of classes_[0], positive where predict
    gives classes_[1]; more classes: the logits themselves."""
    x, y = digits
    pick = (y == 3) | (y == 8)
    x2, y2 = x[pick][:200], np.where(y[pick][:200] == 3, "three", "eight")
    model = SemiSupervisedAutoencoder(8, epochs=3, random_state=0).fit(x2, y2)
    logits = model._map_chunks(fastae.applications._logits, model._prepared(x2))
    scores = model.decision_function(x2)
    np.testing.assert_array_equal(scores, logits[:, 1] - logits[:, 0])
    np.testing.assert_array_equal(scores > 0, model.predict(x2) == model.classes_[1])
    assert list(model.classes_) == ["eight", "three"]


def test_semi_supervised_warm_start(digits):
    x, y = digits
    y_semi, _ = _split_labels(y[:400], 0.3)
    model = SemiSupervisedAutoencoder(8, epochs=2, warm_start=True, random_state=0)
    model.fit(x[:400], y_semi)
    first, expected = list(model.loss_curve_), copy.deepcopy(model.module_).train()
    scaler = copy.deepcopy(model.scaler_)
    more_y, _ = _split_labels(y[400:800], 0.3)
    model.set_params(epochs=3).fit(x[400:800], more_y)
    # the fitted weights trained 3 more epochs on the new rows (scaled as the first fit's)
    labels = np.where(more_y >= 0, np.searchsorted(model.classes_, more_y), -1)
    data = torch.tensor(
        np.column_stack([scaler.transform(x[400:800]), labels]), dtype=torch.float32
    )
    history = fastae.fit(
        expected, data, epochs=3, batch_size=64, lr=1e-2, seed=clone(model)._draw_seed(),
        progress=False,
    )  # fmt: skip
    torch.testing.assert_close(model.module_.state_dict(), expected.state_dict(), rtol=0, atol=0)
    assert model.loss_curve_ == first + history.loss and model.n_iter_ == 5
    np.testing.assert_array_equal(model.scaler_.mean_, scaler.mean_)
    fewer = np.where(np.isin(y[:400], [0, 1]), y[:400], -1)
    with pytest.raises(ValueError, match=r"^warm_start=True needs y's labelled samples to hold"):
        model.fit(x[:400], fewer)
    with pytest.raises(
        ValueError,
        match=r"^warm_start=True trains on from the fitted Semi"
        r"SupervisedModule\(Autoencoder\(64 -> 8, .*n_classes=10",
    ):
        model.set_params(n_components=9).fit(x[:400], y_semi)
    assert model.n_iter_ == 5 and len(model.classes_) == 10


def test_unlabeled_rows_contribute_only_reconstruction():
    torch.manual_seed(0)
    ae = fastae.Autoencoder(6, 4, sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.2)
    module = SemiSupervisedModule(ae, n_classes=3, reconstruction_weight=0.7)
    x = torch.rand(9, 6)
    unlabeled = torch.cat([x, torch.full((9, 1), -1.0)], 1)
    out = module(unlabeled)
    assert out.cross_entropy.item() == 0.0
    torch.testing.assert_close(out.loss, 0.7 * out.autoencoder.loss)
    out.loss.backward()
    assert module.head.weight.grad.abs().max() == 0  # the head sees no labels
    # labelled rows: cross-entropy over those rows only, averaged
    y = torch.tensor([0, 2, -1, 1, -1, -1, 0, -1, 2], dtype=torch.float32)
    module.zero_grad()
    out = module(torch.cat([x, y[:, None]], 1))
    keep = y >= 0
    expected = torch.nn.functional.cross_entropy(out.logits[keep], y[keep].long())
    torch.testing.assert_close(out.cross_entropy, expected)
    torch.testing.assert_close(out.loss, expected + 0.7 * out.autoencoder.loss)


def test_semi_supervised_labels_and_errors(digits):
    x, y = digits
    x, y = x[:200], y[:200]
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"], dtype=object)[y]  # fmt: skip
    names[::2] = -1  # object labels, -1 marks unlabelled
    model = SemiSupervisedAutoencoder(8, epochs=2, random_state=0).fit(x, names)
    assert set(model.classes_) == set(names[1::2])
    assert set(model.predict(x[:10])) <= set(model.classes_)
    with pytest.raises(ValueError, match="no labelled sample"):
        SemiSupervisedAutoencoder(epochs=1).fit(x, np.full(len(y), -1))
    one_class = np.where(y == 3, 3, -1)
    with pytest.raises(ValueError, match=r"^y needs at least 2 classes.*got 1 class \(3\)$"):
        SemiSupervisedAutoencoder(epochs=1).fit(x, one_class)
    with pytest.raises(ValueError, match="reconstruction_weight"):
        SemiSupervisedAutoencoder(reconstruction_weight=-1.0, epochs=1).fit(x, y)
    # numpy turns -1 among strings into the label "-1": refused, not trained on
    as_strings = np.array([str(v) if i % 3 else -1 for i, v in enumerate(y)])
    assert as_strings.dtype.kind == "U"
    with pytest.raises(ValueError, match=r"^y has a string dtype .* dtype=object"):
        SemiSupervisedAutoencoder(epochs=1).fit(x, as_strings)
    # so is the string "-1" among object labels (a pandas Series of strings holds them so)
    with pytest.raises(ValueError, match=r"^y holds the string '-1'"):
        SemiSupervisedAutoencoder(epochs=1).fit(x, as_strings.astype(object))
    # a float -1 among object labels (pandas' mixed columns) marks unlabelled rows too
    floats = names.copy()
    floats[::2] = -1.0
    from_floats = SemiSupervisedAutoencoder(8, epochs=2, random_state=0).fit(x, floats)
    np.testing.assert_array_equal(from_floats.predict_proba(x), model.predict_proba(x))
    strings = SemiSupervisedAutoencoder(8, epochs=1, random_state=0).fit(x, y.astype(str))
    assert strings.n_labeled_ == len(y) and set(strings.classes_) == set(y.astype(str))


def test_semi_supervised_pickles(digits):
    x, y = digits
    model = SemiSupervisedAutoencoder(8, epochs=2, random_state=0).fit(x[:200], y[:200])
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(model.predict_proba(x[:30]), restored.predict_proba(x[:30]))


# ----------------------------------------------------------------------------- stacked


def test_stack_is_pretrained_layer_by_layer_then_fine_tuned(digits):
    x = digits[0][:600]
    noise, sparsity = fastae.MaskingNoise(0.2), fastae.KLSparsity(0.1, 0.05)
    params = {"scale": None, "noise": noise, "sparsity": sparsity, "random_state": 0}
    pretrained = StackedAutoencoder([24, 12, 5], pretrain_epochs=8, finetune_epochs=0, **params)
    pretrained.fit(x)
    layers = pretrained.module_.layers
    assert [(layer.in_features, layer.hidden_features) for layer in layers] == [
        (64, 24), (24, 12), (12, 5)
    ]  # fmt: skip
    assert all(layer.noise is noise and layer.sparsity is sparsity for layer in layers)
    assert [layer.loss_name for layer in layers] == ["bce", "bce", "bce"]
    assert len(pretrained.pretrain_loss_) == 3 and pretrained.loss_curve_ == []
    assert pretrained.transform(x[:10]).shape == (10, 5)
    assert pretrained.inverse_transform(pretrained.transform(x[:10])).shape == (10, 64)

    tuned = StackedAutoencoder([24, 12, 5], pretrain_epochs=8, finetune_epochs=8, **params)
    tuned.fit(x)
    assert len(tuned.loss_curve_) == 8
    # same seed, same pretraining: fine-tuning the whole stack lowers its reconstruction error
    assert tuned.score(x) > pretrained.score(x)
    assert list(tuned.get_feature_names_out()) == [f"stackedautoencoder{i}" for i in range(5)]


def test_stack_stops_early_on_the_same_held_out_rows(digits, monkeypatch):
    calls, bottom_codes = [], []

    def spy(module, data, **kwargs):
        if len(calls) == 1:  # layer 1's turn: the codes layer 0 gives its held-out rows
            with torch.no_grad():
                bottom_codes.append(calls[0][2].encode(calls[0][1]))
                bottom_codes.append(calls[0][2](calls[0][1]).loss.item())
        calls.append((data, kwargs.get("validation_data"), module))
        return fastae.fit(module, data, **kwargs)

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    x = digits[0][:400]
    stack = StackedAutoencoder(
        (16, 8), scale=None, pretrain_epochs=300, finetune_epochs=300, early_stopping=True,
        n_iter_no_change=3, random_state=0,
    ).fit(x)  # fmt: skip
    assert len(calls) == 3 and [c[1].shape[0] for c in calls] == [40, 40, 40]
    (bottom, held, _), (_, held_codes, _), (tuned, tuned_held, _) = calls
    assert torch.equal(tuned_held, held) and torch.equal(tuned, bottom)
    assert torch.equal(held_codes, bottom_codes[0])
    assert len(stack.pretrain_validation_loss_) == 2 and len(stack.pretrain_loss_) == 2
    # layer 0 kept the weights of its best epoch, whose held-out loss is recorded
    assert stack.pretrain_validation_loss_[0] == pytest.approx(bottom_codes[1], rel=1e-7)
    curve = stack.validation_loss_curve_
    assert len(curve) == len(stack.loss_curve_) < 300
    assert stack.best_validation_loss_ == curve[len(curve) - 4]
    assert stack.n_iter_ < 900
    plain = StackedAutoencoder((4,), pretrain_epochs=2, finetune_epochs=1, random_state=0).fit(x)
    assert plain.validation_loss_curve_ is None and plain.pretrain_validation_loss_ is None
    assert plain.n_iter_ == 3


def test_stack_pretrain_loss_is_each_layers_last_epoch_and_the_stack_is_left_in_eval(
    monkeypatch,
):
    """Without early stopping each layer keeps its last epoch's weights, and pretrain_loss_
    holds that epoch's loss; without fine-tuning the stack, built from the layers, is left in
    eval mode as after a fine-tuning (a module_ call then corrupts nothing)."""
    histories = []

    def recording(*args, **kwargs):
        histories.append(train(*args, **kwargs))
        return histories[-1]

    train = fastae.sklearn.fit
    monkeypatch.setattr(fastae.sklearn, "fit", recording)
    x = np.random.default_rng(0).random((80, 6))
    stack = StackedAutoencoder(
        (4, 2), pretrain_epochs=4, finetune_epochs=0, noise=fastae.MaskingNoise(0.5),
        random_state=0,
    ).fit(x)  # fmt: skip
    assert len(histories) == 2 and all(len(h.loss) == 4 for h in histories)
    assert stack.pretrain_loss_ == [h.loss[-1] for h in histories]
    assert not stack.module_.training
    rows = torch.tensor(stack.scaler_.transform(x), dtype=torch.float32, device=stack.device_)
    with torch.no_grad():
        assert torch.equal(stack.module_(rows).per_sample, stack.module_(rows).per_sample)


def test_stack_warm_start_fine_tunes_the_fitted_stack(digits):
    x = digits[0]
    params = {"pretrain_epochs": 2, "batch_size": 32, "random_state": 0, "warm_start": True}
    stack = StackedAutoencoder((16, 8), finetune_epochs=2, **params).fit(x[:300])
    pretrain_loss, curve = list(stack.pretrain_loss_), list(stack.loss_curve_)
    assert stack.n_iter_ == 2 + 2 + 2
    expected = copy.deepcopy(stack.module_).train()
    more = x[300:500] * 0.5  # other rows, which the fitted scaler scales
    stack.set_params(finetune_epochs=3).fit(more)
    # no pretraining: the fitted stack fine-tuned 3 more epochs on `more`, scaled as before
    history = fastae.fit(
        expected, torch.tensor(stack._scale(more), dtype=torch.float32), epochs=3,
        batch_size=32, lr=1e-2, seed=clone(stack)._draw_seed(), progress=False,
    )  # fmt: skip
    torch.testing.assert_close(stack.module_.state_dict(), expected.state_dict(), rtol=0, atol=0)
    assert stack.pretrain_loss_ == pretrain_loss and stack.n_iter_ == 6 + 3
    assert stack.loss_curve_ == curve + history.loss and not stack.module_.training
    stack.set_params(early_stopping=True, n_iter_no_change=1).fit(more)
    assert len(stack.validation_loss_curve_) == stack.n_iter_ - 9 <= 3
    before = stack.score_samples(x[:50])
    changes = [
        (dict(finetune_epochs=0), r"^warm_start=True fine-tunes the fitted stack: finetune_"),
        (dict(sizes=(16, 4)), r"^warm_start=True trains on from the fitted StackModule\(64 -> "
         r"16 -> 8\), but the parameters now give StackModule\(64 -> 16 -> 4\): keep sizes,"),
        (dict(tied=False), r"keep sizes, tied and activation or refit from scratch$"),
        (dict(activation="relu"), r"keep sizes, tied and activation or refit from scratch$"),
        (dict(scale="minmax"), r"^warm_start=True keeps the fitted scaler_ \(scale='standard'\)"),
    ]  # fmt: skip
    for change, message in changes:
        with pytest.raises(ValueError, match=message):
            copy.deepcopy(stack).set_params(**change).fit(more)
    with pytest.raises(ValueError, match="has 63 features"):
        stack.fit(x[:50, :63])
    np.testing.assert_array_equal(stack.score_samples(x[:50]), before)
    fresh = stack.set_params(warm_start=False, early_stopping=False, finetune_epochs=2)
    assert fresh.fit(x[:300]).loss_curve_ == curve  # without warm_start: afresh


ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def test_stack_module_loss_terms():
    torch.manual_seed(0)
    bottom = fastae.Autoencoder(10, 6, noise=fastae.GaussianNoise(0.1), contractive=0.5)
    top = fastae.Autoencoder(6, 3, sparsity=fastae.L1Sparsity(0.01))
    stack = StackModule([bottom, top])
    x = torch.rand(5, 10)
    out = stack(x)
    assert set(out.penalties) == {"contractive0", "sparsity1"}
    assert out.code.shape == (5, 3)
    total = out.reconstruction_loss + sum(out.penalties.values())
    torch.testing.assert_close(out.loss, total)
    torch.testing.assert_close(out.reconstruction_loss, out.per_sample.mean(), rtol=0, atol=0)
    stack.eval()
    with torch.no_grad():
        clean = stack(x)
        expected = bottom.decode(top.decode(top.encode(bottom.encode(x))))
    torch.testing.assert_close(stack.decode(stack.encode(x)), expected)
    torch.testing.assert_close(stack.reconstruct(x), expected)
    assert torch.isfinite(clean.per_sample).all()


@pytest.mark.parametrize(
    "bottom_loss, top", [("bce", ("tanh", "identity", "mse")), ("mse", ("relu", "sigmoid", "bce"))]
)
def test_stack_module_reconstruction_error_is_the_eval_per_sample_loss(bottom_loss, top):
    """reconstruction_error: the bottom layer's per-sample loss of the clean reconstruction
    (each upper layer decoding with its own output, whatever its hidden activation), as the
    eval forward gives it and as written out in float64, the input never corrupted, even in
    training mode."""
    torch.manual_seed(0)
    output = "sigmoid" if bottom_loss == "bce" else "identity"
    bottom = fastae.Autoencoder(
        10, 6, output=output, loss=bottom_loss, noise=fastae.MaskingNoise(0.5), contractive=0.5,
        dtype=torch.float64,
    )  # fmt: skip
    activation, top_output, top_loss = top
    upper = fastae.Autoencoder(
        6, 3, activation=activation, output=top_output, loss=top_loss, dtype=torch.float64
    )
    stack, x = StackModule([bottom, upper]).train(), torch.rand(5, 10, dtype=torch.float64)
    with torch.no_grad():
        error = stack.reconstruction_error(x)
        p = stack.reconstruct(x)
        expected = stack.eval()(x).per_sample
        h = torch.sigmoid(x @ bottom.weight.t() + bottom.bias)
        code = ACTIVATIONS[activation](h @ upper.weight.t() + upper.bias)
        h_hat = code @ upper.weight + upper.decoder_bias
        h_hat = torch.sigmoid(h_hat) if top_output == "sigmoid" else h_hat
        x_hat = h_hat @ bottom.weight + bottom.decoder_bias
        x_hat = torch.sigmoid(x_hat) if output == "sigmoid" else x_hat
    torch.testing.assert_close(p, x_hat, rtol=1e-12, atol=1e-12)
    if bottom_loss == "bce":
        oracle = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum(1)
    else:
        oracle = (x - x_hat).pow(2).sum(1)
    torch.testing.assert_close(error, oracle, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(expected, oracle, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"^x must have size 10 in dim 1"):
        stack.reconstruction_error(x[:, :9])


def test_stack_module_corrupts_the_input_only():
    """In training mode the bottom layer's noise corrupts x; an upper layer's noise spec (its
    pretraining's) does not touch the codes passed up."""
    torch.manual_seed(0)
    bottom = fastae.Autoencoder(10, 6, noise=fastae.MaskingNoise(0.5, seed=1))
    top = fastae.Autoencoder(6, 3, noise=fastae.MaskingNoise(0.5, seed=2))
    stack, x = StackModule([bottom, top]).train(), torch.rand(5, 10)
    with torch.no_grad():
        noisy = stack(x).loss
        top.noise = None
        torch.testing.assert_close(stack(x).loss, noisy, rtol=0, atol=0)
        bottom.noise = None
        assert stack(x).loss != noisy


def test_stack_rejects_bad_sizes(digits):
    x = digits[0][:50]
    with pytest.raises(ValueError, match="at least one layer"):
        StackedAutoencoder(sizes=[]).fit(x)
    with pytest.raises(ValueError, match=r"^sizes\[1\] must be a positive int, got 0$"):
        StackedAutoencoder(sizes=[8, 0]).fit(x)
    with pytest.raises(TypeError, match=r"^sizes must be a sequence of positive ints, got 8$"):
        StackedAutoencoder(sizes=8).fit(x)


# ----------------------------------------------------------------------------- clustering


def test_dec_math():
    """q and p against DEC's formulas written out element by element (float64), at alpha = 1
    and at alpha = 3, where the kernel's exponent -(alpha + 1) / 2 is not -1; the columns of
    q sum differently, so p's division by the cluster frequencies f_j counts."""
    torch.manual_seed(0)
    z, centers = torch.randn(20, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    z[:12] = centers[0] + 0.1 * z[:12]  # most points near one centre: unequal frequencies
    for alpha in (1.0, 3.0):
        q = soft_assignments(z, centers, alpha)
        points, means = z.tolist(), centers.tolist()
        squared = [[sum((a - b) ** 2 for a, b in zip(zi, cj, strict=True)) for cj in means]
                   for zi in points]  # fmt: skip
        kernel = [[(1 + d2 / alpha) ** (-(alpha + 1) / 2) for d2 in row] for row in squared]
        want_q = [[k / sum(row) for k in row] for row in kernel]
        torch.testing.assert_close(q, torch.tensor(want_q, dtype=torch.float64))
    frequencies = q.sum(0)
    assert frequencies.max() > 2 * frequencies.min()
    p = target_distribution(q)
    f = frequencies.tolist()
    weight = [[qij**2 / fj for qij, fj in zip(row, f, strict=True)] for row in q.tolist()]
    want_p = [[w / sum(row) for w in row] for row in weight]
    torch.testing.assert_close(p, torch.tensor(want_p, dtype=torch.float64))


def test_dec_assignments_of_far_codes_in_float32():
    """Codes far from the origin compared with their distances, in batches above 25 rows
    (where cdist's matrix-product form cancels): q to float32 rounding of float64's."""
    torch.manual_seed(0)
    z = torch.randn(64, 8, dtype=torch.float64) * 0.05 + 30
    centers = z[:3] + 0.01
    exact = soft_assignments(z, centers)
    got = soft_assignments(z.float(), centers.float()).double()
    torch.testing.assert_close(got, exact, rtol=0, atol=2e-6)
    assert torch.equal(got.argmax(1), exact.argmax(1))


def _two_pass_dec_loss(module, batch):
    """DEC's loss with the codes from their own encoder pass: KL(P || Q) of encode(x), plus the
    weighted loss of the autoencoder's forward."""
    d = batch.shape[1] - module.centers.shape[0]
    x, p = batch[:, :d], batch[:, d:]
    q = soft_assignments(module.autoencoder.encode(x), module.centers, module.alpha)
    kl = (p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum(1).mean()
    return kl + module.reconstruction_weight * module.autoencoder(x).loss


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastae.Autoencoder(12, 4, contractive=0.1),
        lambda: fastae.DeepAutoencoder(12, (6, 4), activation="sigmoid"),
        lambda: StackModule([fastae.Autoencoder(12, 6), fastae.Autoencoder(6, 4)]),
        lambda: fastae.VAE(12, 6, 4),
        lambda: fastae.Autoencoder(12, 4, noise=fastae.MaskingNoise(0.5, seed=3)),
        lambda: StackModule(
            [
                fastae.Autoencoder(12, 6, noise=fastae.MaskingNoise(0.5, seed=3)),
                fastae.Autoencoder(6, 4),
            ]
        ),
    ],
    ids=["autoencoder", "deep", "stack", "vae", "denoising", "denoising_stack"],
)
def test_dec_loss_takes_the_code_from_the_autoencoders_step(make):
    """With the reconstruction term, DEC's Q comes from the code the autoencoder's step
    computes (one encoder pass fewer), that of x itself: the loss and gradients of a separate
    encoder pass. Where noise corrupts x in training, Q still comes from clean codes."""
    torch.manual_seed(0)
    autoencoder = make().double()
    module = DECModule(autoencoder, torch.rand(3, 4, dtype=torch.float64), 1.0, 0.3).train()
    x = torch.rand(10, 12, dtype=torch.float64)
    batch = torch.cat([x, torch.softmax(torch.randn(10, 3, dtype=torch.float64), 1)], dim=1)
    calls, encode = [], autoencoder.encode
    autoencoder.encode = lambda x: calls.append(x) or encode(x)  # counts the encoder passes
    module(batch)
    assert len(calls) == (getattr(autoencoder, "noise", None) is not None)
    params = list(module.parameters())
    losses, grads = [], []
    for loss_of in (lambda: module(batch).loss, lambda: _two_pass_dec_loss(module, batch)):
        torch.manual_seed(1)  # the VAE's eps: the same draw in both
        loss = loss_of()
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, params))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-13, atol=0)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_dec_kl_holds_for_assignments_far_below_one():
    """KL(P || Q) from log Q itself: a centre 1e9 away has q_ij about 1e-19 (log q -43), which
    a clamped log(q) would read as 1e-12; p_ij = 0 terms count 0. Against the formula written
    out per element (float64)."""
    torch.manual_seed(0)
    autoencoder = fastae.Autoencoder(4, 2).double()
    centers = torch.tensor([[0.5, 0.5], [1e9, 1e9], [0.2, 0.9]], dtype=torch.float64)
    module = DECModule(autoencoder, centers, 1.0, 0.0).train()
    x = torch.rand(5, 4, dtype=torch.float64)
    p = torch.tensor([[0.5, 0.5, 0.0]] * 5, dtype=torch.float64)
    kl = module(torch.cat([x, p], dim=1)).loss
    want = 0.0
    for z in autoencoder.encode(x).tolist():
        kernel = [-math.log1p(sum((a - b) ** 2 for a, b in zip(z, c, strict=True)))
                  for c in centers.tolist()]  # fmt: skip
        log_total = max(kernel) + math.log(sum(math.exp(k - max(kernel)) for k in kernel))
        want += sum(pj * (math.log(pj) - (k - log_total)) for pj, k in zip(p[0].tolist(), kernel,
                    strict=True) if pj)  # fmt: skip
    assert kl.item() == pytest.approx(want / 5, rel=1e-12)
    assert want / 5 > 20  # log q of the far centre, about -43, dominates


def test_kmeans_and_dec_on_codes():
    x, y = make_blobs(600, n_features=12, centers=4, cluster_std=2.0, random_state=1)
    ae = AutoencoderTransformer(6, epochs=15, lr=1e-2, random_state=0).fit(x)
    kmeans = cluster_codes(ae.transform(x), 4, random_state=0)
    assert kmeans.labels_.shape == (600,)
    assert normalized_mutual_info_score(y, kmeans.labels_) > 0.8

    dec = DECClustering(
        4, autoencoder=AutoencoderTransformer(6, epochs=15, lr=1e-2), refine_epochs=4,
        random_state=0,
    )  # fmt: skip
    labels = dec.fit_predict(x)
    assert 1 <= dec.n_iter_ <= 4
    assert dec.cluster_centers_.shape == (4, 6)
    assert normalized_mutual_info_score(y, labels) > 0.8
    assert normalized_mutual_info_score(y, dec.kmeans_labels_) > 0.8
    np.testing.assert_array_equal(dec.predict(x), labels)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(dec)).predict(x[:50]), labels[:50])
    assert dec.autoencoder.get_params()["random_state"] is None  # the template is untouched
    only_kmeans = DECClustering(4, refine_epochs=0, random_state=0).fit(x)
    np.testing.assert_array_equal(only_kmeans.labels_, only_kmeans.kmeans_labels_)
    # labels in k-means' dtype (and KMeans.predict's), refined or not
    for model in (dec, only_kmeans):
        assert model.labels_.dtype == model.predict(x[:5]).dtype == kmeans.labels_.dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dec_soft_assignments_and_distances(dtype):
    """predict_proba is DEC's Student's t q and transform the codes' distances to the centres
    (KMeans.transform), both checked in float64 numpy from the transformer's codes; predict is
    the argmax of one and the argmin of the other."""
    x, _ = make_blobs(90, n_features=6, centers=3, random_state=2)
    x = x.astype(dtype)
    dec = DECClustering(
        3, autoencoder=AutoencoderTransformer(4, epochs=3), refine_epochs=2, alpha=2.0,
        random_state=0,
    ).fit(x)  # fmt: skip
    codes = dec.autoencoder_.transform(x).astype(np.float64)
    distances = np.sqrt(np.square(codes[:, None, :] - dec.cluster_centers_[None]).sum(-1))
    kernel = (1.0 + np.square(distances) / 2.0) ** -1.5
    q, transformed = dec.predict_proba(x), dec.transform(x)
    assert q.dtype == transformed.dtype == dtype
    assert q.shape == transformed.shape == (90, 3)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(transformed, distances, rtol=tol, atol=tol)
    np.testing.assert_allclose(q, kernel / kernel.sum(1, keepdims=True), rtol=tol, atol=tol)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=tol)
    labels = dec.predict(x)
    np.testing.assert_array_equal(q.argmax(1), labels)
    np.testing.assert_array_equal(transformed.argmin(1), labels)
    if dtype == np.float32:  # fit's labels came from the float32 module too
        np.testing.assert_array_equal(labels, dec.labels_)
    names = dec.get_feature_names_out()
    assert names.tolist() == ["decclustering0", "decclustering1", "decclustering2"]
    with pytest.raises(ValueError, match="X has 5 features, but DECClustering is expecting 6"):
        dec.transform(x[:, :5])
    with pytest.raises(NotFittedError):
        DECClustering(3).predict_proba(x)
    # the fitted kernel's alpha, whatever alpha is set to after fit
    assert dec.alpha_ == 2.0
    for alpha in (0.0, 5.0, "x"):
        dec.set_params(alpha=alpha)
        np.testing.assert_array_equal(dec.predict_proba(x), q)


def test_dec_arguments_and_estimators():
    x = np.random.default_rng(0).random((60, 5))
    small = AutoencoderTransformer(3, epochs=1)
    for tol, error in (
        ("x", TypeError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (2, ValueError),
    ):
        with pytest.raises(error, match=r"^tol\b"):
            DECClustering(3, autoencoder=small, tol=tol).fit(x)
    for unsupported in (SemiSupervisedAutoencoder(3, epochs=1), PCA(3)):
        with pytest.raises(TypeError, match=r"^autoencoder\b"):
            DECClustering(3, autoencoder=unsupported).fit(x)
    # the detector's module_.encode: an autoencoder's codes, a VAE's posterior means
    for model in ("autoencoder", "vae"):
        vae = {"hidden": 8} if model == "vae" else {}
        detector = AutoencoderOutlierDetector(2, model=model, epochs=1, **vae)
        dec = DECClustering(3, autoencoder=detector, refine_epochs=2, random_state=0).fit(x)
        assert dec.labels_.shape == (60,) and dec.cluster_centers_.shape == (3, 2)
        np.testing.assert_array_equal(dec.predict(x), dec.labels_)
        # refinement changed the detector's encoder: its scores and threshold follow it
        refined = dec.autoencoder_
        np.testing.assert_allclose(refined.decision_scores_, -refined.score_samples(x))
        np.testing.assert_array_equal(refined.predict(x) == -1, refined.labels_ == 1)


def test_dec_checks_its_clusters_before_training(monkeypatch):
    def trained(*args, **kwargs):
        raise AssertionError("the autoencoder trained before the checks")

    monkeypatch.setattr(AutoencoderTransformer, "fit", trained)
    x = np.random.default_rng(0).random((20, 5))
    with pytest.raises(ValueError, match=r"^n_clusters .* n_clusters=21 for n_samples=20"):
        DECClustering(21).fit(x)
    for n_init, error in ((0, ValueError), ("many", ValueError), (2.0, ValueError)):
        with pytest.raises(error, match=r"^n_init\b"):
            DECClustering(3, n_init=n_init).fit(x)


def test_dec_takes_as_many_clusters_as_samples():
    """n_clusters may equal the number of samples (KMeans' bound): a cluster for each row."""
    x = np.random.default_rng(0).random((6, 4))
    dec = DECClustering(
        6, autoencoder=AutoencoderTransformer(2, epochs=2), refine_epochs=0, random_state=0
    ).fit(x)
    assert sorted(dec.kmeans_labels_.tolist()) == list(range(6))


def test_cluster_codes_checks_its_arguments_by_name():
    """KMeans itself would take True for 1 (n_clusters, n_init, random_state)."""
    codes = np.random.default_rng(0).random((20, 3))
    for kwargs, error, name in [
        ({"n_clusters": True}, ValueError, "n_clusters"),
        ({"n_clusters": 0}, ValueError, "n_clusters"),
        ({"n_init": True}, ValueError, "n_init"),
        ({"n_init": 0}, ValueError, "n_init"),
        ({"random_state": True}, TypeError, "random_state"),
    ]:
        with pytest.raises(error, match=rf"^{name} must be "):
            cluster_codes(codes, **({"n_clusters": 3} | kwargs))
    fitted = cluster_codes(codes, 3, random_state=0, n_init="auto")
    assert fitted.get_params()["random_state"] == 0 and fitted.labels_.shape == (20,)
    assert cluster_codes(codes, 3, random_state=0, n_init=7).n_init == 7  # the restarts asked


def test_dec_keeps_the_feature_names_of_a_dataframe():
    """Fitted on a DataFrame, DEC records its columns and fits without a feature-name warning
    (pandas is not a dependency: the test runs where it is installed)."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(np.random.default_rng(0).random((40, 5)), columns=list("abcde"))
    dec = DECClustering(2, autoencoder=AutoencoderTransformer(2, epochs=1), refine_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.fit(frame)
    assert list(dec.feature_names_in_) == list("abcde")
    with pytest.raises(ValueError, match="feature names"):
        dec.predict(frame.rename(columns={"a": "z"}))
    assert not hasattr(dec.fit(frame.to_numpy()), "feature_names_in_")  # refitted without


def test_dec_names_itself_in_its_input_errors_and_warnings():
    """DEC validates X as any estimator does: its messages name DECClustering and X, not the
    autoencoder inside it."""
    x = np.random.default_rng(0).random((40, 5))
    dec = DECClustering(2, autoencoder=AutoencoderTransformer(2, epochs=1), refine_epochs=1)
    with pytest.raises(ValueError, match="^Input X contains NaN.\nDECClustering does not"):
        dec.fit(np.where(x > 0.9, np.nan, x))
    dec.fit(x)
    with pytest.raises(ValueError, match="^X has 4 features, but DECClustering is expecting 5"):
        dec.predict(x[:, :4])
    pd = pytest.importorskip("pandas")
    dec.fit(pd.DataFrame(x, columns=list("abcde")))
    with pytest.warns(UserWarning, match="^X does not have valid feature names, but DEC") as got:
        labels = dec.predict(x)
    assert len(got) == 1
    np.testing.assert_array_equal(labels, dec.labels_)


@pytest.mark.parametrize("verbose", [False, True])
def test_dec_verbose_shows_the_refinement(capsys, verbose):
    x = np.random.default_rng(0).random((60, 5))
    ae = AutoencoderTransformer(3, epochs=1)  # not verbose itself
    DECClustering(3, autoencoder=ae, refine_epochs=2, tol=0.0, random_state=0, verbose=verbose).fit(
        x
    )
    assert bool(capsys.readouterr().err) == verbose


def _semi_supervised(epochs):
    return SemiSupervisedAutoencoder(3, epochs=epochs, random_state=0)


def _stacked(epochs):
    return StackedAutoencoder((3,), pretrain_epochs=epochs, finetune_epochs=0, random_state=0)


@pytest.mark.parametrize("make", [_semi_supervised, _stacked])
def test_failed_fit_leaves_the_estimator_as_it_was(make):
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 5)), np.arange(40) % 2
    supervised = make is _semi_supervised

    def fit(model, data):
        return model.fit(data, y) if supervised else model.fit(data)

    def use(model, data):
        return model.predict(data) if supervised else model.transform(data)

    model = make(0)
    with pytest.raises(ValueError, match=r"^(pretrain_)?epochs\b"):
        fit(model, x)
    with pytest.raises(NotFittedError):
        use(model, x)
    model = fit(make(1), x)
    before = use(model, x)
    model.set_params(lr=-1.0)
    with pytest.raises(ValueError, match=r"^lr\b"):
        fit(model, x[:, :3])
    assert model.n_features_in_ == 5
    np.testing.assert_array_equal(use(model, x), before)
    with pytest.raises(ValueError, match="3 features"):
        use(model, x[:, :3])
    # failures found after X is read: a single class, a hold-out that leaves no row
    model.set_params(lr=1e-3, early_stopping=not supervised)
    fitted = dict(vars(model))
    with pytest.raises(ValueError, match="1 class|holds out 1 of X's 1 sample"):
        model.fit(x[:1, :3], y[:1]) if supervised else model.fit(x[:1, :3])
    assert vars(model).keys() == fitted.keys()
    assert all(vars(model)[name] is value for name, value in fitted.items())
    np.testing.assert_array_equal(use(model, x), before)


def test_tensor_labels_and_codes_are_read_as_arrays():
    """As the estimators' X (test_sklearn): a tensor, one that requires grad too, is read as
    the array of its values, in its precision."""
    rng = np.random.default_rng(0)
    x = rng.random((40, 5)).astype(np.float32)
    y = np.where(np.arange(40) % 3 == 0, np.arange(40) % 2, -1)
    tensor = torch.tensor(x).requires_grad_()
    from_arrays = _semi_supervised(1).fit(x, y)
    from_tensors = _semi_supervised(1).fit(tensor, torch.tensor(y))
    np.testing.assert_array_equal(from_tensors.classes_, from_arrays.classes_)
    labels = torch.tensor(np.arange(40) % 2, dtype=torch.float32).requires_grad_()
    assert from_tensors.score(tensor, labels) == from_arrays.score(x, np.arange(40) % 2)
    np.testing.assert_array_equal(
        from_tensors.decision_function(tensor), from_arrays.decision_function(x)
    )
    clusters = cluster_codes(tensor, 3, random_state=0)
    np.testing.assert_array_equal(
        clusters.cluster_centers_, cluster_codes(x, 3, random_state=0).cluster_centers_
    )
    assert clusters.cluster_centers_.dtype == np.float32


GRAD_MODE_ESTIMATORS = {
    "transformer": lambda: AutoencoderTransformer(3, epochs=2, random_state=0),
    "detector": lambda: AutoencoderOutlierDetector(3, model="vae", epochs=2, random_state=0),
    "semi_supervised": lambda: _semi_supervised(2),
    "stacked": lambda: StackedAutoencoder((4, 2), pretrain_epochs=1, finetune_epochs=1),
    "dec": lambda: DECClustering(
        2, autoencoder=AutoencoderTransformer(3, epochs=1), refine_epochs=2, tol=0.0
    ),
}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", GRAD_MODE_ESTIMATORS)
def test_estimators_fit_whatever_the_callers_grad_mode(name, mode):
    """A fit inside ``torch.no_grad()`` or ``torch.inference_mode()`` (say, on embeddings
    computed there) trains as one outside it does, to the same predictions."""
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 5)), np.arange(40) % 2

    def trained():
        model = GRAD_MODE_ESTIMATORS[name]()
        if "random_state" in model.get_params():
            model.set_params(random_state=0)
        model.fit(x, y)
        if hasattr(model, "partial_fit"):
            model.partial_fit(x)
        return model

    def predictions(model):
        for method in ("score_samples", "decision_function", "transform"):
            if hasattr(model, method):
                return getattr(model, method)(x)

    expected = predictions(trained())
    with getattr(torch, mode)():
        np.testing.assert_array_equal(predictions(trained()), expected)


@pytest.mark.cuda
def test_cuda_graph_training_matches_eager_training(digits):
    """Semi-supervised, stacked and DEC training replayed from CUDA graphs takes the same steps
    as eager training: loss curves to float32 rounding, the same predictions and clusters."""
    x, y = digits
    x, y_semi = x[:400], _split_labels(y[:400], 0.3)[0]
    graph = {"cuda_graph": True}
    semi = {"n_components": 16, "epochs": 3, "random_state": 0}
    eager, graphed = (SemiSupervisedAutoencoder(**semi, **extra).fit(x, y_semi)
                      for extra in ({}, graph))  # fmt: skip
    np.testing.assert_allclose(eager.loss_curve_, graphed.loss_curve_, rtol=1e-4)
    np.testing.assert_allclose(
        eager.decision_function(x[:50]), graphed.decision_function(x[:50]), rtol=1e-3, atol=1e-4
    )
    stack = {"sizes": (32, 8), "pretrain_epochs": 2, "finetune_epochs": 2, "random_state": 0}
    eager, graphed = (StackedAutoencoder(**stack, **extra).fit(x) for extra in ({}, graph))
    np.testing.assert_allclose(eager.pretrain_loss_, graphed.pretrain_loss_, rtol=1e-4)
    np.testing.assert_allclose(eager.loss_curve_, graphed.loss_curve_, rtol=1e-4)
    np.testing.assert_allclose(eager.transform(x[:50]), graphed.transform(x[:50]), atol=1e-4)
    eager, graphed = (
        DECClustering(10, autoencoder=AutoencoderTransformer(8, epochs=3, **extra),
                      refine_epochs=3, tol=0.0, random_state=0).fit(x)
        for extra in ({}, graph)
    )  # fmt: skip
    np.testing.assert_allclose(eager.cluster_centers_, graphed.cluster_centers_, atol=1e-4)
    assert (eager.labels_ == graphed.labels_).mean() > 0.99


def test_only_minus_one_marks_an_unlabelled_sample(digits):
    """-1 alone is sklearn.semi_supervised's unlabelled marker: other negative labels (-2
    here) are classes like any other, counted among the labelled rows."""
    x, y = digits
    x, y = x[:120], y[:120]
    labels = np.where(y < 5, -2, 7)
    labels[::3] = -1
    model = SemiSupervisedAutoencoder(4, epochs=1, random_state=0).fit(x, labels)
    np.testing.assert_array_equal(model.classes_, [-2, 7])
    assert model.n_labeled_ == (labels != -1).sum()


class _NA:
    """pandas' NA: comparisons give NA, which has no truth value."""

    def __ne__(self, other):
        return self

    def __bool__(self):
        raise TypeError("boolean value of NA is ambiguous")


@pytest.mark.parametrize("missing", [None, np.nan, np.float32("nan"), _NA()])
def test_missing_labels_are_refused_with_the_unlabelled_marker_named(missing):
    x = np.random.default_rng(0).random((40, 5))
    labels = np.array(["cat", "dog"] * 20, dtype=object)
    labels[:6] = missing
    message = r"^y holds None or NaN for 6 samples: the unlabelled marker is the integer -1, "
    with pytest.raises(ValueError, match=message):
        SemiSupervisedAutoencoder(2, epochs=1).fit(x, labels)
    with pytest.raises(ValueError, match=message):
        SemiSupervisedAutoencoder(2, epochs=1).fit(x, np.where(np.arange(40) < 6, np.nan, 1.0))
    labels[:6] = -1
    assert SemiSupervisedAutoencoder(2, epochs=1).fit(x, labels).n_labeled_ == 34


def test_score_leaves_out_the_unlabelled_samples():
    """score on semi-supervised y (as cross-validation passes it) is the accuracy on its
    labelled samples: -1 is no class to predict."""
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    x = rng.random((60, 5))
    classes = np.where(x[:, 0] > 0.5, "high", "low").astype(object)
    labels = classes.copy()
    labels[::3] = -1
    model = SemiSupervisedAutoencoder(3, epochs=2, random_state=0).fit(x, labels)
    kept = np.arange(60) % 3 != 0
    assert model.score(x, labels) == model.score(x[kept], classes[kept])
    weights = rng.random(60)
    assert model.score(x, labels, weights) == model.score(x[kept], classes[kept], weights[kept])
    assert model.score(x, classes) == np.mean(model.predict(x) == classes)
    # a column vector, as fit reads it (flattened, with scikit-learn's warning)
    with pytest.warns(DataConversionWarning):
        assert model.score(x, labels[:, None]) == model.score(x, labels)
    with pytest.raises(ValueError, match="^y has no labelled sample to score"):
        model.score(x, np.full(60, -1))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        model.score(x, labels[:-1])
    scores = cross_val_score(SemiSupervisedAutoencoder(3, epochs=1, random_state=0), x, labels)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("model", ["autoencoder", "vae"])
def test_estimators_models_check_no_targets_per_step(model):
    """The estimators clip BCE inputs to [0, 1] themselves: no model inside them checks its
    targets each step (a device sync on a GPU), a VAE inside a semi-supervised model too."""
    x = np.random.default_rng(0).random((40, 5))
    y = (x[:, 0] > 0.5).astype(int)
    for estimator in (
        AutoencoderTransformer(2, model=model, scale="minmax", epochs=1).fit(x),
        SemiSupervisedAutoencoder(2, model=model, scale="minmax", epochs=1).fit(x, y),
    ):
        flags = [
            m.check_targets for m in estimator.module_.modules() if hasattr(m, "check_targets")
        ]
        assert flags == [False]


def test_reconstruction_weight_zero_is_allowed():
    """reconstruction_weight lies in [0, inf): 0 trains the classifier alone (the
    semi-supervised head) or DEC's KL alone (Xie et al.'s DEC, no IDEC term)."""
    x = np.random.default_rng(0).random((60, 5))
    y = (x[:, 0] > 0.5).astype(int)
    model = SemiSupervisedAutoencoder(3, reconstruction_weight=0.0, epochs=1, random_state=0)
    assert model.fit(x, y).module_.reconstruction_weight == 0.0
    small = AutoencoderTransformer(3, epochs=1)
    dec = DECClustering(3, autoencoder=small, reconstruction_weight=0.0, refine_epochs=1)
    assert dec.set_params(random_state=0).fit(x).labels_.shape == (60,)


def _spy_on_fit(monkeypatch):
    """Record (module, data, kwargs) of every fastae.fit the estimators run."""
    import fastae.sklearn

    calls = []

    def spy(module, data, **kwargs):
        calls.append((module, data, kwargs))
        return fastae.fit(module, data, **kwargs)

    monkeypatch.setattr(fastae.sklearn, "fit", spy)
    return calls


def test_stack_layers_pretrain_on_the_clean_codes_of_the_layer_below(digits, monkeypatch):
    """With noise, each layer corrupts its own input while it trains, but the next layer
    pretrains on the codes of the clean inputs (the layer below in eval mode, no masking)."""
    calls = _spy_on_fit(monkeypatch)
    x = digits[0][:120]
    stack = StackedAutoencoder(
        (8, 4), scale=None, noise=fastae.MaskingNoise(0.5), pretrain_epochs=1,
        finetune_epochs=0, random_state=0, device="cpu",
    ).fit(x)  # fmt: skip
    assert len(calls) == 2
    bottom = stack.module_.layers[0]
    with torch.no_grad():
        clean = bottom.encode(torch.tensor(x, dtype=torch.float32))
    torch.testing.assert_close(calls[1][1], clean)


def test_stack_stages_draw_their_own_seeds(digits, monkeypatch):
    """Each pretrained layer and the fine-tuning train from seeds of their own (derived from
    random_state): no two stages replay the same shuffling and noise stream."""
    calls = _spy_on_fit(monkeypatch)
    StackedAutoencoder(
        (8, 6, 4), scale=None, pretrain_epochs=1, finetune_epochs=1, random_state=0
    ).fit(digits[0][:60])
    seeds = [kwargs["seed"] for _, _, kwargs in calls]
    assert len(seeds) == 4 and len(set(seeds)) == 4


def test_dec_target_intervals_draw_their_own_seeds(monkeypatch):
    """Each refinement interval (one per target update) trains from a seed of its own: no two
    replay the same shuffling."""
    calls = _spy_on_fit(monkeypatch)
    x = np.random.default_rng(0).random((60, 5))
    DECClustering(
        3, autoencoder=AutoencoderTransformer(3, epochs=1), refine_epochs=3, update_interval=1,
        tol=0.0, random_state=0,
    ).fit(x)  # fmt: skip
    seeds = [kwargs["seed"] for module, _, kwargs in calls if isinstance(module, DECModule)]
    assert len(seeds) == 3 and len(set(seeds)) == 3


def test_dec_draws_the_kmeans_seed_from_its_random_state():
    """For one autoencoder (its own random_state fixed), DEC's random_state seeds k-means:
    another value finds another solution."""
    x = np.random.default_rng(0).random((60, 5))
    ae = AutoencoderTransformer(3, epochs=1, random_state=0)
    fitted = [
        DECClustering(5, autoencoder=ae, n_init=1, refine_epochs=0, random_state=seed).fit(x)
        for seed in (0, 1)
    ]
    np.testing.assert_array_equal(*(dec.autoencoder_.transform(x) for dec in fitted))
    centres = [np.sort(dec.cluster_centers_[:, 0]) for dec in fitted]
    assert not np.allclose(*centres)


def test_dec_warns_of_clusters_its_refinement_emptied():
    """As KMeans warns of fewer distinct clusters than n_clusters: DEC's sharpening can merge
    a small cluster into its neighbours."""
    x, _ = make_blobs(
        300, n_features=10, centers=5, cluster_std=[0.5, 0.5, 3, 3, 3], random_state=3
    )
    small = AutoencoderTransformer(3, epochs=20, device="cpu")
    params = {"autoencoder": small, "reconstruction_weight": 0.0, "tol": 0.0, "lr": 1e-2}
    message = r"^DEC's refinement emptied (\d) of the 5 clusters k-means found"
    with pytest.warns(ConvergenceWarning, match=message) as caught:
        dec = DECClustering(5, refine_epochs=100, random_state=0, **params).fit(x)
    assert caught[0].filename == __file__ and len(caught) == 1
    emptied = int(re.match(message, str(caught[0].message)).group(1))
    assert len(np.unique(dec.labels_)) == 5 - emptied and len(np.unique(dec.kmeans_labels_)) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        DECClustering(5, refine_epochs=2, random_state=0, **params).fit(x)
    # clusters k-means left empty (three distinct rows, five clusters) are KMeans' to warn of
    three = np.repeat(np.eye(3, 10), 20, axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = DECClustering(5, refine_epochs=2, random_state=0, **params).fit(three)
    assert not [w for w in caught if "DEC's refinement" in str(w.message)]
    assert len(np.unique(dec.kmeans_labels_)) == 3


def test_dec_warns_of_a_single_cluster_its_refinement_emptied(monkeypatch):
    """One emptied cluster warns too (the refinement stubbed to merge cluster 0 into 1)."""
    refine = DECClustering._refine

    def merged(self, *args, **kwargs):
        refine(self, *args, **kwargs)
        self.labels_ = np.where(self.labels_ == 0, 1, self.labels_).astype(np.int32)

    monkeypatch.setattr(DECClustering, "_refine", merged)
    x, _ = make_blobs(90, n_features=4, centers=3, random_state=0)
    dec = DECClustering(
        3, autoencoder=AutoencoderTransformer(2, epochs=2), refine_epochs=1, random_state=0
    )
    with pytest.warns(ConvergenceWarning, match=r"^DEC's refinement emptied 1 of the 3 ") as got:
        dec.fit(x)
    assert len([w for w in got if "DEC's refinement" in str(w.message)]) == 1


def test_dec_refinement_runs_its_epochs_and_stops_on_tol():
    """refine_epochs bounds the refinement exactly (a last target interval is cut short:
    3 epochs at update_interval=2 are 2 + 1); tol=0 never stops early (no fewer than 0 labels
    can change), while tol=1 stops at the first target update after the first interval
    (fewer than all the labels change)."""
    x = np.random.default_rng(0).random((60, 5))
    small = AutoencoderTransformer(3, epochs=1)
    params = {"autoencoder": small, "random_state": 0}
    exact = DECClustering(3, refine_epochs=3, update_interval=2, tol=0.0, **params).fit(x)
    assert exact.n_iter_ == 3
    never = DECClustering(3, refine_epochs=4, update_interval=1, tol=0.0, **params).fit(x)
    assert never.n_iter_ == 4
    early = DECClustering(3, refine_epochs=4, update_interval=1, tol=1.0, **params).fit(x)
    assert early.n_iter_ == 1


def test_dec_tol_counts_the_labels_changed_since_the_last_target_update():
    """tol compares each target update's labels with the previous update's, not with
    k-means': a refinement that moves a fifth of the labels away from k-means' still stops
    once they settle."""
    x, _ = make_blobs(90, n_features=4, centers=3, cluster_std=2.0, random_state=0)
    dec = DECClustering(
        3, autoencoder=AutoencoderTransformer(2, epochs=5, random_state=0),
        reconstruction_weight=0.0, tol=0.02, lr=3e-2, refine_epochs=30, random_state=0,
    ).fit(x)  # fmt: skip
    assert dec.n_iter_ < 30
    assert np.mean(dec.labels_ != dec.kmeans_labels_) > 0.1


def _three_class_data():
    rng = np.random.default_rng(0)
    x = rng.random((45, 5)).astype(np.float32)
    y = np.array([0, 1, 2] * 15)
    return x, y


def test_semi_supervised_decision_function_is_the_heads_logits():
    """decision_function gives the classifier head's logits of the (unscaled) rows, and
    predict_proba their softmax (float64), for three classes."""
    x, y = _three_class_data()
    model = SemiSupervisedAutoencoder(3, scale=None, epochs=2, random_state=0).fit(x, y)
    module = model.module_.eval()
    with torch.no_grad():
        logits = module.logits(torch.from_numpy(x)).double().numpy()
    got = model.decision_function(x)
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        model.predict_proba(x), shifted / shifted.sum(axis=1, keepdims=True), rtol=1e-5
    )


def test_reconstruction_weight_must_be_finite_in_float32():
    """A reconstruction_weight beyond float32's range (the training math runs in float32) is
    refused by name, by the semi-supervised and the DEC estimator alike."""
    x, y = _three_class_data()
    with pytest.raises(ValueError, match=r"^reconstruction_weight must be finite in float32"):
        SemiSupervisedAutoencoder(2, reconstruction_weight=1e39, epochs=1).fit(x, y)
    small = AutoencoderTransformer(2, epochs=1)
    with pytest.raises(ValueError, match=r"^reconstruction_weight must be finite in float32"):
        DECClustering(3, autoencoder=small, reconstruction_weight=1e39, refine_epochs=1).fit(x)


def test_bytes_labels_holding_minus_one_are_refused():
    """numpy turns -1 among bytes labels into b"-1" (dtype S): refused as the string dtype,
    and b"-1" among object labels as the string marker, instead of training on a class
    named b"-1"."""
    x, _ = _three_class_data()
    as_bytes = np.array([b"cat", b"dog", -1] * 15)
    assert as_bytes.dtype.kind == "S"
    with pytest.raises(ValueError, match=r"^y has a string dtype \(\|S\d+\) and holds b'-1'"):
        SemiSupervisedAutoencoder(2, epochs=1).fit(x, as_bytes)
    with pytest.raises(ValueError, match=r"^y holds the string '-1'"):
        SemiSupervisedAutoencoder(2, epochs=1).fit(x, as_bytes.astype(object))


def test_float_labels_of_minus_one_mark_unlabelled_samples():
    """A float y (labels read from a float column) marks unlabelled samples with -1.0 as an
    int y does: they are no class, not counted as labelled, and left out of score."""
    x, _ = _three_class_data()
    y = np.array([0.0, 1.0, -1.0] * 15)
    model = SemiSupervisedAutoencoder(2, epochs=1, random_state=0).fit(x, y)
    np.testing.assert_array_equal(model.classes_, [0.0, 1.0])
    assert model.n_labeled_ == 30
    kept = y != -1.0
    want = float(np.mean(model.predict(x[kept]) == y[kept]))
    assert model.score(x, y) == want


def test_cluster_codes_takes_a_numpy_integer_n_init():
    """n_init as a numpy integer (e.g. read from an array of settings) is a positive int
    like Python's: the restarts asked are passed to KMeans."""
    codes = np.random.default_rng(0).random((20, 3))
    assert cluster_codes(codes, 3, random_state=0, n_init=np.int64(2)).n_init == 2


def test_applications_star_import_gives_the_lazy_estimators():
    """``from fastae.applications import *`` exports exactly the names that fastae loads
    lazily from fastae.applications."""
    namespace = {}
    exec("from fastae.applications import *", namespace)
    exported = {name for name in namespace if not name.startswith("__")}
    lazy = {name for name, module in fastae._LAZY.items() if module == "applications"}
    assert (
        exported
        == lazy
        == {
            "DECClustering",
            "SemiSupervisedAutoencoder",
            "StackedAutoencoder",
            "cluster_codes",
        }
    )
