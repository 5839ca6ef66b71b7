"""Benchmark cases shared by ``pytest bench`` and ``python -m fastae bench``.

A case is an op (``encode``, ``encode_stats``, ``corrupt``, ``decode_loss``,
``reparameterize``: forward plus backward into the trainable inputs) or a training step
(``plain``, ``sparse``, ``denoising``, ``contractive``, ``all``, ``vae``, ``deep``: zero the
gradients, forward, loss, backward; the optimizer update is the same for every provider and
left out).
Providers:

- ``eager``: the plain PyTorch of :mod:`fastae.baselines`;
- ``compile``: ``torch.compile`` of that same function (inductor; compile time excluded);
- ``fastae``: :func:`fastae.ops.encode` / ``corrupt`` / ``decode_loss`` and
  :class:`fastae.Autoencoder`, on whatever backend ``auto`` picks (recorded per op);
- ``jacrev``: the contractive step with the brute-force ``torch.func.jacrev`` penalty;
- ``fastae_gemm`` and ``fastae_split``: fastae with both kernels' fusion boundary forced
  (``FASTAE_ENCODER_FUSION`` and ``FASTAE_DECODER_FUSION``); ``fastae_regenerate``
  (denoising cases): the corrupted input regenerated inside the GEMMs, never stored;
  ``fastae_triton_launch``: every kernel launched through Triton's own launch path;
- ``floor``: the case's bare matrix products (``torch.mm`` forward and backward), or a plain
  copy for ``corrupt``;
- ``fastae_graph`` and ``compile_graph`` (CUDA, training steps): fastae's step replayed
  from a CUDA graph (:class:`fastae.GraphedStep`), and ``torch.compile`` with
  ``mode="reduce-overhead"`` (its own CUDA graphs) of the eager step.

Beside time each case records device-independent figures of one step: the ops the dispatcher
ran (a ``TorchDispatchMode`` count, where a fastae custom op counts once) and the bytes saved
for backward (``saved_tensors_hooks``, storages counted once; also the part beyond the inputs
and parameters). On CUDA also the peak allocated memory and the kernels launched
(``torch.profiler``: launches, GPU busy time and the longest kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from . import _checks, backend, baselines, ops
from .backend import use_backend
from .graphs import GraphedStep
from .modules import Autoencoder, DeepAutoencoder, KLSparsity
from .noise import MaskingNoise
from .vae import VAE

OPS = ("encode", "encode_stats", "corrupt", "decode_loss", "reparameterize")
STEPS = ("plain", "sparse", "denoising", "contractive", "all", "vae", "deep")
CASES = OPS + STEPS
# the order of a run: the cases that carry a target first (the fused encoder with its
# statistics, the full step, the denoising step), then the rest, the VAE's and the deep
# autoencoder's steps last
CASE_ORDER = (
    "encode_stats", "all", "denoising", "contractive", "sparse", "plain", "decode_loss",
    "encode", "corrupt", "reparameterize", "vae", "deep",
)  # fmt: skip
PROVIDERS = ("eager", "compile", "fastae")
JACREV = "jacrev"  # extra provider, contractive step only
# ``fastae`` runs with the library's own choices (the measured fusion rules, x~ stored).
# Extra providers (CUDA defaults): fastae with both fusion boundaries forced, the fused GEMMs
# (``fastae_gemm``) or cuBLAS GEMMs plus fused elementwise passes (``fastae_split``), for the
# encoder and decode_loss alike; fastae with the corrupted input regenerated inside the GEMMs
# (denoising cases; memory-free) instead of written once and stored for backward; and the
# floor: the bare matrix products of the case (torch.mm forward and backward), or a plain
# copy for corrupt. ``fastae_triton_launch``: fastae with every kernel launched through
# Triton's own launch path (``FASTAE_DIRECT_LAUNCH=0``), for the host time it costs.
GEMM = "fastae_gemm"
SPLIT = "fastae_split"
REGENERATE = "fastae_regenerate"
TRITON_LAUNCH = "fastae_triton_launch"
FLOOR = "floor"
# CUDA graphs (training steps): fastae's training step captured once and replayed
# (GraphedStep), and torch.compile's own (mode="reduce-overhead") of the eager step
GRAPH = "fastae_graph"
COMPILE_GRAPH = "compile_graph"
GRAPH_PROVIDERS = (GRAPH, COMPILE_GRAPH)
EXTRA_PROVIDERS = (GEMM, SPLIT, REGENERATE, TRITON_LAUNCH, FLOOR, GRAPH, COMPILE_GRAPH, JACREV)


# How the fastae providers launch their kernels: directly, unless the process says otherwise
# (bench/gpu_check.sh sets FASTAE_DIRECT_LAUNCH=0 where the direct path fails its check on
# the GPU: tests/test_launch.py). The JSON records it in each case's ``env``.
_DIRECT_LAUNCH = os.environ.get("FASTAE_DIRECT_LAUNCH", "1")


def _fusions(
    encoder: str, decoder: str, corrupted_input: str, direct_launch: str = _DIRECT_LAUNCH
) -> dict[str, str]:
    return {
        "FASTAE_ENCODER_FUSION": encoder,
        "FASTAE_DECODER_FUSION": decoder,
        "FASTAE_CORRUPTED_INPUT": corrupted_input,
        "FASTAE_DIRECT_LAUNCH": direct_launch,
    }


# fastae variants: provider -> (its column in the ratio table, environment while it runs)
VARIANTS = {
    "fastae": (None, _fusions("auto", "auto", "auto")),
    GEMM: ("gemm", _fusions("gemm", "gemm", "store")),
    SPLIT: ("split", _fusions("split", "split", "store")),
    REGENERATE: ("regen", _fusions("gemm", "auto", "regenerate")),
    TRITON_LAUNCH: ("tlaunch", _fusions("auto", "auto", "auto", direct_launch="0")),
}
# the cases whose kernels have two fusion boundaries
FUSED_CASES = ("encode", "encode_stats", "decode_loss") + STEPS
NOISY_CASES = ("denoising", "all")
ALL_PROVIDERS = PROVIDERS + EXTRA_PROVIDERS

# name -> (dtype, float32 matmul precision used while the case runs)
DTYPES = {
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
}


class Size(NamedTuple):
    batch: int
    inputs: int
    hidden: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.inputs}x{self.hidden}"

    @classmethod
    def parse(cls, text: str, what: str = "size") -> Size:
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"{what} must look like BATCHxINPUTSxHIDDEN (256x784x1024), three positive "
                f"ints, got {text!r}"
            )
        batch, inputs, hidden = map(int, parts)
        if max(batch * inputs, batch * hidden, inputs * hidden) >= 2**63:
            raise ValueError(f"{what} {text!r} makes a tensor of 2**63 elements or more")
        return cls(batch, inputs, hidden)


MNIST = [Size(256, 784, 1024), Size(1024, 784, 1024), Size(4096, 784, 1024)]
LARGE = [Size(8192, 4096, 4096)]
SIZE_SETS = {
    "cpu": [Size(256, 784, 1024)],
    "mnist": MNIST,
    "large": LARGE,
    "full": MNIST + LARGE,
    "lean": [Size(4096, 784, 1024), Size(8192, 4096, 4096)],
    # reparameterize: batch x (unused) x latent k
    "vae": [Size(4096, 784, k) for k in (64, 128, 256, 512, 1024)],
    # corrupt at 256 MB of float32 (the bandwidth check)
    "bandwidth": [Size(8192, 8192, 1)],
    # a batch whose kernels take a few microseconds: the time of a call is its host time
    # (Python, dispatch, launches)
    "host": [Size(64, 784, 1024)],
}
JACREV_SIZE = Size(64, 784, 256)  # the brute-force gap is measured once, small


def parse_sizes(text: str, what: str = "size") -> list[Size]:
    """A preset name (see SIZE_SETS) or comma-separated BxDxH sizes."""
    sizes: list[Size] = []
    for part in text.split(","):
        part = part.strip()
        sizes += SIZE_SETS[part] if part in SIZE_SETS else [Size.parse(part, what)]
    return sizes


def parse_list(text: str, options: Sequence[str], what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"{what} must name at least one of {tuple(options)}, got {text!r}")
    for name in names:
        if name not in options:
            raise ValueError(f"{what} must be among {tuple(options)}, got {name!r}")
    return names


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def listed(kind, what: str, valid):
    """An argparse type: comma-separated values of ``kind`` (``what`` they must be) for which
    ``valid`` holds."""

    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(valid(value) for value in values):
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        return values

    return parse


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str | None, what: str = "device") -> str:
    """``--device``: "cpu" (any CPU index) or a CUDA device as torch spells it; None, the
    default device."""
    if text is None:
        return default_device()
    device = _checks.cpu_or_cuda(what, text, "cpu or cuda[:N]")
    return "cpu" if device.type == "cpu" else str(device)


def default_sizes(device: str) -> str:
    return "cpu" if device == "cpu" else "full"


def default_providers(device: str) -> str:
    """eager, compile, fastae; on CUDA also both fusion boundaries forced, the regenerated
    corrupted input and the matrix-product floor."""
    extra = (GEMM, SPLIT, REGENERATE, FLOOR) if device.startswith("cuda") else ()
    return ",".join(PROVIDERS + extra)


def default_dtypes(device: str) -> str:
    return "fp32" if device == "cpu" else "tf32,bf16"


# ----------------------------------------------------------------------------- availability


def unavailable(provider: str, device: str, case: str | None = None) -> str | None:
    """Why ``provider`` cannot run ``case`` on ``device``, or None when it can."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available"
    if provider == JACREV and case not in (None, "contractive"):
        return "the jacrev provider only computes the contractive step"
    if provider == FLOOR and case == "reparameterize":
        return "no matrix-product floor for reparameterize"
    if provider in (GEMM, SPLIT) and case not in (None,) + FUSED_CASES:
        return "a fusion boundary is the encoder's or decode_loss's"
    if provider == REGENERATE and case not in (None,) + NOISY_CASES:
        return "the regenerated corrupted input needs a denoising case"
    if provider == TRITON_LAUNCH and not device.startswith("cuda"):
        return "Triton's launch path is fastae's on CUDA only"
    if provider in GRAPH_PROVIDERS:
        if not device.startswith("cuda"):
            return "CUDA graphs need a CUDA device"
        if case is not None and case not in STEPS:
            return "a CUDA graph replays a whole training step"
    if provider in ("compile", COMPILE_GRAPH):
        if device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
            return "torch.compile on the CPU needs a C++ compiler"
        if device.startswith("cuda"):
            from torch.utils._triton import has_triton

            if not has_triton():
                return "torch.compile on CUDA needs Triton"
    return None


