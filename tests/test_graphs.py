"""GraphedStep and fit(cuda_graph=True): argument errors everywhere; on CUDA, graphed training
equals eager training step for step."""

import contextlib
import copy
import types
import warnings

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import fastae
from fastae import GraphedStep, graphs


def _model(**kwargs):
    return fastae.Autoencoder(12, 8, **kwargs)


def test_a_cpu_model_is_refused_naming_the_device():
    with pytest.raises(ValueError, match="model must be on a CUDA device.*cpu"):
        GraphedStep(_model())
    # before the optimizer's capturable flag, which a CPU model would not need
    model = _model()
    with pytest.raises(ValueError, match="model must be on a CUDA device.*cpu"):
        GraphedStep(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match=r"^cuda_graph=True: model must be on a CUDA device.*cpu$"):
        fastae.fit(_model(), torch.rand(8, 12), epochs=1, progress=False, cuda_graph=True)


def test_bad_arguments_are_refused_by_name():
    model = _model()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GraphedStep(lambda x: x)
    with pytest.raises(ValueError, match=r"^optimizer must be created with capturable=True"):
        fastae.graphs._check_capturable(torch.optim.Adam(model.parameters()))
    fastae.graphs._check_capturable(torch.optim.Adam(model.parameters(), capturable=True))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GraphedStep(model, "adam")
    for warmup in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="warmup must be a positive int"):
            GraphedStep(model, warmup=warmup)
    for bound, error in [(0.0, ValueError), (-1.0, ValueError), ("1", TypeError)]:
        with pytest.raises(error, match="max_grad_norm"):
            GraphedStep(model, max_grad_norm=bound)
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="parameters that require gradients"):
        GraphedStep(frozen)
    with pytest.raises(TypeError, match="cuda_graph"):
        fastae.fit(model, torch.rand(8, 12), epochs=1, progress=False, cuda_graph="yes")


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: the captured code runs once, as it is
    captured (a real capture runs no kernel), and a replay only counts itself."""

    replays = 0
    captures: list = []  # (model's check_targets inside the capture)
    options: list = []  # torch.cuda.graph's keywords, per capture
    devices: list = []  # the devices torch.cuda.device was entered with

    def replay(self):
        _FakeGraph.replays += 1


class _FakeStream:
    def __init__(self, *args):
        pass

    def wait_stream(self, stream):
        pass


@pytest.fixture
def cpu_graphs(monkeypatch):
    """GraphedStep's orchestration on the CPU: fake graphs and streams, CPU parameters let
    through."""
    from fastae import graphs

    _FakeGraph.replays, _FakeGraph.captures, _FakeGraph.options = 0, [], []
    _FakeGraph.devices = []
    models = []

    @contextlib.contextmanager
    def capture(graph, **options):
        _FakeGraph.captures.append([m.check_targets for m in models])
        _FakeGraph.options.append(options)
        yield

    @contextlib.contextmanager
    def on_device(device):
        _FakeGraph.devices.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(graphs, "_cuda_device", lambda params: params[0].device)
    return models


def test_an_optimizer_that_steps_with_a_closure_is_refused(cpu_graphs):
    model = _model()
    with pytest.raises(TypeError, match=r"^optimizer must step without a closure .* LBFGS.step"):
        GraphedStep(model, torch.optim.LBFGS(model.parameters()))


def test_warmup_then_one_capture_then_replays(cpu_graphs):
    model = _model()
    cpu_graphs.append(model)
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=2)
    batches = [torch.rand(16, 12) for _ in range(6)]
    for i, x in enumerate(batches):
        before = [p.detach().clone() for p in model.parameters()]
        expected = model(x).loss.detach()
        loss = step(x)
        assert step.graphed == (i >= 2)
        after = list(model.parameters())
        changed = any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
        # warm-up steps and the captured one update the parameters; the fake replays do not
        assert changed == (i <= 2)
        if i <= 2:
            torch.testing.assert_close(loss, expected)
    assert _FakeGraph.replays == step.replays == 4  # the captured batch's step, 3 replays
    assert _FakeGraph.captures == [[False]]  # one capture, the target check paused in it
    assert model.check_targets
    assert torch.equal(step._static_input, batches[-1])
    # another batch shape: an eager step with the same parameters, no replay
    x = torch.rand(5, 12)
    expected = model(x).loss.detach()
    torch.testing.assert_close(step(x), expected)
    assert _FakeGraph.replays == 4


def test_steps_clip_the_gradients_before_the_update(cpu_graphs):
    """With max_grad_norm, the warm-up, captured and eager steps leave gradients of that total
    norm (the bound is far below the unclipped norm) and update by them."""
    model = _model(contractive=0.5)
    cpu_graphs.append(model)
    x = torch.rand(16, 12)
    model(x).loss.backward()
    unclipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    bound = float(unclipped) / 10
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=bound)
    for batch in (x, x, x, x, torch.rand(5, 12)):  # 3 warm-up steps, the capture, an eager step
        before = [p.detach().clone() for p in model.parameters()]
        step(batch)
        grads = [p.grad for p in model.parameters()]
        assert float(torch.nn.utils.get_total_norm(grads)) == pytest.approx(bound, rel=1e-4)
        for b, p in zip(before, model.parameters(), strict=True):
            torch.testing.assert_close(b - p.detach(), 0.1 * p.grad)


def test_a_forward_without_a_loss_is_refused(cpu_graphs):
    layer = torch.nn.Linear(12, 12)
    cpu_graphs.append(layer)
    step = GraphedStep(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"^model's forward must return .* got Tensor"):
        step(torch.rand(16, 12))


def test_capture_is_thread_local_on_the_models_device(cpu_graphs):
    """Every call runs under torch.cuda.device(the model's device), and the capture runs on
    the warm-up's stream in thread-local mode (a DataLoader's pin-memory thread cannot break
    it)."""
    model = _model()
    step = GraphedStep(model, warmup=1)
    for x in [torch.rand(16, 12) for _ in range(3)]:
        step(x)
    assert step.graphed and _FakeGraph.devices == [step.device] * 3
    assert _FakeGraph.options == [{"stream": step._stream, "capture_error_mode": "thread_local"}]


def test_a_step_in_the_other_mode_runs_eagerly(cpu_graphs):
    """A graph captured in train mode (noise, sampling) is not replayed in eval mode."""
    model = _model()
    step = GraphedStep(model, warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x)
    assert step.graphed and _FakeGraph.replays == 1
    model.eval()
    expected = model(x).loss.detach()
    torch.testing.assert_close(step(x), expected)
    assert _FakeGraph.replays == 1
    model.train()
    step(x)
    assert _FakeGraph.replays == 2


def test_warm_ups_count_once_done_and_in_one_mode(cpu_graphs):
    """A warm-up that raises is not counted (the optimizer state the capture needs is made by
    a finished one), and a change of mode before the capture starts the warm-ups again: the
    graph is captured in the mode it was warmed up in."""

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.failures = _model(), 2

        def forward(self, x):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("transient")
            return self.inner(x)

    model = Flaky()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, optimizer, warmup=2)
    x = torch.rand(16, 12)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="transient"):
            step(x)
    assert step.calls == 0 and not optimizer.state
    step(x), step(x)
    assert not step.graphed and len(optimizer.state) == len(list(model.parameters()))
    model.eval()
    step(x)  # in eval mode: warm-ups again, no capture yet
    assert not step.graphed and step.calls == 1 and step._training is False
    model.train()
    step(x), step(x)
    assert not step.graphed  # two train-mode warm-ups
    step(x)
    assert step.graphed and step._training is True and _FakeGraph.replays == 1


def test_replays_point_grad_at_their_gradients(cpu_graphs):
    """After zero_grad (grads set to None), a replay's gradients are still in ``.grad``."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = GraphedStep(model, optimizer, warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x)
    written = [p.grad for p in model.parameters()]
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    step(x)
    assert _FakeGraph.replays == 2
    assert all(p.grad is g for p, g in zip(model.parameters(), written, strict=True))


