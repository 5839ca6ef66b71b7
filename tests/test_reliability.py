"""torch.compile, autocast, determinism, save/load, non-finite input and data-parallel training."""

import copy
import datetime
import io
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler, Subset, TensorDataset

import fastae
from fastae.modules import StackModule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(**kwargs):
    defaults = dict(
        noise=fastae.MaskingNoise(0.25),
        sparsity=fastae.KLSparsity(0.1, 0.3),
        contractive=0.05,
    )
    return fastae.Autoencoder(24, 10, **{**defaults, **kwargs}).to(DEVICE)


def _data(n=40, d=24, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_compile_fullgraph_matches_eager():
    """A full step with every regularizer compiles with no graph break and matches eager."""
    torch.manual_seed(0)
    model = _model(noise=fastae.SaltPepperNoise(0.2, seed=11))
    x = _data()
    compiled = torch.compile(model, fullgraph=True)
    loss_c, grads_c = _step(compiled, x)
    loss_e, grads_e = _step(model, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # fresh noise seeds drawn inside the compiled graph: no recompilation, still random
    model.noise = fastae.MaskingNoise(0.25)
    compiled = torch.compile(model, fullgraph=True)
    first, second = compiled(x).loss, compiled(x).loss
    assert torch.isfinite(first) and first != second


def test_compile_fullgraph_with_dynamic_shapes():
    """dynamic=True makes the KL target rho a symbolic float (it is checked when KLSparsity is
    made, not in the graph): batches of three sizes, one graph, the eager loss."""
    torch.manual_seed(0)
    model = _model(noise=None, contractive=0.0)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (5, 9, 17):
        x = _data(rows)
        torch.testing.assert_close(compiled(x).loss, model(x).loss, rtol=1e-5, atol=1e-6)


def test_compile_of_a_torch_func_transform():
    """torch.compile traces a torch.func transform over a model (the ops then run their
    reference math): per-sample gradients and the encoder's Jacobian as eager's."""
    torch.manual_seed(0)
    model = _model(noise=None, check_targets=False).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = _data(4)

    def loss(params, row):
        return torch.func.functional_call(model, params, (row[None],)).loss

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    compiled = torch.compile(per_sample, fullgraph=True)(params, x)
    for name, grad in per_sample(params, x).items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6)
    jacobian = torch.func.jacrev(model.encode)
    torch.testing.assert_close(torch.compile(jacobian, fullgraph=True)(x), jacobian(x))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_same_seed_gives_bitwise_identical_steps(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu" and not fastae.backend.triton_interpreting():
            pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    x = _data(12, 24)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = _model()
        with fastae.use_backend(backend):
            runs.append(_step(model, x))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_seeded_fits_from_threads_repeat_their_runs_alone():
    """fit's seed seeds torch's process-wide generator, from which the noise seeds are drawn:
    seeded fits in several threads take turns (as the estimators' do), each as run alone."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    base = fastae.Autoencoder(12, 6, noise=fastae.MaskingNoise(0.2))
    x = torch.rand(128, 12)

    def run(seed: int) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        fastae.fit(model, x, epochs=3, batch_size=32, seed=seed, progress=False)
        return [p.detach() for p in model.parameters()]

    alone = [run(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, range(4)))
    for got, want in zip(together, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_fits_from_threads_leave_the_warning_filters_as_they_were():
    """fit ignores torch's warning on a read-only numpy array (fastae's models never write to
    it) inside a catch_warnings that fastae's threads take in turns: none is left behind."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.random.default_rng(0).random((16, 5)).astype(np.float32)
    data.flags.writeable = False

    def run(_):
        for _ in range(25):
            fastae.fit(fastae.Autoencoder(5, 2), data, epochs=1, batch_size=16, progress=False)

    run(0)  # what a first fit imports (sympy, ...) adds its own filters first
    before = list(warnings.filters)
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: an unguarded swap would interleave
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, range(8)))
    finally:
        sys.setswitchinterval(switching)
    assert warnings.filters == before
    # the turns themselves: a second thread enters only after the first has left
    import threading
    import time

    from fastae import _checks

    inside, release, order = threading.Event(), threading.Event(), []

    def first():
        with _checks.ignoring("first"):
            inside.set()
            release.wait(10)
            order.append("first out")

    def second():
        inside.wait(10)
        with _checks.ignoring("second"):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    order.append("released")
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["released", "first out", "second in"]