# ----------------------------------------------------------------------------- compile probe

_PROBES: list[TorchDispatchMode] = []


def _inductor_with_probe(gm, example_inputs):
    """Inductor, plus: while a probe mode is pushed, the compiled code runs inside it.

    Dynamo does not trace frames entered under a dispatch mode, so the op counter cannot wrap
    a compiled call from outside; here it wraps the compiled runtime from inside instead.
    """
    compiled = torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    def run(*args):
        if not _PROBES:
            return compiled(*args)
        with _PROBES[-1]:
            return compiled(*args)

    if getattr(compiled, "_boxed_call", False):
        run._boxed_call = True
    return run


def compile_function(fn: Callable, mode: str | None = None) -> Callable:
    """``torch.compile`` of an eager baseline as a user would (inductor, static shapes);
    with a ``mode`` (``"reduce-overhead"``: CUDA graphs) plain inductor, without the op probe."""
    torch._dynamo.reset()  # no cache entries of earlier sizes or dtypes, no recompile limit
    if mode is not None:
        return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
    return torch.compile(fn, backend=_inductor_with_probe, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------- cases


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


_STEP_MODELS = {
    "plain": {},
    "sparse": {"sparsity": KLSparsity(baselines.RHO, baselines.SPARSITY_WEIGHT)},
    "denoising": {"noise": MaskingNoise(baselines.MASK_P)},
    "contractive": {"contractive": baselines.CONTRACTIVE},
    "all": {
        "noise": MaskingNoise(baselines.MASK_P),
        "sparsity": KLSparsity(baselines.RHO, baselines.SPARSITY_WEIGHT),
        "contractive": baselines.CONTRACTIVE,
    },
}
_EAGER_STEPS = {
    "plain": baselines.plain_step,
    "sparse": baselines.sparse_step,
    "denoising": baselines.denoising_step,
    "contractive": baselines.contractive_step,
    "all": baselines.all_step,
    "vae": baselines.vae_step,
    "deep": baselines.deep_step,
}


@dataclass
class Bench:
    """One runnable case: ``run()`` is one timed call (synchronized on CUDA)."""

    case: str
    provider: str
    size: Size
    dtype: str
    device: torch.device
    forward: Callable[[], tuple[Tensor, ...]]
    params: list[Tensor]  # leaves whose gradients the call computes (reset before each call)
    inputs: list[Tensor]  # inputs and parameters: not counted as saved "beyond inputs"
    grads: Callable[[tuple[Tensor, ...]], list[Tensor] | None] = lambda outs: None
    env: dict[str, str] | None = None  # environment while a call runs (forward and backward)

    @property
    def kind(self) -> str:
        return "op" if self.case in OPS else "step"

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        outs = self.forward()
        if self.params:
            torch.autograd.backward(outs, self.grads(outs))

    @contextlib.contextmanager
    def settings(self):
        """The case's matmul precision and environment (forward and backward run inside)."""
        with matmul_precision(DTYPES[self.dtype][1]), _environment(self.env or {}):
            yield

    def timed(self) -> None:
        """One call, its device work finished: what the timed rounds run, inside
        :meth:`settings` entered once (entering it costs about 10 us, a tenth of a host-bound
        step)."""
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self) -> None:
        with self.settings():
            self.timed()

    def info(self) -> dict[str, Any]:
        """What a result records about the case (JSON-ready)."""
        return {
            "case": self.case,
            "kind": self.kind,
            "provider": self.provider,
            "size": str(self.size),
            "batch": self.size.batch,
            "inputs": self.size.inputs,
            "hidden": self.size.hidden,
            "dtype": self.dtype,
            "matmul_precision": DTYPES[self.dtype][1] if self.dtype != "bf16" else "n/a",
            "device": self.device.type,
            "device_name": device_name(self.device),
            "torch": torch.__version__,
            "env": dict(self.env or {}),
        }


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def build(
    case: str, provider: str, size: Size, dtype: str = "fp32", device: str = "cpu", seed: int = 0,
    draws_seed: int | None = None,
) -> Bench:  # fmt: skip
    """The case ready to run: inputs made, compiled function (not yet compiled) in place.
    fastae's noise and the VAE's eps are drawn from a fresh Philox seed each call, or from
    ``draws_seed`` every call (for :func:`agreement`: the same draws on either backend)."""
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"provider must be one of {ALL_PROVIDERS}, got {provider!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    why = unavailable(provider, device, case)
    if why:
        raise RuntimeError(f"provider {provider!r} cannot run here: {why}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    # fit() checks the data lies in [0, 1] once; the timed step does not sync to re-check it
    if case == "vae":
        model = VAE(size.inputs, size.hidden, baselines.VAE_LATENT, check_targets=False)
    elif case == "deep":
        sizes = baselines.deep_sizes(size.hidden)
        model = DeepAutoencoder(size.inputs, sizes, tied=False, check_targets=False)
    else:
        config = dict(_STEP_MODELS.get(case, {}))
        if "noise" in config and draws_seed is not None:
            config["noise"] = MaskingNoise(baselines.MASK_P, seed=draws_seed)
        model = Autoencoder(size.inputs, size.hidden, check_targets=False, **config)
    with torch.no_grad():  # nonzero biases: a kernel that drops or misplaces one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    model = model.to(device=dev, dtype=DTYPES[dtype][0])
    params = list(model.parameters())  # tied Autoencoder: W, b, c; VAE: four layers' W, b
    W, b, c = params[0], params[1], params[-1]
    x = torch.rand(size.batch, size.inputs, device=dev, dtype=W.dtype)
    env = VARIANTS.get(provider, VARIANTS["fastae"])[1]
    common = {
        "case": case, "provider": provider, "size": size, "dtype": dtype, "device": dev, "env": env
    }  # fmt: skip
    if provider in VARIANTS:
        provider = "fastae"

    upstream: list[Tensor] = []

    def fixed_grads(outs: tuple[Tensor, ...]) -> list[Tensor]:
        # the same random upstream gradients every call (made at the first)
        if not upstream:
            gen = torch.Generator(device=dev).manual_seed(seed + 1)
            for out in outs:
                upstream.append(
                    torch.randn(out.shape, generator=gen, device=dev, dtype=out.dtype)
                    if case != "decode_loss"
                    else torch.full_like(out, 1.0 / size.batch)
                )
        return upstream

    if provider == FLOOR:
        return _floor(case, x, params, fixed_grads, common)

    if case == "reparameterize":
        k = size.hidden
        gen = torch.Generator(device=dev).manual_seed(seed + 2)
        posterior = 0.5 * torch.randn(size.batch, 2 * k, generator=gen, device=dev, dtype=W.dtype)
        mu = posterior[:, :k].contiguous().requires_grad_()
        logvar = posterior[:, k:].contiguous().requires_grad_()
        if provider == "fastae":
            forward = lambda: ops.reparameterize(mu, logvar, draws_seed)  # noqa: E731
        else:
            fn = baselines.reparameterize
            fn = compile_function(fn) if provider == "compile" else fn
            forward = lambda: tuple(fn(mu, logvar))  # noqa: E731
        return Bench(
            forward=forward, params=[mu, logvar], inputs=[mu, logvar], grads=fixed_grads, **common
        )

    if case in STEPS:
        inputs = [x, *params]
        eager_step = _EAGER_STEPS[case]
        if provider == GRAPH:
            step = GraphedStep(model)
            with matmul_precision(DTYPES[dtype][1]), _environment(env):
                for _ in range(step.warmup + 1):  # warm up and capture: later calls replay
                    step(x)
            forward = lambda: (step(x),)  # noqa: E731
            return Bench(forward=forward, params=[], inputs=inputs, **common)
        if provider == COMPILE_GRAPH:
            fn = compile_function(eager_step, mode="reduce-overhead")

            def forward():
                torch.compiler.cudagraph_mark_step_begin()
                return (fn(x, *params),)

            return Bench(forward=forward, params=params, inputs=inputs, **common)
        if provider == "fastae" and case == "vae":
            forward = lambda: (model(x, seed=draws_seed).loss,)  # noqa: E731
        elif provider == "fastae":
            forward = lambda: (model(x).loss,)  # noqa: E731
        else:
            fn = baselines.contractive_jacrev_step if provider == JACREV else eager_step
            fn = compile_function(fn) if provider == "compile" else fn
            forward = lambda: (fn(x, *params),)  # noqa: E731
        return Bench(forward=forward, params=params, inputs=inputs, **common)

    if case == "corrupt":
        if provider == "fastae":
            spec = MaskingNoise(baselines.MASK_P, seed=draws_seed)
            forward = lambda: (ops.corrupt(x, spec),)  # noqa: E731
        else:
            fn = compile_function(baselines.corrupt) if provider == "compile" else baselines.corrupt
            forward = lambda: (fn(x),)  # noqa: E731
        return Bench(forward=forward, params=[], inputs=[x], **common)

    if case == "decode_loss":
        h = torch.sigmoid(torch.nn.functional.linear(x, W, b)).detach().requires_grad_(True)
        if provider == "fastae":
            # the targets are in [0, 1] by construction: no range check (a pass over x and a
            # device sync a call), which eager's BCE does not make either, as in the steps
            forward = lambda: (ops.decode_loss(h, W.t(), c, target=x, check_target=False),)  # noqa: E731
        else:
            fn = baselines.decode_loss
            fn = compile_function(fn) if provider == "compile" else fn
            forward = lambda: (fn(h, W, c, x),)  # noqa: E731
        return Bench(
            forward=forward, params=[h, W, c], inputs=[x, h, W, c], grads=fixed_grads, **common
        )

    with_stats = case == "encode_stats"
    if provider == "fastae":

        def forward():
            out = ops.encode(x, W, b, statistics=with_stats)
            return out if with_stats else out[:1]

    else:
        fn = baselines.encode_with_statistics if with_stats else baselines.encode
        fn = compile_function(fn) if provider == "compile" else fn

        def forward():
            out = fn(x, W, b)
            return tuple(out) if with_stats else (out,)

    return Bench(forward=forward, params=[W, b], inputs=[x, W, b], grads=fixed_grads, **common)


def _floor(case: str, x: Tensor, params: list[Tensor], grads, common: dict) -> Bench:
    """The bare matrix products of a case, forward and backward through torch.mm: encode
    x W^T and dW = G^T x; decode h W and dh, dW; a tied step both (five products); the VAE
    step its four layers' (eleven: no dx), the deep step its six (seventeen); corrupt a copy
    of x (read once, written once)."""
    W = params[0]
    if case == "corrupt":
        return Bench(forward=lambda: (x.clone(),), params=[], inputs=[x], **common)
    if case == "decode_loss":
        h = torch.rand(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
        h.requires_grad_()
        forward = lambda: (h @ W,)  # noqa: E731
        return Bench(forward=forward, params=[h, W], inputs=[x, h, W], grads=grads, **common)
    if case == "deep":  # the encoder's weights, then the decoder's from the code outward
        depth = len(params) // 4
        chain = params[:depth] + params[2 * depth : 3 * depth][::-1]

        def forward():
            z = x
            for weight in chain:
                z = z @ weight.t()
            return (z,)

        return Bench(forward=forward, params=chain, inputs=[x, *chain], grads=grads, **common)
    if case == "vae":
        weights = params[::2]  # W, Wq, W2, V
        latent = weights[2].shape[1]

        def forward():
            posterior = x @ weights[0].t() @ weights[1].t()
            return (posterior[:, :latent] @ weights[2].t() @ weights[3].t(),)

        return Bench(forward=forward, params=weights, inputs=[x, *weights], grads=grads, **common)
    tied_step = case in STEPS

    def forward():
        z = x @ W.t()
        return (z @ W,) if tied_step else (z,)

    return Bench(forward=forward, params=[W], inputs=[x, W], grads=grads, **common)


# ----------------------------------------------------------------------------- figures


class OpCounter(TorchDispatchMode):
    """Counts every op the dispatcher runs (a custom op counts once, not what it runs) and
    notes the ``backend_name`` each fastae op was called with."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.backends: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if func.namespace == "fastae":
            for i, argument in enumerate(func._schema.arguments):
                if argument.name == "backend_name" and i < len(args):
                    self.backends[name.removeprefix("fastae.")] = str(args[i])
        return func(*args, **(kwargs or {}))


def count_ops(bench: Bench) -> OpCounter:
    """Ops dispatched by one call of ``bench`` (forward and backward)."""
    counter = OpCounter()
    if bench.provider == COMPILE_GRAPH:
        return counter  # CUDA-graph trees under a dispatch mode would run another code path
    with bench.settings():
        for p in bench.params:
            p.grad = None
        if bench.provider == "compile":
            # compiled code: the probe pushes the counter inside the compiled runtime
            _PROBES.append(counter)
            try:
                outs = bench.forward()
            finally:
                _PROBES.pop()
        else:
            with counter:
                outs = bench.forward()
        if bench.params:
            grads = bench.grads(outs)
            with counter:
                torch.autograd.backward(outs, grads)
    return counter


def saved_bytes(bench: Bench) -> dict[str, int]:
    """Bytes saved for backward by one forward, each storage once; and those beyond inputs."""
    inputs = {t.untyped_storage().data_ptr() for t in bench.inputs}
    storages: dict[int, int] = {}
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with bench.settings():
        for p in bench.params:
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = bench.forward()
        if bench.params:
            torch.autograd.backward(outs, bench.grads(outs))
    beyond = sum(n for ptr, n in storages.items() if ptr not in inputs)
    return {
        "saved_tensors": count,
        "saved_bytes": sum(storages.values()),
        "saved_bytes_beyond_inputs": beyond,
    }


PROFILED_CALLS = 3  # calls under torch.profiler for the kernel figures (averaged per call)
KERNELS_KEPT = 8  # kernels listed per case, the longest first


def kernel_table(events, calls: int) -> dict[str, Any]:
    """Per call, from the profiler events of ``calls`` calls: kernels launched, their summed
    durations (against the wall time they show launch-bound steps) and the longest kernels as
    [name, launches, microseconds]; copies and memsets (a graph replay's input copy, the
    corrupt case's floor) apart: how many, and their summed durations."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}
    copies, copy_us = 0, 0.0
    for event in events:
        if event.device_type != DeviceType.CUDA:
            continue
        if event.name.startswith(("Memcpy", "Memset")):
            copies += 1
            copy_us += event.time_range.elapsed_us()
            continue
        entry = totals.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    by_time = sorted(totals.items(), key=lambda item: -item[1][1])
    return {
        "kernel_launches": round(sum(n for n, _ in totals.values()) / calls),
        "kernel_time_us": sum(us for _, us in totals.values()) / calls,
        "kernels": [[name, n / calls, us / calls] for name, (n, us) in by_time[:KERNELS_KEPT]],
        "copies": round(copies / calls),
        "copy_time_us": copy_us / calls,
    }


def cuda_figures(bench: Bench) -> dict[str, Any]:
    """Peak allocated memory of one call and, from torch.profiler over a few calls, the
    kernels a call launches and where its GPU time goes (CUDA only)."""
    if bench.device.type != "cuda":
        return {}
    out: dict[str, Any] = {}
    torch.cuda.synchronize(bench.device)
    torch.cuda.reset_peak_memory_stats(bench.device)
    before = torch.cuda.memory_allocated(bench.device)
    bench.run()
    peak = torch.cuda.max_memory_allocated(bench.device)
    out["peak_allocated_bytes"] = peak
    out["peak_allocated_beyond_start_bytes"] = peak - before
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILED_CALLS):
                bench.run()
            torch.cuda.synchronize(bench.device)
        out.update(kernel_table(prof.events(), PROFILED_CALLS))
        if not out["kernels"]:  # no device activity recorded: count the launch calls
            launches = [
                e
                for e in prof.events()
                if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
            ]
            out["kernel_launches"] = round(len(launches) / PROFILED_CALLS)
            out["kernel_time_us"] = None
    except Exception as error:  # the profiler is optional: keep the other figures
        out["kernel_launches"] = None
        out["kernel_launches_error"] = f"{type(error).__name__}: {error}"
    return out


# the Philox seed of the noise and eps in agreement()'s two calls
AGREEMENT_SEED = 2024
# A call's outputs and gradients are beyond rounding at the dtype (the figures mark them "!")
# where one differs from the float64 reference (relative, Frobenius norms) by more than twice
# what the reference backend's own call at that dtype does and more than this floor (the
# kernels round other intermediates than the reference: at 64x100->64 in bfloat16 the
# interpreted kernels' gradients differ by 8e-3 where the reference's do by 2.6e-3).
AGREEMENT_FLOOR = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 2e-2}
# records made before that test (a reference at the call's own dtype): these limits
AGREEMENT_LIMITS = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2}