@pytest.mark.parametrize("replace", ["model.double", "optimizer.load_state_dict"])
def test_replaced_memory_drops_the_graph(cpu_graphs, replace):
    """A replay writes the memory the capture saw: after model.double() or an optimizer's
    load_state_dict it is gone, so the step warms up and captures afresh."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, optimizer, warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x), step(x)
    assert step.graphed and _FakeGraph.replays == 2 and len(_FakeGraph.captures) == 1
    if replace == "model.double":
        model.double()
        x = x.double()
    else:
        optimizer.load_state_dict(optimizer.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    step(x)  # a warm-up: an eager step that updates the parameters
    assert not step.graphed and _FakeGraph.replays == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    step(x)
    assert step.graphed and len(_FakeGraph.captures) == 2 and _FakeGraph.replays == 3
    model.load_state_dict(model.state_dict())  # copies into the same memory: the graph stays
    step(x)
    assert len(_FakeGraph.captures) == 2 and _FakeGraph.replays == 4


class _Scaled(torch.nn.Module):
    """An autoencoder of its input times a buffer: a model whose replays read a buffer."""

    def __init__(self):
        super().__init__()
        self.autoencoder = _model()
        self.register_buffer("scale", torch.ones(12))

    def forward(self, x):
        return self.autoencoder(x * self.scale)


@pytest.mark.parametrize("replace", ["a trainable parameter", "a frozen parameter", "a buffer"])
def test_memory_a_replay_reads_replaced_drops_the_graph(cpu_graphs, replace):
    """Every tensor a replay reads, trainable or not, parameter or buffer: memory put in its
    place (``.data =``) leaves the graph reading freed memory, so the graph is dropped."""
    model = _Scaled()
    model.autoencoder.bias.requires_grad_(False)
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x)
    assert step.graphed
    tensor = {
        "a trainable parameter": model.autoencoder.weight,
        "a frozen parameter": model.autoencoder.bias,
        "a buffer": model.scale,
    }[replace]
    tensor.data = tensor.data.clone()
    step(x)  # a warm-up again
    assert not step.graphed and len(_FakeGraph.captures) == 1
    step(x)
    assert step.graphed and len(_FakeGraph.captures) == 2


def test_warm_ups_run_on_a_side_stream_that_waits_both_ways(cpu_graphs, monkeypatch):
    """As torch.cuda.graphs asks: the side stream waits for the work queued before a warm-up
    (the batch copied in), and the current stream for the warm-up before what follows."""
    order = []

    class Named:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            order.append((self.name, other.name))

    monkeypatch.setattr(torch.cuda, "Stream", lambda *args: Named("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Named("current"))
    model = _model()
    step = GraphedStep(model, warmup=2)
    step(torch.rand(16, 12))
    assert order == [("side", "current"), ("current", "side")]


def test_a_dropped_graph_captures_at_the_next_batch_shape(cpu_graphs):
    """After the graph is dropped the next batches set the shape captured, not the old one."""
    model = _model()
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
    step(torch.rand(16, 12)), step(torch.rand(16, 12))
    model.double()
    x = torch.rand(8, 12, dtype=torch.float64)
    step(x), step(x)
    assert step.graphed and step.shape == (8, 12) and len(_FakeGraph.captures) == 2


def test_a_failed_first_step_does_not_fix_the_shape(cpu_graphs):
    """A first batch the model refuses leaves no shape behind: later good batches graph."""
    for bad, error in ((torch.rand(16, 11), ValueError), (torch.rand(16, 11).double(), TypeError)):
        model = _model()
        step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
        with pytest.raises(error, match=r"^x must"):
            step(bad)  # a warm-up, or (another dtype than the model's) an eager step
        x = torch.rand(16, 12)
        step(x), step(x)
        assert step.graphed and step.shape == (16, 12)


def test_batches_off_the_models_device_or_dtype_are_refused(cpu_graphs):
    """A batch on another device, or of another dtype (which the graph's buffer would cast
    silently), is refused after the capture as before it."""
    model = _model()
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x)
    assert step.graphed
    with pytest.raises(ValueError, match=r"^x must be on the model's device cpu, got meta"):
        step(x.to("meta"))
    with pytest.raises(TypeError, match=r"^x must have the dtype of the model's parameters"):
        step(x.double())
    assert _FakeGraph.replays == 1


def test_returned_losses_and_capture_gradients_are_the_steps_own(cpu_graphs):
    """Warm-up and eager losses are detached; the capture's gradients are that batch's alone
    (the warm-up's cleared before it, not summed into it)."""
    model = _model()
    step = GraphedStep(model, warmup=1)  # no optimizer: the parameters stay
    x = torch.rand(16, 12)
    assert not step(x).requires_grad  # a warm-up
    assert not step(torch.rand(8, 12)).requires_grad  # eager: another shape
    step(x)  # the capture
    assert step.graphed
    fresh = copy.deepcopy(model)
    fresh.zero_grad(set_to_none=True)
    fresh(x).loss.backward()
    for mine, expected in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, expected.grad, rtol=0, atol=0)