def test_state_dict_round_trip_and_resume():
    """A model saved mid-training and loaded resumes to the same result as an uninterrupted one."""
    x = _data(64)

    def train(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).loss.backward()
            optimizer.step()

    torch.manual_seed(5)
    straight = _model(tied=False)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    train(straight, opt, 3)
    buffer = io.BytesIO()
    torch.save(
        {"model": straight.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    train(straight, opt, 3)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = _model(tied=False)
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    train(resumed, opt2, 3)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "make",
    [_model, lambda: fastae.VAE(24, 12, 3).to(DEVICE), lambda: _model(tied=False, noise=None)],
    ids=["autoencoder", "vae", "untied"],
)
def test_state_dict_round_trip_every_module(make):
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(1)
    other = make()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    other.eval()
    x = _data(5)
    assert torch.equal(model.reconstruction_error(x), other.reconstruction_error(x))


def test_module_deepcopy_and_pickle():
    model = _model()
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = _data(5)
    for other in (clone, loaded):
        other.eval()
    model.eval()
    for other in (clone, loaded):
        assert torch.equal(model.reconstruction_error(x), other.reconstruction_error(x))


@pytest.mark.parametrize(
    "make",
    [_model, lambda: fastae.VAE(24, 12, 3).to(DEVICE)],
    ids=["autoencoder", "vae"],
)
def test_export_and_vmap_take_the_output_dataclasses(make):
    """The forward's output dataclass is a pytree node: torch.export saves and loads an eval
    model, torch.func.vmap maps one over samples."""
    model = make().eval()
    x = _data(6)
    want = model(x)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (x,)), buffer)
    buffer.seek(0)
    got = torch.export.load(buffer).module()(x)
    assert type(got) is type(want)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.per_sample, want.per_sample)
    model.check_targets = False  # vmap cannot read values for the BCE target check
    mapped = torch.func.vmap(lambda row: model(row[None]))(x)
    torch.testing.assert_close(mapped.per_sample[:, 0], want.per_sample)