def beyond_rounding(record: dict) -> bool:
    """Whether :func:`agreement`'s figures in ``record`` lie beyond rounding at its dtype."""
    if "beyond_rounding" in record:
        return bool(record["beyond_rounding"])
    limit = AGREEMENT_LIMITS.get(record.get("dtype", ""), 0.0)
    return record.get("rel_diff_vs_reference", 0.0) > limit


def _relative_differences(got: list[Tensor], want: list[Tensor]) -> list[float]:
    """|got - want| / |want| (Frobenius norms) tensor by tensor; NaN counts as inf."""
    out = []
    for a, b in zip(got, want, strict=True):
        scale = b.double().norm().item()
        diff = (a.double() - b.double()).norm().item()
        relative = diff / scale if scale > 0 else diff
        out.append(relative if math.isfinite(relative) else math.inf)
    return out


def _outputs_and_grads(bench: Bench, backend: str | None, upstream=None) -> tuple[list, Any]:
    """One call's outputs and parameter gradients, on ``backend`` (None: as configured), and
    the upstream gradients it took (``upstream``: these, in the call's dtype, instead)."""
    chosen = use_backend(backend) if backend else contextlib.nullcontext()
    with bench.settings(), chosen:
        for p in bench.params:
            p.grad = None
        outs = bench.forward()
        if bench.params:
            grads = bench.grads(outs) if upstream is None else upstream
            if grads is not None:
                grads = [g.to(o.dtype) for g, o in zip(grads, outs, strict=True)]
            torch.autograd.backward(outs, grads)
            upstream = grads
    got = [o.detach() for o in outs] + [p.grad for p in bench.params if p.grad is not None]
    return got, upstream


