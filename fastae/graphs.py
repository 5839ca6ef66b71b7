"""Training steps replayed from a CUDA graph: one launch for the whole step.

A step at an MNIST-sized batch runs a few tens of microseconds of GPU work behind a few
hundred microseconds of host time (Python, autograd, about ten launches), so the GPU waits.
Captured once as a CUDA graph, the step's kernels replay from one call, without that host
time.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_

from . import _checks

__all__ = ["GraphedStep"]

# what torch.optim says when a capturable optimizer steps outside a capture
_UNCAPTURED_WARNING = "This instance was constructed with capturable=True"


class GraphedStep:
    """``step(x)``: one training step of ``model`` on the batch ``x`` (zero the gradients,
    ``model(x).loss``, backward, the gradients clipped to a total 2-norm of ``max_grad_norm``
    where one is given, ``optimizer.step()`` when an optimizer is given), from the
    ``warmup + 1``-th call on replayed from a CUDA graph; returns the loss.

    The first ``warmup`` calls run eagerly on a side stream (they autotune and compile the
    kernels and create the optimizer's state); the next captures the step at that batch
    shape and replays it. Warm-up and capture read the batch from the buffer each replay
    copies into, so the capture runs exactly the kernels the warm-up prepared. Batches of
    another shape (an epoch's shorter last batch) run eagerly, with the same parameters,
    gradients and optimizer.

    What a graph cannot hold is refused or fixed at capture:

    - the model (all its parameters) and batches must be on one CUDA device, the model not
      wrapped in DistributedDataParallel; warm-up, capture and replays run on that device
      whatever the current one is;
    - an optimizer with a ``capturable`` option (Adam, AdamW, ...) must have it on, and its
      state must live on that device (a CPU step counter would advance once, at capture);
    - random numbers must come from the GPU's generator, which PyTorch makes graph-safe: a
      replay draws afresh. fastae's noise and the VAE's sampling do so on CUDA (their Philox
      seeds are drawn on the GPU, where the kernels read them). A step that draws on the
      CPU would replay the same draw every time: capture raises instead;
    - the BCE target range is not checked per step (that check is a device sync); check the
      data once beforehand, as ``fastae.fit`` does;
    - learning rates and other optimizer settings are read at capture: later changes to
      ``param_groups`` do not reach the graph, nor do those to the model's Python settings
      that its forward reads (a VAE's ``beta``, a sparsity or contractive weight); a step
      in the other train/eval mode than the capture's runs eagerly (before the capture, a
      change of mode starts the warm-ups again: they and the capture share one mode);
    - parameters, buffers or optimizer state replaced after the capture (``model.to(...)``,
      to another CUDA device too, which the steps then follow, the optimizer's state moved
      with it; ``.double()``, ``optimizer.load_state_dict``) drop the graph: the next calls
      warm up and capture afresh (``model.load_state_dict`` copies into the same memory and
      keeps it; the step keeps the Parameter objects it was built with: build another for a
      model whose conversions make new ones), as does a parameter frozen or thawed
      (``requires_grad``) since: the steps compute, clip and update the parameters that
      require gradients (a frozen one's ``.grad``, one left from before it was frozen too, is
      cleared, so the optimizer does not step it).

    The capture is thread-local (``capture_error_mode="thread_local"``): another thread's
    CUDA calls, such as a ``DataLoader(pin_memory=True)`` pinning the next batches, do not
    break it.

    The returned loss is a tensor the next replay overwrites (``.item()`` it, or clone it to
    keep it); after a graphed step the parameters' ``.grad`` hold that step's gradients
    (also after an ``optimizer.zero_grad()`` in between).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        warmup: int = 3,
        max_grad_norm: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, DistributedDataParallel):
            raise ValueError(
                "model must not be DistributedDataParallel: its gradient all-reduce cannot be "
                "captured in a CUDA graph here; train it eagerly"
            )
        self._all_params = list(model.parameters())
        self._trainable = [p.requires_grad for p in self._all_params]
        self.params = [p for p in self._all_params if p.requires_grad]
        if not self.params:
            raise ValueError("model must have parameters that require gradients")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        if max_grad_norm is not None:
            max_grad_norm = _checks.finite_number(
                "max_grad_norm", max_grad_norm, low=0, open_low=True
            )
        # the device before the optimizer's capturable flag, which matters only on CUDA
        device = _cuda_device([*model.parameters(), *model.buffers()])
        if optimizer is not None:
            _checks.steps_without_closure(optimizer)
            _check_capturable(optimizer)
        self.model, self.optimizer, self.warmup = model, optimizer, int(warmup)
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.calls = 0  # warm-ups and capture done at the graphed shape (replays: below)
        self.replays = 0  # steps run from the graph (the captured batch's own included)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shape: tuple[int, ...] | None = None  # the graphed batch shape
        self._static_input: Tensor | None = None
        self._static_loss: Tensor | None = None
        self._stream: torch.cuda.Stream | None = None
        self._training: bool | None = None  # the model's mode in the warm-ups and capture
        self._static_grads: list[Tensor | None] = []  # the gradients a replay writes
        self._captured_pointers: list[int] = []  # the parameters' and buffers' memory
        self._captured_state: dict | None = None  # the optimizer's state at capture

    @property
    def graphed(self) -> bool:
        """Whether the step has been captured (later calls at its shape replay it)."""
        return self.graph is not None

    def __call__(self, x: Tensor) -> Tensor:
        x = _checks.tensor("x", x, 2)
        if self._all_params[0].device != self.device:  # model.to(another device): follow it
            self.device = _cuda_device([*self.model.parameters(), *self.model.buffers()])
            self._stream = None
            self._drop_graph()
            self._check_optimizer_followed()
        if x.device != self.device:
            raise ValueError(f"x must be on the model's device {self.device}, got {x.device}")
        with torch.cuda.device(self.device):
            return self._step(x)

    def _step(self, x: Tensor) -> Tensor:
        self._follow_trainable()
        if self.graph is not None and not self._graph_is_current():
            self._drop_graph()
        if self.shape is not None:
            return self._step_at_shape(x)
        self.shape = tuple(x.shape)
        try:
            return self._step_at_shape(x)
        except BaseException:  # a batch the step failed on sets no shape: the next one does
            self.shape = self._static_input = None
            raise

    def _step_at_shape(self, x: Tensor) -> Tensor:
        mode = self.model.training
        if self.graph is None and mode != self._training:
            self.calls, self._training = 0, mode  # the warm-ups and the capture share a mode
        if tuple(x.shape) != self.shape or x.dtype != self._dtype() or mode != self._training:
            return self._eager_step(x)
        if self.graph is not None:
            self._static_input.copy_(x.detach())
            self.graph.replay()
            self.replays += 1
            for p, grad in zip(self.params, self._static_grads, strict=True):
                p.grad = grad  # what the replay wrote, even after a zero_grad(set_to_none)
            return self._static_loss
        # warm-up and capture read the batch from the buffer replays copy into: the capture
        # launches the kernels the warm-up compiled (their keys include data-pointer
        # alignment, and a compile or autotune cannot run inside a capture)
        if self._static_input is None:
            self._static_input = torch.empty_like(x)
        self._static_input.copy_(x.detach())
        if self.calls < self.warmup:
            loss = self._warmup_step(self._static_input)
            self.calls += 1  # once done: a failed warm-up made no optimizer state to capture
            return loss
        return self._capture(self._static_input)

    def _follow_trainable(self) -> None:
        """Step the parameters that require gradients now: after a layer is frozen or thawed
        (by a callback between epochs, say) the graph is dropped, and the next step clears a
        frozen parameter's gradient (the optimizer skips a parameter whose ``.grad`` is None)."""
        trainable = [p.requires_grad for p in self._all_params]
        if trainable == self._trainable:
            return
        params = [p for p in self._all_params if p.requires_grad]
        if not params:
            raise ValueError("model must have parameters that require gradients")
        self.params, self._trainable = params, trainable
        self._drop_graph()

    def _graph_is_current(self) -> bool:
        """Whether the graph still works on the parameters' and the optimizer's memory:
        ``model.to()``, ``.double()`` or ``optimizer.load_state_dict`` replace it, and a
        replay would write where it no longer is."""
        if self.optimizer is not None and self.optimizer.state is not self._captured_state:
            return False
        return self._memory() == self._captured_pointers

    def _memory(self) -> list[int]:
        """Where the tensors a replay reads live: every parameter (frozen ones too) and
        buffer (a BatchNorm's running statistics)."""
        return [t.data_ptr() for t in (*self._all_params, *self.model.buffers())]

    def _drop_graph(self) -> None:
        """Forget the graph: the next calls warm up and capture afresh."""
        self.graph = self._static_input = self._static_loss = self._training = None
        self.shape, self.calls, self._static_grads = None, 0, []

    def _dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def _zero_grads(self) -> None:
        for p, trainable in zip(self._all_params, self._trainable, strict=True):
            if not trainable:  # a gradient left from before it was frozen: not stepped
                p.grad = None
        if self.graph is None:
            for p in self.params:
                p.grad = None
        else:  # the graph writes its gradients into these tensors: keep them, zeroed
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    def _loss_backward_update(self, x: Tensor) -> Tensor:
        loss = _checks.model_loss(self.model(x))
        loss.backward()
        if self.max_grad_norm is not None:  # no host sync: it captures
            clip_grad_norm_(self.params, self.max_grad_norm)
        if self.optimizer is not None:
            # the warm-up and eager steps of an optimizer made capturable for the capture
            with _checks.ignoring(_UNCAPTURED_WARNING):
                self.optimizer.step()
        return loss.detach()

    def _eager_step(self, x: Tensor) -> Tensor:
        self._zero_grads()
        return self._loss_backward_update(x)

    def _warmup_step(self, x: Tensor) -> Tensor:
        # warm-up on a side stream, as torch.cuda.graphs asks before a capture
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):
                return self._eager_step(x)
        finally:  # a failed step's queued work done before the next batch is copied in
            current.wait_stream(self._stream)

    def _capture(self, static_input: Tensor) -> Tensor:
        self._check_optimizer_state()
        for p in self.params:  # gradients allocated inside the graph's memory: written per replay
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        cpu_rng = torch.get_rng_state()
        checks = _pause_target_checks(self.model)
        try:
            # on the warm-up's stream (the model's device); thread-local, so another thread's
            # CUDA calls (a DataLoader pinning memory) do not invalidate the capture
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                static_loss = self._loss_backward_update(static_input)
        finally:
            for module in checks:
                module.check_targets = True
        if not torch.equal(torch.get_rng_state(), cpu_rng):
            raise RuntimeError(
                "the training step draws random numbers on the CPU, which a CUDA graph would "
                "replay unchanged every step; draw them on the GPU (torch's CUDA generator is "
                "graph-safe) or train this model without a CUDA graph"
            )
        self.graph, self._static_loss = graph, static_loss
        self._static_grads = [p.grad for p in self.params]
        self._captured_pointers = self._memory()
        self._captured_state = None if self.optimizer is None else self.optimizer.state
        graph.replay()  # a capture runs nothing: this is the step of this batch
        self.replays += 1
        self.calls += 1
        return static_loss

    def _check_optimizer_followed(self) -> None:
        """After the model moved: the optimizer's state tensors moved with it (its step would
        mix devices)."""
        states = [] if self.optimizer is None else self.optimizer.state.values()
        for state in states:
            for name, value in state.items():
                if isinstance(value, Tensor) and value.device != self.device:
                    raise ValueError(
                        f"model moved to {self.device}, but optimizer keeps its state {name!r} "
                        f"on {value.device}: move it too "
                        "(optimizer.load_state_dict(optimizer.state_dict()) does)"
                    )

    def _check_optimizer_state(self) -> None:
        """The optimizer's state tensors (made in the warm-up) on the graph's device: one
        elsewhere (non-fused Adagrad's CPU step counter, say) would change once, at capture,
        and every replay would reuse that value."""
        if self.optimizer is None:
            return
        _check_capturable(self.optimizer)  # groups added since construction included
        for state in self.optimizer.state.values():
            for name, value in state.items():
                if isinstance(value, numbers.Number):
                    raise ValueError(
                        f"optimizer keeps its state {name!r} as a Python number, which a CUDA "
                        "graph would update once, at capture: keep it in a tensor on "
                        f"{self.device}"
                    )
                if isinstance(value, Tensor) and value.device != self.device:
                    raise ValueError(
                        f"optimizer keeps its state {name!r} on {value.device}, which a CUDA "
                        f"graph would update once, at capture: use an optimizer whose state is "
                        f"on {self.device} (capturable=True where it has that option)"
                    )


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if group.get("capturable") is False:
            raise ValueError(
                f"optimizer must be created with capturable=True to be captured in a "
                f"CUDA graph ({type(optimizer).__name__}(..., capturable=True))"
            )


def _cuda_device(tensors: list[Tensor]) -> torch.device:
    """The one CUDA device of the model's parameters and buffers."""
    devices = {t.device for t in tensors}
    device = tensors[0].device
    if device.type != "cuda":
        raise ValueError(f"model must be on a CUDA device for a CUDA graph, got {device}")
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise ValueError(f"model must be on one CUDA device for a CUDA graph, got {names}")
    return device


def _pause_target_checks(model: nn.Module) -> list[nn.Module]:
    """Turns off every submodule's per-step BCE target check (a device sync, which a capture
    refuses); returns the modules to turn back on."""
    paused = [m for m in model.modules() if getattr(m, "check_targets", False) is True]
    for module in paused:
        module.check_targets = False
    return paused