def test_a_parameter_frozen_before_the_step_is_built_is_not_stepped(cpu_graphs):
    """A gradient left on a parameter frozen before the step was made (by an eager fit, say)
    is cleared, so the optimizer, which holds every parameter, does not step it."""
    model = _model()
    model(torch.rand(16, 12)).loss.backward()  # every parameter has a gradient
    model.bias.requires_grad_(False)
    frozen = model.bias.detach().clone()
    step = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x), step(x)
    assert step.graphed and model.bias.grad is None and torch.equal(model.bias, frozen)


def test_the_step_follows_the_model_to_another_device(cpu_graphs):
    """After model.to(another CUDA device) (which keeps the Parameter objects; on the CPU:
    the step's recorded device made another one's) the graph is dropped and the steps run
    where the parameters are, instead of refusing every batch there."""
    model = _model()
    step = GraphedStep(model, warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x)
    assert step.graphed
    step.device = torch.device("meta")  # where the parameters were at the capture
    step(x)  # a warm-up on the parameters' device
    assert step.device == torch.device("cpu") and not step.graphed
    step(x)
    assert step.graphed and len(_FakeGraph.captures) == 2
    # an optimizer whose state stayed where the model was: named, not a step across devices
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, optimizer, warmup=1)
    step(x)
    optimizer.state[model.weight]["momentum_buffer"] = torch.empty(8, 12, device="meta")
    step.device = torch.device("meta")  # the model was on meta, with that state
    message = r"^model moved to cpu, but optimizer keeps its state 'momentum_buffer' on meta"
    with pytest.raises(ValueError, match=message):
        step(x)