def agreement(bench: Bench) -> dict[str, Any]:
    """For fastae's providers (its own code paths; a CUDA graph replays them): the numbers
    timed, checked at the timed size and dtype. One call of the provider, one of the reference
    backend (plain torch) at the same dtype and one of the reference in float64 on the same
    values upcast (inputs, parameters, upstream gradients), the noise and eps drawn from one
    Philox seed. ``rel_diff_vs_reference`` is the largest over the outputs and parameter
    gradients of |ours - float64| / |float64| (Frobenius norms), ``reference_rel_diff`` the
    same of the reference at the dtype (rounding: a few 1e-3 in bfloat16, a few 1e-4 in tf32,
    1e-7 in float32, more where a gradient cancels), and ``beyond_rounding`` whether any of
    ours exceeds both twice the reference's own and :data:`AGREEMENT_FLOOR`. A wrong kernel
    shows as order 1; the models' biases are random, so a dropped one shows too."""
    if bench.provider not in VARIANTS:
        return {}
    same = dict(size=bench.size, dtype=bench.dtype, device=str(bench.device))
    ours = build(bench.case, bench.provider, **same, draws_seed=AGREEMENT_SEED)
    theirs = build(bench.case, "fastae", **same, draws_seed=AGREEMENT_SEED)
    ours, upstream = _outputs_and_grads(ours, None)
    at_dtype, _ = _outputs_and_grads(theirs, "reference", upstream)
    with torch.no_grad():  # the same values, in float64
        for t in {id(t): t for t in (*theirs.inputs, *theirs.params)}.values():
            t.data = t.data.to(torch.float64)
    upstream = None if upstream is None else [u.double() for u in upstream]
    want, _ = _outputs_and_grads(theirs, "reference", upstream)
    ours, at_dtype = _relative_differences(ours, want), _relative_differences(at_dtype, want)
    floor = AGREEMENT_FLOOR.get(bench.dtype, 0.0)
    beyond = any(a > max(2 * b, floor) for a, b in zip(ours, at_dtype, strict=True))
    return {
        "rel_diff_vs_reference": max(ours),
        "reference_rel_diff": max(at_dtype),
        "beyond_rounding": beyond,
    }