def test_cpu_bf16_autocast_with_reference():
    torch.manual_seed(0)
    model = fastae.Autoencoder(24, 10, sparsity=fastae.KLSparsity(0.1, 0.3), contractive=0.1)
    x = torch.rand(16, 24)
    with fastae.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.code.dtype == torch.bfloat16
    out.loss.backward()
    assert model.weight.grad.dtype == torch.float32
    reference = fastae.Autoencoder(24, 10, sparsity=fastae.KLSparsity(0.1, 0.3), contractive=0.1)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.loss, reference(x).loss, rtol=2e-2, atol=0)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_l1_term_under_autocast_is_float32(activation):
    """The L1 term is a batch mean, accumulated in float32 under bfloat16 autocast for every
    activation (tanh's |h| included, which is not rho_hat)."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(64, 32, activation=activation, sparsity=fastae.L1Sparsity(1.0))
    x = torch.rand(256, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.code.dtype == torch.bfloat16 and out.penalties["sparsity"].dtype == torch.float32
    expected = out.code.float().abs().mean(0).sum()
    torch.testing.assert_close(out.penalties["sparsity"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_class", ["Autoencoder", "VAE"])
def test_autocast_activations_from_an_earlier_layer(model_class):
    """Under autocast a layer before the model hands it bfloat16: the model takes it (as the
    ops do) and so do decode and reconstruct; outside autocast the dtype must match."""
    torch.manual_seed(0)
    model = fastae.Autoencoder(6, 4) if model_class == "Autoencoder" else fastae.VAE(6, 5, 2)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Sigmoid(), model)
    x = torch.rand(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        code = model.encode(net[1](net[0](x)))
        decoded = model.decode(code)
    assert net[0](x).dtype == torch.float32 and code.dtype == torch.bfloat16
    assert decoded.shape == (8, 6) and torch.isfinite(out.loss)
    out.loss.backward()
    assert net[0].weight.grad is not None and torch.isfinite(net[0].weight.grad).all()
    with pytest.raises(TypeError, match="x must have the dtype"):
        model(torch.rand(8, 6, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must have the dtype"):
        model.decode(code)


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_class", ["Autoencoder", "DeepAutoencoder", "VAE"])
def test_autocast_takes_the_other_half_dtype(model_class, input_dtype):
    """A float16 input under bfloat16 autocast (and the reverse) is checked for BCE and
    trained on, as torch.nn.Linear takes it; a value outside [0, 1] is still refused."""
    torch.manual_seed(0)
    model = {
        "Autoencoder": lambda: fastae.Autoencoder(6, 4),
        "DeepAutoencoder": lambda: fastae.DeepAutoencoder(6, (5, 3)),
        "VAE": lambda: fastae.VAE(6, 5, 2),
    }[model_class]()
    autocast_dtype = torch.bfloat16 if input_dtype == torch.float16 else torch.float16
    x = torch.rand(8, 6).to(input_dtype)
    outside = x.clone()
    outside[-1, -1] = 2.0
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = model(x)
        error = model.reconstruction_error(x)
        with pytest.raises(
            ValueError,
            match=r"x must lie in \[0, 1\] for loss .bce., got values in \[0\.\d+, 2\.0\]",
        ):
            model(outside)
    assert torch.isfinite(out.loss)
    assert error.shape == (8,) and torch.isfinite(error).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_and_grad_scaler(dtype):
    torch.manual_seed(0)
    model = _model()
    x = _data(256)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    before = model.weight.detach().clone()
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert out.code.dtype == dtype and torch.isfinite(out.loss)
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "softplus"])
def test_non_finite_inputs_propagate(backend, activation):
    """A NaN in a row makes that row's codes NaN under every activation (as torch's
    activations: relu and softplus too) and rho_hat NaN; jac too, except under relu, whose
    slope 1[z > 0] is 0 at NaN (as torch's relu backward); an inf stays in its row."""
    x = _data(6)
    x[2, 3] = float("nan")
    weight = torch.randn(5, 24, device=DEVICE)
    # (Triton 3.6's interpreter propagates NaN through tl.maximum either way; 3.9's,
    # and the GPU, only with tl.PropagateNan.ALL)
    with fastae.use_backend(backend):
        h, rho_hat, jac = fastae.ops.encode(x, weight, activation=activation)
        assert torch.isnan(h[2]).all() and torch.isfinite(h[[0, 1, 3, 4, 5]]).all()
        assert torch.isnan(rho_hat).all() and torch.isnan(jac) == (activation != "relu")
        x[2, 3] = float("inf")
        h, _, _ = fastae.ops.encode(x, weight, activation=activation)
        assert torch.isfinite(h[[0, 1, 3, 4, 5]]).all()


def test_empty_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="x must have at least one row"):
        fastae.ops.encode(torch.rand(0, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="h must have at least one row"):
        fastae.ops.decode_loss(torch.rand(0, 3), torch.rand(4, 3), target=torch.rand(0, 4))
    with pytest.raises(ValueError, match="h must have at least one row"):
        fastae.Autoencoder(5, 3).decode(torch.rand(0, 3))
    with pytest.raises(ValueError, match="z must have at least one row"):
        fastae.VAE(5, 4, 2).decode(torch.rand(0, 2))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_layer_without_hidden_units_is_a_clear_error(backend):
    with fastae.use_backend(backend), pytest.raises(ValueError, match="weight must have at least"):
        fastae.ops.encode(_data(4), torch.rand(0, 24, device=DEVICE))
    # a code without units: refused as well (the fused backward would leave dc unwritten)
    code, target = torch.rand(4, 0, device=DEVICE), torch.rand(4, 16, device=DEVICE)
    weight = torch.rand(16, 0, device=DEVICE)
    with (
        fastae.use_backend(backend),
        pytest.raises(ValueError, match="^h must have at least one col"),
    ):
        fastae.ops.decode_loss(code, weight, torch.rand(16, device=DEVICE), target=target)


@pytest.mark.parametrize("rho_hat_value", [0.0, 1.0])
def test_kl_sparsity_finite_when_rho_hat_saturates(rho_hat_value):
    """rho_hat is clamped to [1e-6, 1 - 1e-6] inside the KL penalty."""
    rho_hat = torch.full((7,), rho_hat_value, requires_grad=True)
    penalty = fastae.KLSparsity(0.05, 1.0).penalty(None, rho_hat)
    penalty.backward()
    assert torch.isfinite(penalty) and torch.isfinite(rho_hat.grad).all()


# ------------------------------------------------------------------ data parallel (gloo, CPU)


def _sparse_stack(features: int) -> StackModule:
    """Two KL-sparse layers that sync their statistics, the same weights on every call."""
    torch.manual_seed(7)
    layers = [
        fastae.Autoencoder(features, 6, sparsity=fastae.KLSparsity(0.1, 1.0), sync_statistics=True),
        fastae.Autoencoder(6, 4, sparsity=fastae.KLSparsity(0.2, 1.0), sync_statistics=True),
    ]
    return StackModule(layers)


def _ddp_worker(rank, world, store_path, x, state, deep_state, result_path):
    # rendezvous through a file (a free TCP port picked beforehand can be taken meanwhile)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a collective one process skips fails
    )  # fmt: skip
    try:
        model = fastae.Autoencoder(
            x.shape[1], 6, sparsity=fastae.KLSparsity(0.1, 1.0), contractive=0.1,
            sync_statistics=True,
        )  # fmt: skip
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        shard = x.chunk(world)[rank]
        out = ddp(shard)
        out.loss.backward()
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        if rank == 0:
            torch.save((loss / world, [p.grad for p in model.parameters()]), result_path)
        # the deep model's KL term sees the global batch's code means too
        deep = fastae.DeepAutoencoder(
            x.shape[1], (8, 4), activation="sigmoid", sparsity=fastae.KLSparsity(0.1, 1.0),
            sync_statistics=True,
        )  # fmt: skip
        deep.load_state_dict(deep_state)
        deep_ddp = torch.nn.parallel.DistributedDataParallel(deep)  # alive through backward
        out = deep_ddp(shard)
        out.loss.backward()
        deep_loss = out.loss.detach().clone()
        torch.distributed.all_reduce(deep_loss)
        if rank == 0:
            grads = [p.grad for p in deep.parameters()]
            torch.save((deep_loss / world, grads), result_path + ".deep")
        # and a stack's layers, each its own
        stack_ddp = torch.nn.parallel.DistributedDataParallel(_sparse_stack(x.shape[1]))
        out = stack_ddp(shard)
        out.loss.backward()
        stack_loss = out.loss.detach().clone()
        torch.distributed.all_reduce(stack_loss)
        if rank == 0:
            grads = [p.grad for p in stack_ddp.module.parameters()]
            torch.save((stack_loss / world, grads), result_path + ".stack")
        # fastae.fit under the process group: sharded data, parameters stay in sync
        history = fastae.fit(ddp, x, epochs=3, batch_size=4, seed=0, progress=False)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(gathered, flat)
        if rank == 0:
            torch.save((history.loss, gathered), result_path + ".fit")
        # clipped gradients and rows split off for validation: the processes stay in step
        clipped = fastae.Autoencoder(x.shape[1], 5)
        split = fastae.fit(
            torch.nn.parallel.DistributedDataParallel(clipped), x, epochs=2, batch_size=4,
            seed=0, progress=False, max_grad_norm=1e-2, validation_split=0.25,
        )  # fmt: skip
        records = [None] * world
        flat = torch.cat([p.detach().flatten() for p in clipped.parameters()])
        torch.distributed.all_gather_object(records, (split.loss, split.val_loss, flat))
        if rank == 0:
            torch.save(records, result_path + ".clip")
        # with validation data and patience: each epoch's losses are means over every
        # process's rows, so the processes stop alike (one stopping alone would leave the
        # other waiting in its next gradient all-reduce), and so do their schedulers' rates
        plain = fastae.Autoencoder(x.shape[1], 5)
        val = x[:7]  # shards of 4 and 3 rows: each row counted once
        history = fastae.fit(
            torch.nn.parallel.DistributedDataParallel(plain), x, validation_data=val,
            epochs=4, patience=1, batch_size=4, seed=0, progress=False, restore_best=False,
            scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        )  # fmt: skip
        with torch.no_grad():
            whole = float(plain(val).loss)  # the last epoch's weights on the whole set, here
        # a callback that asks process 0 alone to stop after epoch 2 stops both there
        asked = fastae.fit(
            torch.nn.parallel.DistributedDataParallel(fastae.Autoencoder(x.shape[1], 5)), x,
            epochs=4, batch_size=4, seed=0, progress=False,
            callback=lambda epoch, _: rank == 0 and epoch == 2,
        )  # fmt: skip
        record = (
            history.loss, history.val_loss, history.best_epoch, history.stopped_early, history.lr,
            len(asked.loss),
        )  # fmt: skip
        # one validation row: process 1's shard is empty, the mean is still that row's loss
        one = fastae.Autoencoder(x.shape[1], 5)
        history = fastae.fit(
            torch.nn.parallel.DistributedDataParallel(one), x, validation_data=x[:1], epochs=1,
            batch_size=4, seed=0, progress=False,
        )  # fmt: skip
        with torch.no_grad():
            only = (history.val_loss[-1], float(one(x[:1]).loss))
        records = [None] * world
        torch.distributed.all_gather_object(records, (*record, whole, only))
        if rank == 0:
            torch.save(records, result_path + ".val")
        # a map-style Dataset is sharded, shuffled and validated as tensor data is
        sourced = []
        for source in (x, Subset(TensorDataset(x), range(len(x)))):
            torch.manual_seed(3)
            net = fastae.Autoencoder(x.shape[1], 5)
            history = fastae.fit(
                torch.nn.parallel.DistributedDataParallel(net), source, validation_data=source,
                epochs=2, batch_size=3, seed=0, progress=False, drop_last=True,
            )  # fmt: skip
            flat = torch.cat([p.detach().flatten() for p in net.parameters()])
            sourced.append((history.loss, history.val_loss, flat))
        # a Dataset split per process beforehand is refused on every process, as tensor data
        # is; a NaN in one process's batch (not checked per batch there: a process raising
        # alone would leave the other waiting) ends the run on both, through the mean loss
        outcomes = []
        mine = Subset(TensorDataset(x), range(rank, len(x), world))
        poisoned = [x[:4].clone(), x[4:8]]
        poisoned[0][1, 2] = float("nan") if rank == 1 else 0.5
        mse = fastae.Autoencoder(x.shape[1], 5, output="identity", loss="mse")
        for data, wrapped in [
            (mine, torch.nn.parallel.DistributedDataParallel(fastae.Autoencoder(x.shape[1], 5))),
            (poisoned, torch.nn.parallel.DistributedDataParallel(mse)),
        ]:  # fmt: skip
            try:
                fastae.fit(wrapped, data, epochs=1, progress=False)
                outcomes.append("trained")
            except (ValueError, fastae.LossNotFinite) as error:
                outcomes.append(f"{type(error).__name__}: {error}")
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, outcomes)
        if rank == 0:
            torch.save((sourced, gathered), result_path + ".dataset")
        # fit(seed=s) seeds process r with s + r: masks differ across processes, repeatably
        # (a probe drawn after fit shows the generator's state); without a seed, every
        # process shuffles with process 0's seed, whatever the generators hold
        probes = []
        for _ in range(2):
            noisy = fastae.Autoencoder(x.shape[1], 5, noise=fastae.MaskingNoise(0.5))
            ddp = torch.nn.parallel.DistributedDataParallel(noisy)
            fastae.fit(ddp, x, epochs=1, batch_size=4, seed=0, progress=False)
            probes.append(fastae.ops.corrupt(torch.ones(4, 12), fastae.MaskingNoise(0.5)))
        shuffle_seeds = []

        class RecordingSampler(DistributedSampler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                shuffle_seeds.append(self.seed)

        torch.manual_seed(100 + rank)  # generators that differ across processes
        fastae.training.DistributedSampler = RecordingSampler
        try:
            fastae.fit(ddp, x, epochs=1, batch_size=4, progress=False)
            # and with a seed of each process's own: process 0's still shuffles all
            fastae.fit(ddp, x, epochs=1, batch_size=4, progress=False, seed=5 + rank)
        finally:
            fastae.training.DistributedSampler = DistributedSampler
        # data that differs between the processes (split beforehand, or fewer rows on one),
        # or a model over another group than the default: refused on every process alike
        refusals = []
        for data, wrapped in [
            (x[rank::world], ddp),
            (x[: len(x) - rank], ddp),
            (x, torch.nn.parallel.DistributedDataParallel(
                fastae.Autoencoder(x.shape[1], 5), process_group=torch.distributed.new_group())),
        ]:  # fmt: skip
            try:
                fastae.fit(wrapped, data, epochs=1, batch_size=4, progress=False)
            except ValueError as error:
                refusals.append(str(error))
        records = [None] * world
        torch.distributed.all_gather_object(records, (probes, shuffle_seeds, refusals))
        if rank == 0:
            torch.save(records, result_path + ".seeds")
            # a model that is not DistributedDataParallel trains on this process's data
            # alone, without collectives the other process would have to join
            lone = fastae.Autoencoder(x.shape[1], 5)
            steps = []
            sgd = torch.optim.SGD(lone.parameters(), lr=0.1)
            sgd.register_step_post_hook(lambda *_: steps.append(1))
            history = fastae.fit(lone, x, validation_data=x[:8], epochs=2, batch_size=4,
                                 optimizer=sgd, seed=0, progress=False)  # fmt: skip
            # in eval mode sync_statistics takes this process's batch: one process evaluates
            # the data-parallel model alone (as SyncBatchNorm lets it)
            with torch.no_grad():
                alone = float(model.eval()(x).loss)
                model.sync_statistics = False
                local = float(model(x).loss)
            torch.save((len(steps), history.val_loss, alone, local), result_path + ".lone")
        # no rank tears down gloo while its peer still talks to it (that can abort a process)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    # the work done and saved, leave without the interpreter's teardown: under
    # TRITON_INTERPRET=1 (tests/conftest.py) about one exit in ten otherwise aborted in C++
    # ("terminate called without an active exception") after everything had passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_sync_statistics_equals_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 12)
    model = fastae.Autoencoder(
        12, 6, sparsity=fastae.KLSparsity(0.1, 1.0), contractive=0.1, sync_statistics=True
    )
    state = copy.deepcopy(model.state_dict())
    deep = fastae.DeepAutoencoder(
        12, (8, 4), activation="sigmoid", sparsity=fastae.KLSparsity(0.1, 1.0)
    )
    result = str(tmp_path / "rank0.pt")
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "store"), x, state, deep.state_dict(), result),
        nprocs=2,
        start_method="spawn",
    )
    ddp_loss, ddp_grads = torch.load(result, weights_only=True)
    fit_losses, rank_params = torch.load(result + ".fit", weights_only=True)
    assert torch.equal(rank_params[0], rank_params[1])
    assert fit_losses[-1] < fit_losses[0]
    (loss_0, val_0, params_0), (loss_1, val_1, params_1) = torch.load(
        result + ".clip", weights_only=True
    )
    assert loss_0 == loss_1 and val_0 == val_1 and len(val_0) == 2
    assert torch.equal(params_0, params_1)
    records = torch.load(result + ".val", weights_only=True)
    assert records[0][:6] == records[1][:6]  # the same history on both processes
    assert records[0][5] == 2  # the callback's stop reached both
    val_loss, whole = records[0][1], records[0][6]
    assert val_loss[-1] == pytest.approx(whole, rel=1e-6)  # over both shards, not one
    for record in records:
        assert record[7][0] == pytest.approx(record[7][1], rel=1e-6)
    (probes_0, shuffle_0, refused_0), (probes_1, shuffle_1, refused_1) = torch.load(
        result + ".seeds", weights_only=True
    )
    assert torch.equal(probes_0[0], probes_0[1]) and torch.equal(probes_1[0], probes_1[1])
    assert not torch.equal(probes_0[0], probes_1[0])
    assert len(shuffle_0) == 2 and shuffle_0 == shuffle_1 and shuffle_0[1] == 5
    sourced, outcomes = torch.load(result + ".dataset", weights_only=True)
    (tensor_loss, tensor_val, tensor_params), (dataset_loss, dataset_val, dataset_params) = sourced
    for split, poisoned in outcomes:  # each process's
        assert split.startswith("ValueError: data differs between the processes (8 rows of 12")
        assert poisoned.startswith("LossNotFinite: the training loss is nan in epoch 1")
    assert dataset_loss == pytest.approx(tensor_loss, rel=1e-6)
    assert dataset_val == pytest.approx(tensor_val, rel=1e-6)
    torch.testing.assert_close(dataset_params, tensor_params, rtol=1e-5, atol=1e-7)
    for refused in (refused_0, refused_1):
        assert len(refused) == 3
        assert all(r.startswith("data differs between the processes (") for r in refused[:2])
        assert refused[2].startswith("model is DistributedDataParallel over a process group")
    steps, val_loss, alone, local = torch.load(result + ".lone", weights_only=True)
    assert alone == local
    assert steps == 2 * 4  # two epochs of the whole 16 rows in batches of 4, not a shard
    assert len(val_loss) == 2
    out = model(x)  # no process group here: local statistics of the whole batch
    out.loss.backward()
    torch.testing.assert_close(ddp_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(ddp_grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    deep_loss, deep_grads = torch.load(result + ".deep", weights_only=True)
    out = deep(x)
    out.loss.backward()
    torch.testing.assert_close(deep_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(deep_grads, deep.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    stack_loss, stack_grads = torch.load(result + ".stack", weights_only=True)
    stack = _sparse_stack(12)
    out = stack(x)
    out.loss.backward()
    torch.testing.assert_close(stack_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(stack_grads, stack.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