def test_freezing_or_thawing_a_parameter_drops_the_graph(cpu_graphs):
    """A replay computes and updates the parameters captured: after one is frozen the step
    captures afresh without it (its stale gradient cleared, so SGD with momentum no longer
    moves it), and after it is thawed, with it again."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, optimizer, warmup=1)
    x = torch.rand(16, 12)
    step(x), step(x), step(x)
    assert step.graphed and len(_FakeGraph.captures) == 1
    weight = model.weight
    weight.requires_grad_(False)
    frozen = weight.detach().clone()
    step(x)  # a warm-up: eager, without the frozen weight
    assert not step.graphed and weight.grad is None and torch.equal(weight, frozen)
    step(x), step(x)
    assert step.graphed and len(_FakeGraph.captures) == 2 and torch.equal(weight, frozen)
    assert all(p is not weight for p in step.params)
    weight.requires_grad_(True)
    step(x)
    assert not step.graphed and not torch.equal(weight, frozen)  # stepped again, eagerly
    step(x)
    assert len(_FakeGraph.captures) == 3 and any(p is weight for p in step.params)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="^model must have parameters that require gradients"):
        step(x)


def test_a_scheduled_lr_must_be_on_the_models_device():
    """A fused CUDA optimizer reads a CPU lr tensor on the host, once, at capture: refused."""
    from fastae.training import _scheduler

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    with pytest.raises(ValueError, match="lr as a tensor on the model's device"):
        _scheduler(scheduler, optimizer, True, torch.device("cuda"))
    assert _scheduler(scheduler, optimizer, True, torch.device("cpu")) is scheduler


def test_optimizer_state_off_the_graphs_device_is_refused(cpu_graphs):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, optimizer, warmup=1)
    step(torch.rand(16, 12))
    optimizer.state[model.weight]["counter"] = torch.zeros((), device="meta")
    with pytest.raises(ValueError, match="optimizer keeps its state 'counter' on meta"):
        step(torch.rand(16, 12))
    optimizer.state[model.weight]["counter"] = 0
    with pytest.raises(ValueError, match="optimizer keeps its state 'counter' as a Python num"):
        step(torch.rand(16, 12))
    del optimizer.state[model.weight]["counter"]
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra], "capturable": False})
    with pytest.raises(ValueError, match="optimizer must be created with capturable=True"):
        step(torch.rand(16, 12))


def test_a_model_on_two_devices_is_refused():
    from fastae import graphs

    on = [types.SimpleNamespace(device=torch.device(f"cuda:{i}")) for i in (0, 1)]
    assert graphs._cuda_device(on[:1]) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="model must be on one CUDA device.*cuda:0, cuda:1"):
        graphs._cuda_device(on)


def test_warmup_and_capture_read_one_buffer(cpu_graphs):
    """The warm-up steps and the capture see the batch in the buffer that replays copy into,
    whatever tensors the batches are (here a view 4 bytes off alignment): the capture then
    launches the kernels the warm-up compiled, whose keys include pointer alignment."""
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].data_ptr()))
    step = GraphedStep(model, warmup=2)
    rows = torch.rand(4 * 16 * 12 + 1)
    batches = [rows[1 + i * 192 : 1 + (i + 1) * 192].view(16, 12) for i in range(4)]
    for x in batches:
        step(x)
    assert step.graphed and step.replays == 2  # two warm-ups, the capture, one replay
    assert seen == [step._static_input.data_ptr()] * 3
    assert batches[0].data_ptr() % 16 != 0 and step._static_input.data_ptr() % 16 == 0
    assert torch.equal(step._static_input, batches[-1])


def test_uncaptured_steps_of_a_capturable_optimizer_do_not_warn(cpu_graphs):
    """torch.optim warns when a capturable optimizer steps outside a capture, which the warm-up
    and eager steps do by design: that warning is silenced there, and only that one."""

    class Warns(torch.optim.SGD):
        def step(self, closure=None):
            warnings.warn("This instance was constructed with capturable=True ...", stacklevel=2)
            warnings.warn("another warning", stacklevel=2)
            return super().step(closure)

    model = _model()
    step = GraphedStep(model, Warns(model.parameters(), lr=0.1), warmup=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in [torch.rand(16, 12) for _ in range(3)] + [torch.rand(5, 12)]:
            step(x)
    # two warm-ups, the capture and the eager step of another shape
    assert [str(w.message) for w in caught] == ["another warning"] * 4


def test_fit_counts_its_graphed_steps(cpu_graphs):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # 100 rows in batches of 16: six full batches and a short one per epoch; the first three
    # full batches warm up, the fourth is captured
    history = fastae.fit(
        model, torch.rand(100, 12), epochs=2, batch_size=16, optimizer=optimizer,
        progress=False, cuda_graph=True,
    )  # fmt: skip
    assert history.graphed_steps == _FakeGraph.replays == 2 * 6 - 3
    assert len(history.loss) == 2


def test_sklearn_estimators_train_through_the_graphed_step(cpu_graphs, monkeypatch):
    """``cuda_graph=True`` reaches fit: with 100 rows in batches of 16 over two epochs, 3
    warm-ups, then the capture and every full batch replayed (fake graphs on the CPU; fit's
    Adam, whose capturable mode needs CUDA, swapped for SGD; no noise, which the CPU would
    draw). A stack graphs each layer's pretraining and the fine-tuning; DEC's refinement
    (one fit per target update) graphs as its autoencoder does."""
    clone = pytest.importorskip("sklearn.base").clone
    from fastae import sklearn as fastae_sklearn
    from fastae.applications import DECClustering, SemiSupervisedAutoencoder, StackedAutoencoder

    monkeypatch.setattr(fastae_sklearn, "_graphs_possible", lambda device: True)
    made_capturable = []

    def adam(params, lr, capturable=False, **kwargs):
        made_capturable.append(capturable)
        return torch.optim.SGD(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    x = torch.rand(100, 12).numpy()
    y = np.arange(100) % 3
    per_fit = 2 * 6 - 3
    graphed = {"device": "cpu", "cuda_graph": True, "random_state": 0}
    autoencoder = fastae.AutoencoderTransformer(4, epochs=2, batch_size=16, **graphed)
    cases = [
        (autoencoder, per_fit),
        (fastae.AutoencoderOutlierDetector(4, epochs=2, batch_size=16, **graphed), per_fit),
        (SemiSupervisedAutoencoder(4, epochs=2, batch_size=16, **graphed), per_fit),
        (StackedAutoencoder((6, 4), pretrain_epochs=2, finetune_epochs=2, batch_size=16,
                            **graphed), 3 * per_fit),
        # two refinement fits of one epoch: 6 full batches, 3 of them warm-ups
        (DECClustering(3, autoencoder=autoencoder, refine_epochs=2, tol=0, random_state=0,
                       n_init=1), per_fit + 2 * (6 - 3)),
    ]  # fmt: skip
    for estimator, replays in cases:
        _FakeGraph.replays, made_capturable[:] = 0, []
        estimator.fit(x, y)
        assert _FakeGraph.replays == replays, type(estimator).__name__
        assert made_capturable and all(made_capturable), type(estimator).__name__
    monkeypatch.setattr(fastae_sklearn, "_graphs_possible", lambda device: False)
    for estimator, _ in cases:
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            clone(estimator).fit(x, y)


def test_a_graphed_fit_schedules_a_learning_rate_it_reads_from_memory(cpu_graphs, monkeypatch):
    """fit's default Adam gets its lr as a tensor on the model's device when a scheduler
    runs under cuda_graph (a replay reads it; a float would replay as captured); a given
    optimizer with a float lr is refused. (Fake graphs; the Adam swapped for SGD as above.)"""
    made = []

    def adam(params, lr, capturable=False, **kwargs):
        made.append(lr)
        return torch.optim.SGD(params, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    model = _model()
    cpu_graphs.append(model)
    schedule = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)  # noqa: E731
    kwargs = {"epochs": 3, "batch_size": 16, "seed": 0, "progress": False, "cuda_graph": True}
    history = fastae.fit(model, torch.rand(64, 12), lr=0.1, scheduler=schedule, **kwargs)
    assert isinstance(made[-1], torch.Tensor) and made[-1].device == model.weight.device
    assert made[-1].dtype == torch.float32  # what the fused CUDA Adam reads
    assert history.lr == pytest.approx([0.1, 0.05, 0.025])
    assert float(made[-1]) == pytest.approx(0.0125)  # the tensor the scheduler filled
    fastae.fit(model, torch.rand(64, 12), lr=0.1, **kwargs)
    assert made[-1] == 0.1  # a float without a scheduler
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^cuda_graph=True with a scheduler needs .* a tensor"):
        fastae.fit(model, torch.rand(64, 12), optimizer=optimizer, scheduler=schedule, **kwargs)


def test_cpu_randomness_is_refused_at_capture_on_any_device(cpu_graphs):
    step = GraphedStep(_model(noise=fastae.MaskingNoise(0.3)), warmup=1)
    x = torch.rand(16, 12)
    step(x)
    with pytest.raises(RuntimeError, match="draws random numbers on the CPU"):
        step(x)
    assert not step.graphed


def _fit(model, data, cuda_graph, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    return fastae.fit(
        model, data, epochs=3, batch_size=16, seed=0, optimizer=optimizer, progress=False,
        cuda_graph=cuda_graph, **kwargs,
    )  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize(
    "make",
    [
        _model,
        lambda: _model(sparsity=fastae.KLSparsity(0.1, 0.5), contractive=0.1),
        lambda: fastae.DeepAutoencoder(12, (8, 4), sparsity=fastae.L1Sparsity(0.01)),
    ],
    ids=["plain", "sparse_contractive", "deep"],
)
def test_graphed_fit_equals_eager_fit(make):
    # 100 rows in batches of 16: six graphed-shape batches and a shorter one (eager) per epoch
    data = torch.rand(100, 12, device="cuda")
    torch.manual_seed(1)
    eager = make().cuda()
    graphed = make().cuda()
    graphed.load_state_dict(eager.state_dict())
    eager_history = _fit(eager, data, cuda_graph=False)
    graphed_history = _fit(graphed, data, cuda_graph=True)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], value, msg=name)
    assert graphed_history.loss == pytest.approx(eager_history.loss, rel=1e-5)
    assert graphed_history.graphed_steps == 3 * 6 - 3 and eager_history.graphed_steps == 0


@pytest.mark.cuda
def test_graphed_fit_clips_the_gradients_as_eager_fit_does():
    """SGD, whose step scales with the gradient (Adam's would hardly change): clipped eager
    and graphed fits agree, and differ from the unclipped fit."""
    data = torch.rand(100, 12, device="cuda")
    torch.manual_seed(1)
    start = _model(contractive=0.5).cuda().state_dict()
    fitted = {}
    for name, kwargs in [
        ("eager", {"max_grad_norm": 1e-3}),
        ("graphed", {"max_grad_norm": 1e-3, "cuda_graph": True}),
        ("unclipped", {}),
    ]:
        model = _model(contractive=0.5).cuda()
        model.load_state_dict(start)
        history = fastae.fit(
            model, data, epochs=3, batch_size=16, seed=0, progress=False,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5), **kwargs,
        )  # fmt: skip
        fitted[name] = model.state_dict(), history
    (eager, eager_history), (graphed, graphed_history) = fitted["eager"], fitted["graphed"]
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, msg=name)
        assert not torch.allclose(fitted["unclipped"][0][name], value), name
    assert graphed_history.loss == pytest.approx(eager_history.loss, rel=1e-5)
    assert graphed_history.graphed_steps == 3 * 6 - 3


def test_default_optimizer_is_fused_on_cuda_and_on_the_cpu():
    """fit's Adam: fused where the parameters are all on CUDA (one kernel for the update) or
    all on the CPU; PyTorch's default for parameters on several kinds of device; capturable
    on request."""
    from fastae.training import default_optimizer

    for capturable in (False, True):
        optimizer = default_optimizer(_model(), 0.01, capturable=capturable)
        assert isinstance(optimizer, torch.optim.Adam)
        group = optimizer.param_groups[0]
        assert group["fused"] is True and group["capturable"] is capturable
        assert group["lr"] == 0.01
        if torch.cuda.is_available():
            group = default_optimizer(_model().cuda(), 0.01, capturable).param_groups[0]
            assert group["fused"] is True and group["capturable"] is capturable
    mixed = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2, device=d)) for d in
                                    ("cpu", "meta")])  # fmt: skip
    assert not default_optimizer(mixed, 0.01).param_groups[0]["fused"]


@pytest.mark.cuda
@pytest.mark.parametrize("scheduled", [False, True])
def test_graphed_fit_with_the_default_optimizer_equals_eager_fit(scheduled):
    """fit's own fused Adam, capturable for the graph, takes the same steps as without; with
    a scheduler, at the rates it sets (a tensor lr the replays read)."""
    data = torch.rand(100, 12, device="cuda")
    torch.manual_seed(1)
    eager = _model(contractive=0.1).cuda()
    graphed = _model(contractive=0.1).cuda()
    graphed.load_state_dict(eager.state_dict())
    kwargs = {"epochs": 3, "batch_size": 16, "seed": 0, "lr": 1e-2, "progress": False}
    if scheduled:
        kwargs["scheduler"] = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.1)
    eager_history = fastae.fit(eager, data, **kwargs)
    graphed_history = fastae.fit(graphed, data, cuda_graph=True, **kwargs)
    rates = [1e-2, 1e-3, 1e-4] if scheduled else [1e-2] * 3
    assert eager_history.lr == pytest.approx(rates) and graphed_history.lr == pytest.approx(rates)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], value, msg=name)
    assert graphed_history.loss == pytest.approx(eager_history.loss, rel=1e-5)
    assert graphed_history.graphed_steps == 3 * 6 - 3


@pytest.mark.cuda
def test_a_replayed_step_computes_that_batchs_loss_and_gradients():
    model = _model(contractive=0.2).cuda()
    step = GraphedStep(model, warmup=2)
    batches = [torch.rand(16, 12, device="cuda") for _ in range(6)]
    for i, x in enumerate(batches):
        loss = step(x).clone()
        assert step.graphed == (i >= 2)
        graph_grads = [p.grad for p in model.parameters()]
        grads = [grad.clone() for grad in graph_grads]
        model.zero_grad(set_to_none=True)
        expected = model(x).loss
        expected.backward()
        torch.testing.assert_close(loss, expected.detach())
        for p, grad in zip(model.parameters(), grads, strict=True):
            torch.testing.assert_close(grad, p.grad)
        for p, grad in zip(model.parameters(), graph_grads, strict=True):
            p.grad = grad  # the tensors the graph writes (and eager steps beside it zero)
    # another batch shape runs eagerly, beside the graph
    x = torch.rand(5, 12, device="cuda")
    torch.testing.assert_close(step(x), model(x).loss.detach())


class _CpuDraw(torch.nn.Module):
    """A model whose step draws on the CPU (which a replay would repeat)."""

    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, x):
        scale = 1.0 + torch.rand(()).item()
        return types.SimpleNamespace(loss=self.inner(x).loss * scale)


@pytest.mark.cuda
def test_cpu_randomness_in_a_step_is_refused_at_capture():
    step = GraphedStep(_CpuDraw().cuda(), warmup=1)
    x = torch.rand(16, 12, device="cuda")
    step(x)
    with pytest.raises(RuntimeError, match="draws random numbers on the CPU"):
        step(x)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "noise",
    [fastae.MaskingNoise(0.5), fastae.GaussianNoise(0.3), None],
    ids=["mask", "gauss", "vae"],
)
def test_replays_draw_fresh_noise(noise):
    """The seeds of a denoising step and of a VAE's eps are drawn on the GPU: each replay
    draws afresh."""
    model = (_model(noise=noise) if noise is not None else fastae.VAE(12, 8, 3)).cuda()
    step = GraphedStep(model, warmup=1)
    x = torch.rand(16, 12, device="cuda")
    losses = [step(x).item() for _ in range(5)]  # the same batch, parameters unchanged
    assert step.graphed
    assert len(set(losses[1:])) == 4, losses  # capture's step and three replays all differ


@pytest.mark.cuda
def test_target_checks_are_paused_for_the_capture_only():
    model = _model().cuda()
    assert model.check_targets
    step = GraphedStep(model, warmup=1)
    x = torch.rand(16, 12, device="cuda")
    step(x)
    step(x)
    assert step.graphed and model.check_targets


def test_a_distributed_data_parallel_model_is_refused_by_name():
    """DDP's gradient all-reduce cannot be captured: a DDP-wrapped model is refused (an
    uninitialised DDP object: no process group is needed to see the refusal)."""
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    with pytest.raises(ValueError, match=r"^model must not be DistributedDataParallel"):
        GraphedStep(ddp)


def test_an_optimizer_without_capturable_is_refused_before_any_step(cpu_graphs):
    """The capturable flag is checked when the step is built, not at the capture after the
    warm-ups have already trained the model."""
    model = _model()
    with pytest.raises(ValueError, match=r"^optimizer must be created with capturable=True"):
        GraphedStep(model, torch.optim.Adam(model.parameters(), capturable=False))


def test_a_model_off_cuda_is_refused_whatever_its_device():
    """Not only a CPU model: one on any device but CUDA (here meta) is refused, naming it."""
    with pytest.raises(ValueError, match=r"^model must be on a CUDA device .*got meta$"):
        GraphedStep(_model().to("meta"))


def test_a_model_on_two_devices_names_them_sorted():
    """A parameter on CUDA and a buffer left on the CPU: both devices named, in sorted order."""
    on = [types.SimpleNamespace(device=torch.device(d)) for d in ("cuda:0", "cpu")]
    with pytest.raises(ValueError, match=r"one CUDA device for a CUDA graph, got cpu, cuda:0$"):
        graphs._cuda_device(on)


def test_the_device_check_covers_the_buffers(monkeypatch):
    """A model whose parameters are on the graph's device but a buffer elsewhere is refused
    (meta stands in for the CUDA device: the real check sees it as cuda:0)."""
    real = graphs._cuda_device

    def as_cuda(tensors):
        cuda = torch.device("cuda:0")
        devices = [cuda if t.device.type == "meta" else t.device for t in tensors]
        return real([types.SimpleNamespace(device=device) for device in devices])

    monkeypatch.setattr(graphs, "_cuda_device", as_cuda)
    model = _Scaled()
    model.autoencoder.to("meta")  # the parameters; the buffer stays on the CPU
    with pytest.raises(ValueError, match=r"one CUDA device for a CUDA graph, got cpu, cuda:0$"):
        GraphedStep(model)
    model.to("meta")  # the buffer too: accepted
    assert GraphedStep(model).device == torch.device("cuda:0")


def test_after_the_model_moves_the_warm_ups_run_on_a_stream_of_its_device(
    cpu_graphs,
    monkeypatch,
):
    """A side stream belongs to one device: after ``model.to(another device)`` (here the CPU
    to meta, the Parameter objects kept) the warm-ups run on a stream made for the new one."""
    made = []
    monkeypatch.setattr(
        torch.cuda, "Stream", lambda device=None: made.append(device) or _FakeStream()
    )
    model = _model()
    step = GraphedStep(model, warmup=3)
    step(torch.rand(16, 12))
    assert made == [torch.device("cpu")]
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model.weight is step.params[0]
    step(torch.rand(16, 12, device="meta"))
    assert step.device == torch.device("meta")
    assert made == [torch.device("cpu"), torch.device("meta")]


def test_an_eager_step_beside_the_graph_computes_its_own_batchs_gradients(cpu_graphs):
    """A batch of another shape after the capture leaves in ``.grad`` that batch's gradients,
    not added to the replay's; also after ``zero_grad()`` set them to None."""
    model = _model()
    step = GraphedStep(model, warmup=1)  # no optimizer: the parameters stay
    x = torch.rand(16, 12)
    step(x), step(x)  # a warm-up, the capture (its gradients in .grad)
    assert step.graphed and all(p.grad is not None for p in model.parameters())
    for zeroed in (False, True):
        if zeroed:
            model.zero_grad(set_to_none=True)
        short = torch.rand(5, 12)
        step(short)
        fresh = copy.deepcopy(model)
        fresh.zero_grad(set_to_none=True)
        fresh(short).loss.backward()
        for mine, expected in zip(model.parameters(), fresh.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, expected.grad)


def test_calls_count_warm_ups_and_capture_and_replays_the_graphed_steps(cpu_graphs):
    """``calls``: the warm-ups and the capture at the graphed shape; ``replays``: the steps run
    from the graph (the captured batch's own included); an eager step of another shape counts
    in neither."""
    step = GraphedStep(_model(), warmup=2)
    x = torch.rand(16, 12)
    counts = []
    for batch in (x, x, x, x, torch.rand(5, 12)):
        step(batch)
        counts.append((step.calls, step.replays))
    assert counts == [(1, 0), (2, 0), (3, 1), (3, 2), (3, 2)]