def figures(bench: Bench) -> dict[str, Any]:
    """The device-independent figures of one call (plus the CUDA ones on CUDA)."""
    counter = count_ops(bench)
    counts = counter.counts
    out: dict[str, Any] = {
        "aten_ops": sum(counts.values()),
        "fastae_ops": sum(n for name, n in counts.items() if name.startswith("fastae.")),
        "ops_by_name": dict(sorted(counts.items())),
        "fastae_backends": dict(sorted(counter.backends.items())),
    }
    replays = bench.provider in (GRAPH, COMPILE_GRAPH)
    if replays:
        # a replayed CUDA graph dispatches no ops (only its input copy) and keeps what its
        # capture kept: neither count says anything about the step
        out.update(aten_ops=None, fastae_ops=None, ops_by_name={})
    if bench.provider == JACREV or replays:
        # torch.func transforms refuse to run under saved_tensors_hooks; CUDA-graph trees
        # would record another graph
        out.update(saved_tensors=None, saved_bytes=None, saved_bytes_beyond_inputs=None)
    else:
        out.update(saved_bytes(bench))
    out.update(cuda_figures(bench))
    out.update(agreement(bench))
    return out


# ----------------------------------------------------------------------------- timing


def rounds_for(seconds_per_call: float, device: str, budget_s: float | None = None) -> int:
    """Timed rounds that fit a per-case budget: a few on the CPU, more on CUDA."""
    if budget_s is None:
        budget_s = 0.5 if device == "cpu" else 0.3
    low, high = (3, 30) if device == "cpu" else (10, 200)
    return int(min(high, max(low, budget_s / max(seconds_per_call, 1e-6))))


def warm_up(bench: Bench, calls: int | None = None) -> float:
    """Run ``calls`` times (default: twice, as fastae's first call autotunes and compile's
    compiles; four times for ``compile_graph``, whose CUDA-graph trees record at the third);
    the seconds of the last call, which sizes the timed rounds."""
    seconds = math.inf
    for _ in range(calls or (4 if bench.provider == COMPILE_GRAPH else 2)):
        start = time.perf_counter()
        bench.run()
        seconds = time.perf_counter() - start
    return seconds


def host_us_per_step(bench: Bench, calls: int) -> float:
    """Mean microseconds of ``calls`` back-to-back ``bench.step()`` calls, unsynchronized:
    the host time where no device work waits (CPU tensors, stubbed or stand-in launches).
    At the case's matmul precision (the fusion rules read it); the environment is the
    caller's, so a script can switch launch paths and fusion boundaries between calls."""
    with matmul_precision(DTYPES[bench.dtype][1]):
        start = time.perf_counter()
        for _ in range(calls):
            bench.step()
        return (time.perf_counter() - start) / calls * 1e6


def cache_flush(device: torch.device | str) -> Callable[[], None] | None:
    """On CUDA, a call that evicts the GPU's L2 cache (writes a buffer twice its size) and
    waits for it: run before each timed round, outside the timing, so that no provider's
    inputs and weights are timed from the cache a previous round left them in (at 4096 x 784
    -> 1024 in bf16 a step's working set fits an H100's 50 MB); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    size = 2 * max(torch.cuda.get_device_properties(device).L2_cache_size, 2**24)
    buffer = torch.empty(size, dtype=torch.uint8, device=device)

    def flush() -> None:
        buffer.zero_()
        torch.cuda.synchronize(device)

    return flush


def time_calls(bench: Bench, rounds: int, flush: Callable[[], None] | None = None) -> list[float]:
    """``rounds`` timed calls (each after ``flush``, untimed, where given)."""
    times = []
    with bench.settings():
        for _ in range(rounds):
            if flush is not None:
                flush()
            start = time.perf_counter()
            bench.timed()
            times.append(time.perf_counter() - start)
    return times


LAUNCH_PROBE_CALLS = 200  # trivial kernels a launch probe times, in a row


def launch_probe(device: torch.device | str) -> float | None:
    """Microseconds per launch of a trivial kernel (an in-place add on one element, the
    median of five runs of :data:`LAUNCH_PROBE_CALLS` calls, each run synchronized): the
    host's cost per launch, taken before the first profile and again after the last. The
    profiler's CUDA tracing (CUPTI) may stay attached after a profile ends and slow every
    launch after it (unless ``TEARDOWN_CUPTI=1`` detaches it): a gap between the two shows
    it. None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    one = torch.zeros(1, device=device)
    runs = []
    for _ in range(6):  # the first run warms up, untimed
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(LAUNCH_PROBE_CALLS):
            one.add_(1.0)
        torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - start) / LAUNCH_PROBE_CALLS * 1e6)
    return statistics.median(runs[1:])


def stats_of(times: list[float]) -> dict[str, float]:
    return {
        "min": min(times),
        "max": max(times),
        "mean": statistics.fmean(times),
        "median": statistics.median(times),
        "stddev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "rounds": len(times),
    }


# ----------------------------------------------------------------------------- results


def records_from_json(data: dict) -> list[dict[str, Any]]:
    """Flat records (info + figures + ``median_s`` ...) from a pytest-benchmark style JSON."""
    records = []
    for entry in data.get("benchmarks", []):
        info = dict(entry.get("extra_info") or {})
        if "case" not in info:
            continue
        stats = entry.get("stats") or {}
        for key in ("median", "mean", "min", "stddev"):
            if key in stats:
                info[f"{key}_s"] = stats[key]
        info["rounds"] = stats.get("rounds")
        records.append(info)
    return records


def _key(record: dict) -> tuple:
    case, dtype = record.get("case"), record.get("dtype")
    return (
        record.get("device_name", ""),
        CASES.index(case) if case in CASES else len(CASES),
        record.get("inputs", 0),
        record.get("hidden", 0),
        record.get("batch", 0),
        list(DTYPES).index(dtype) if dtype in DTYPES else len(DTYPES),
    )


def group_rows(records: Iterable[dict]) -> list[dict[str, Any]]:
    """One row per (card, case, size, dtype) with each provider's record. A provider twice
    (two runs' records of one case on one card) keeps the later record, with a warning: the
    row's ratios then compare different runs."""
    rows: dict[tuple, dict[str, Any]] = {}
    for record in records:
        ident = tuple(record.get(k) for k in ("device_name", "case", "size", "dtype"))
        row = rows.setdefault(ident, {"first": record, "providers": {}})
        if record["provider"] in row["providers"]:
            warnings.warn(
                f"two records of provider {record['provider']!r} for {ident}: the later is "
                "kept, so that row compares different runs",
                UserWarning,
                stacklevel=2,
            )
        row["providers"][record["provider"]] = record
    return sorted(rows.values(), key=lambda row: _key(row["first"]))


def _ms(record: dict | None) -> str:
    if record is None or record.get("median_s") is None:
        return "-"
    return f"{record['median_s'] * 1e3:.3f}"


def speedup(row: dict, other: str) -> float | None:
    """``other``'s median time over fastae's (above 1: fastae is faster)."""
    return _over(row["providers"].get(other), row["providers"].get("fastae"))


def _over(slow: dict | None, fast: dict | None) -> float | None:
    """``slow``'s median time over ``fast``'s, where both have one."""
    if not slow or not fast or slow.get("median_s") is None or not fast.get("median_s"):
        return None
    return slow["median_s"] / fast["median_s"]


def _ratio(value: float | None, *records: dict | None) -> str:
    """``value`` as a ratio, marked ``*`` where ``records`` (those it divides) come from
    different runs (their ``source``, the JSON file each was read from)."""
    if value is None:
        return "-"
    return f"{value:.3g}x" + ("*" if _across_runs(*records) else "")


def _across_runs(*records: dict | None) -> bool:
    return len({record.get("source") for record in records if record}) > 1


def _vs(row: dict, other: str) -> str:
    """``other``'s time over fastae's in ``row``, as a ratio (:func:`_ratio`)."""
    providers = row["providers"]
    return _ratio(speedup(row, other), providers.get(other), providers.get("fastae"))


ACROSS_RUNS_NOTE = "*: the two times come from different runs (JSON files), not side by side"


def ratio_table(records: Iterable[dict], markdown: bool = False, compact: bool = False) -> str:
    """Median ms per provider and fastae's speedup vs eager and vs compile, per case; then,
    unless ``compact``, the other providers timed (jacrev, fastae's variants, the floor and
    the CUDA graphs)."""
    rows = group_rows(records)

    def timed(provider: str) -> bool:
        return not compact and any(provider in row["providers"] for row in rows)

    with_jacrev = timed(JACREV)
    variants = [p for p in (GEMM, SPLIT, REGENERATE, TRITON_LAUNCH) if timed(p)]
    with_floor = timed(FLOOR)
    with_graphs = timed(GRAPH)
    header = ["case", "size", "dtype", "precision", "eager ms", "compile ms", "fastae ms"]
    header += ["vs eager", "vs compile"] + (["jacrev ms", "vs jacrev"] if with_jacrev else [])
    # gemm / split: both fusion boundaries forced; regen: x~ regenerated in the GEMMs, not
    # stored; tlaunch: Triton's own launch path; floor: bare matrix products (or a copy)
    for variant in variants:
        name = VARIANTS[variant][0]
        header += [f"{name} ms", f"{name}/fastae"]
    header += ["floor ms", "fastae/floor"] if with_floor else []
    # graph: fastae's step replayed from a CUDA graph; cgraph: torch.compile's CUDA graphs
    header += ["graph ms", "eager/graph", "cgraph ms", "cgraph/graph"] if with_graphs else []
    lines = []
    for row in rows:
        first, prov = row["first"], row["providers"]
        cells = [first["case"], first.get("size", ""), first.get("dtype", "")]
        cells.append(first.get("matmul_precision", ""))
        cells += [_ms(prov.get(p)) for p in PROVIDERS]
        cells += [_vs(row, "eager"), _vs(row, "compile")]
        if with_jacrev:
            cells += [_ms(prov.get(JACREV)), _vs(row, JACREV)]
        for variant in variants:
            cells += [_ms(prov.get(variant)), _vs(row, variant)]
        if with_floor:
            floor = speedup(row, FLOOR)
            over_floor = _ratio(1 / floor if floor else None, prov.get(FLOOR), prov.get("fastae"))
            cells += [_ms(prov.get(FLOOR)), over_floor]
        if with_graphs:
            graph, eager, compiled = prov.get(GRAPH), prov.get("eager"), prov.get(COMPILE_GRAPH)
            cells += [_ms(graph), _ratio(_over(eager, graph), eager, graph)]
            cells += [_ms(compiled), _ratio(_over(compiled, graph), compiled, graph)]
        lines.append(cells)
    table = _format(header, lines, markdown)
    if any(cell.endswith("x*") for cells in lines for cell in cells):
        table += "\n\n" + ACROSS_RUNS_NOTE
    return table


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.3g}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def figures_table(records: Iterable[dict], markdown: bool = False) -> str:
    """Ops dispatched and saved MiB (beyond inputs) per provider; CUDA peak MiB and kernels if any;
    fastae's providers' relative difference from the reference backend (:func:`agreement`),
    marked "!" beyond rounding (:func:`beyond_rounding`)."""
    rows = group_rows(records)
    providers = [p for p in ALL_PROVIDERS if any(p in r["providers"] for r in rows)]
    checked = [
        p for p in providers
        if any("rel_diff_vs_reference" in r["providers"].get(p, {}) for r in rows)
    ]  # fmt: skip
    on_cuda = any(r["first"].get("device") == "cuda" for r in rows)
    header = ["case", "size", "dtype"]
    header += [f"ops {p}" for p in providers] + [f"saved MiB {p}" for p in providers]
    if on_cuda:
        header += [f"peak MiB {p}" for p in providers] + [f"kernels {p}" for p in providers]
    header += [f"vs ref {p}" for p in checked]
    lines = []
    for row in rows:
        first, prov = row["first"], row["providers"]
        cells = [first["case"], first.get("size", ""), first.get("dtype", "")]
        cells += [_count(prov[p].get("aten_ops")) if p in prov else "-" for p in providers]
        cells += [
            _mb(prov[p].get("saved_bytes_beyond_inputs")) if p in prov else "-" for p in providers
        ]
        if on_cuda:
            cells += [
                _mb(prov[p].get("peak_allocated_beyond_start_bytes")) if p in prov else "-"
                for p in providers
            ]
            cells += [
                str(prov[p].get("kernel_launches", "-")) if p in prov else "-" for p in providers
            ]
        for p in checked:
            record = prov.get(p, {})
            diff = record.get("rel_diff_vs_reference")
            mark = " !" if diff is not None and beyond_rounding(record) else ""
            cells.append("-" if diff is None else f"{diff:.1e}{mark}")
        lines.append(cells)
    return _format(header, lines, markdown)


def agreement_line(records: Iterable[dict]) -> str:
    """One line on the numbers timed (:func:`agreement`): how many calls were checked, the
    largest relative difference from the reference and where, how many lie beyond rounding."""
    records = [r for r in records if r.get("rel_diff_vs_reference") is not None]
    # records made before the float64 check (no reference_rel_diff) compared fastae with the
    # reference backend at their own dtype
    checked = [r for r in records if r.get("reference_rel_diff") is not None]
    older = [r for r in records if r.get("reference_rel_diff") is None]
    if not records:
        return "numbers checked against the float64 reference: none"
    parts = [_agreement_part("the float64 reference", checked)] if checked else []
    if older:
        parts.append(_agreement_part("the reference backend at their dtype", older))
    return "; ".join(parts)


def _agreement_part(against: str, records: list[dict]) -> str:
    worst = max(records, key=lambda r: r["rel_diff_vs_reference"])
    beyond = [r for r in records if beyond_rounding(r)]
    where = " ".join(str(worst.get(k, "")) for k in ("case", "size", "dtype", "provider"))
    return (
        f"numbers checked against {against}: {len(records)} call{'s' * (len(records) != 1)}, "
        f"largest relative difference {worst['rel_diff_vs_reference']:.1e} ({where}), "
        f"{len(beyond)} beyond rounding at their dtype"
    )


def _kernel_name(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def kernel_time_table(records: Iterable[dict], markdown: bool = False, top: int = 4) -> str:
    """Per case and provider (CUDA records with a profile): median wall ms, the GPU's busy ms
    per call (sum of kernel and copy durations), busy / wall, kernel launches, copies, and the
    longest kernels."""
    header = ["case", "size", "dtype", "provider", "wall ms", "GPU ms", "busy", "launches"]
    header.append("copies")
    header.append("longest kernels (us per call, launches)")
    lines = []
    for row in group_rows(records):
        first = row["first"]
        for provider in ALL_PROVIDERS:
            record = row["providers"].get(provider)
            if not record or record.get("kernel_time_us") is None:
                continue
            busy_ms = (record["kernel_time_us"] + (record.get("copy_time_us") or 0.0)) / 1e3
            wall = record.get("median_s")
            kernels = "; ".join(
                f"{_kernel_name(name)} {us:.1f} (x{n:g})"
                for name, n, us in (record.get("kernels") or [])[:top]
            )
            cells = [first["case"], first.get("size", ""), first.get("dtype", ""), provider]
            cells += [_ms(record), f"{busy_ms:.3f}"]
            cells.append(f"{busy_ms / (wall * 1e3):.0%}" if wall else "-")
            cells += [str(record.get("kernel_launches", "-")), str(record.get("copies", "-"))]
            cells.append(kernels)
            lines.append(cells)
    return _format(header, lines, markdown)


def _format(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in
              enumerate(header)]  # fmt: skip
    keys = ("case", "size", "dtype", "precision")
    fmt = "  ".join(
        f"{{:<{w}}}" if h in keys else f"{{:>{w}}}" for h, w in zip(header, widths, strict=True)
    )
    return "\n".join([fmt.format(*header)] + [fmt.format(*cells) for cells in lines])


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def backends_line(records: Iterable[dict]) -> str:
    """Which backends fastae's ops ran on in ``records``: on the CPU the reference's PyTorch
    ops, so its times there are no measure of the kernels."""
    backends = sorted(
        {
            backend
            for record in records
            if str(record.get("provider", "")).startswith("fastae")
            for backend in (record.get("fastae_backends") or {}).values()
        }
    )
    line = f"fastae's ops ran on: {', '.join(backends) or '-'}"
    if backends == ["reference"]:
        line += " (its PyTorch code; the Triton kernels run on CUDA devices)"
    return line


# what the ratio table's columns hold, printed under it
RATIO_LEGEND = (
    "ms: the median over the rounds of one call; vs eager, vs compile: their ms over fastae's "
    "(above 1: fastae is faster); precision: torch's float32 matmul precision (highest: IEEE "
    "float32, high: tf32)"
)


def _busy_host() -> str | None:
    """A warning where the host's load (the last minute's average) exceeds the cores this
    process may run on: other processes then share them, and CPU timings swing with them."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], usable_cores()
    if load <= cores:
        return None
    return (
        f"warning: the host was busy (load average {load:.1f} on {cores} cores): the timings "
        "swing with the other processes; rerun on an idle machine to compare them"
    )


def run_conditions(device: torch.device | str, launch_us_before: float | None) -> dict[str, Any]:
    """What a run's timings depend on beyond the cases, for the JSON's machine_info: torch's
    threads and the host's load averages (1, 5, 15 minutes; on a shared CPU the timings swing
    with them), and on CUDA :func:`launch_probe` before the first profile and now."""
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        out["load_average"] = [round(load, 2) for load in os.getloadavg()]
    if launch_us_before is not None:
        out["launch_us_before_profiling"] = launch_us_before
        out["launch_us_at_end"] = launch_probe(device)
    return out


def to_json(records: list[dict[str, Any]], conditions: dict[str, Any] | None = None) -> dict:
    """Records in the pytest-benchmark JSON layout (``benchmarks`` with stats and extra_info);
    ``conditions`` (:func:`run_conditions`) join its machine_info."""
    benchmarks = []
    for record in records:
        info = {k: v for k, v in record.items() if not k.endswith("_s") and k != "rounds"}
        stats = {k[:-2]: v for k, v in record.items() if k.endswith("_s")}
        stats["rounds"] = record.get("rounds")
        name = f"{record['case']}[{record['provider']}-{record['size']}-{record['dtype']}]"
        group = f"{record['case']} {record['size']} {record['dtype']}"
        benchmarks.append(
            {"name": name, "group": group, "extra_info": info, "stats": stats, "params": None}
        )
    return {
        "machine_info": {
            "python_version": platform.python_version(),
            "torch": torch.__version__,
            **(conditions or {}),
        },
        "benchmarks": benchmarks,
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "version": "fastae.benchmark",
    }


# ----------------------------------------------------------------------------- CLI


def measure(
    case: str,
    providers: Sequence[str],
    size: Size,
    dtype: str,
    device: str,
    rounds: int | None = None,
) -> list[dict[str, Any]]:
    """Build, warm up (compile), time and count one case for each provider: flat records.
    The timed calls alternate between the providers, one call each per round, so a busy or
    throttled machine slows them alike and their ratios hold; on CUDA each starts with the L2
    cache evicted (:func:`cache_flush`, untimed)."""
    if not providers:
        return []
    benches = [build(case, provider, size, dtype, device) for provider in providers]
    seconds = [warm_up(bench) for bench in benches]
    if rounds is None:
        rounds = min(rounds_for(s, benches[0].device.type) for s in seconds)
    flush = cache_flush(benches[0].device)
    times: list[list[float]] = [[] for _ in benches]
    for _ in range(rounds):
        for bench, calls in zip(benches, times, strict=True):
            calls.extend(time_calls(bench, 1, flush))
    records = []
    for bench, calls in zip(benches, times, strict=True):
        # the figures after the timed calls: the profiler's tracing may slow the calls after it
        record = bench.info()
        record.update(figures(bench))
        record.update({f"{k}_s": v for k, v in stats_of(calls).items() if k != "rounds"})
        record["rounds"] = len(calls)
        records.append(record)
    if any(provider in ("compile", COMPILE_GRAPH) for provider in providers):
        torch._dynamo.reset()
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fastae bench``."""
    parser.add_argument(
        "--cases",
        default=",".join(STEPS),
        help=f"comma-separated among {', '.join(CASES)} (default: the training steps)",
    )
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help=f"comma-separated among {', '.join(ALL_PROVIDERS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="fp32, tf32 (fp32 with matmul precision 'high') or bf16, comma-separated "
        "(default: fp32 on the CPU, tf32 on CUDA)",
    )
    parser.add_argument(
        "--size",
        default=None,
        help="BATCHxINPUTSxHIDDEN, comma-separated, or a preset among "
        f"{', '.join(SIZE_SETS)} (default: 256x784x1024 on the CPU, 4096x784x1024 on CUDA)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed calls per case (default: as many as fit half a second on the CPU, 3 to 30, "
        "or 0.3 s on CUDA, 10 to 200)",
    )
    parser.add_argument(
        "--figures",
        action="store_true",
        help="also print the figures per case (ops dispatched, MiB saved for backward; on CUDA "
        "peak memory, launches and where the GPU time goes)",
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")


def check_writable_file(option: str, path: str) -> None:
    """ValueError unless ``path`` names a file that can be written (checked before the run:
    one that cannot would lose the results at its end)."""
    where = os.path.dirname(path) or "."
    if not path or os.path.isdir(path):
        raise ValueError(f"{option} must name a file, got {path!r}")
    if not os.path.isdir(where):
        raise ValueError(f"{option} {path!r}: its folder {where!r} does not exist")
    # open(path, "w") needs a file that exists to be writable, else its folder
    if not os.access(path if os.path.exists(path) else where, os.W_OK):
        raise ValueError(f"{option} {path!r} is not writable")


def _runnable(cases: list[str], providers: list[str], device: str):
    """The providers that can run each case on ``device``, and (case, provider, why) for
    those that cannot."""
    runnable, skipped = {}, []
    for case in cases:
        runnable[case] = []
        for provider in providers:
            why = unavailable(provider, device, case)
            if why is None:
                runnable[case].append(provider)
            else:
                skipped.append((case, provider, why))
    return runnable, skipped


def _check_backend(device: torch.device) -> None:
    """The backend requested (``FASTAE_BACKEND``, ``set_backend``) can run fastae's ops on
    ``device``: a ValueError up front, not a traceback from the first case."""
    if backend.get_backend() == "triton":  # get_backend names a FASTAE_BACKEND it refuses
        can_run, why = backend._triton_can_run(device)
        if not can_run:
            raise ValueError(f"the backend requested is 'triton', but {why}")


def _out_of_memory(error: RuntimeError) -> bool:
    """CUDA's allocator raises torch.OutOfMemoryError, the CPU's a RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def run(args: argparse.Namespace) -> int:
    """``python -m fastae bench``: run the cases, print the table; the exit status."""
    try:
        device = parse_device(args.device, "--device")
        on_cpu = device == "cpu"
        cases = parse_list(args.cases, CASES, "--cases")
        providers = parse_list(args.providers, ALL_PROVIDERS, "--providers")
        dtype_text = args.dtype if args.dtype is not None else ("fp32" if on_cpu else "tf32")
        dtypes = parse_list(dtype_text, DTYPES, "--dtype")
        size_text = (
            args.size if args.size is not None else ("256x784x1024" if on_cpu else "4096x784x1024")
        )
        sizes = parse_sizes(size_text, "--size")
        if args.rounds is not None and args.rounds < 1:
            raise ValueError(f"--rounds must be a positive int, got {args.rounds}")
        if args.json is not None:
            check_writable_file("--json", args.json)
        if "deep" in cases:
            for size in sizes:
                try:
                    baselines.deep_sizes(size.hidden)
                except ValueError as error:
                    raise ValueError(f"--size {size} for --cases deep: {error}") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}, but CUDA is not available")
        runnable, skipped = _runnable(cases, providers, device)
        if any(p.startswith("fastae") for chosen in runnable.values() for p in chosen):
            _check_backend(torch.device(device))
        if not any(runnable.values()):
            cases_of: dict[tuple[str, str], list[str]] = {}
            for case, provider, why in skipped:
                cases_of.setdefault((provider, why), []).append(case)
            reasons = "; ".join(
                f"{provider} ({', '.join(names)}): {why}"
                for (provider, why), names in cases_of.items()
            )
            raise ValueError(f"nothing to run on {device}: {reasons}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"fastae bench on {device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    for case, provider, why in skipped:
        if provider != JACREV:  # asked for every case by default, it computes one
            print(f"skip {case} {provider}: {why}", file=sys.stderr)
    records, failure = [], None
    busy = _busy_host()  # before the run's own threads add to the load
    launch_us_before = launch_probe(device)
    for size, dtype, case in itertools.product(sizes, dtypes, cases):
        try:
            measured = measure(case, runnable[case], size, dtype, device, args.rounds)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not _out_of_memory(error):
                raise
            failure = (
                f"--size {size} does not fit in the memory of {device} ({case}, {dtype}): "
                f"{str(error).splitlines()[0]}"
            )
            break  # what was measured is still reported
        for record in measured:
            print(
                f"  {case:<12} {record['provider']:<8} {size} {dtype}: "
                f"{record['median_s'] * 1e3:.3f} ms",
                file=sys.stderr,
            )
            records.append(record)
    if records:
        print(ratio_table(records))
        print(RATIO_LEGEND)
        print(backends_line(records))
        if busy:
            print(busy, file=sys.stderr)
        if args.figures:
            print()
            print(figures_table(records))
            if any(record.get("kernels") for record in records):
                print()
                print(kernel_time_table(records))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(records, run_conditions(device, launch_us_before)), f, indent=1)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 2
    return 0
