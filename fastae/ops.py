"""Differentiable ops registered with ``torch.library`` (namespace ``fastae``).

Each public function checks its arguments, resolves the backend (see :mod:`fastae.backend`)
and calls a custom op whose backward is analytic and is itself a custom op, so
``torch.compile(fullgraph=True)`` traces through and ``torch.library.opcheck`` passes.
Second derivatives (double backward: gradient penalties, Hessian-vector products) are exact
too: each backward op has an autograd formula of its own, in plain torch ops on either
backend (decode_loss's stops at the second order; the others go on). Plain eager calls run
the same implementation and formulas through an ``autograd.Function`` instead, skipping the
dispatcher's host time (:func:`_with_eager_route`). Under torch.func transforms and
forward-mode AD the ops run their reference math as plain torch ops.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import _checks, backend, reference
from .noise import Noise, check_noise, check_seed

__all__ = ["encode", "corrupt", "decode_loss", "reparameterize", "bernoulli_kl"]


# kernel name -> its module, or None when the kernel file does not exist (filled on first use)
_kernel_modules: dict[str, object] = {}


def _kernel_module(name: str):
    """``fastae.kernels.<name>`` when Triton and that kernel file exist, else None. Imported
    only once the triton backend is chosen; any other import error propagates."""
    if name in _kernel_modules:
        return _kernel_modules[name]
    if not backend.triton_available():
        return None
    module = f"fastae.kernels.{name}"
    try:
        _kernel_modules[name] = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        _kernel_modules[name] = None
    return _kernel_modules[name]


def _backend_for(op: str, kernel: str, device: torch.device) -> str:
    """The backend for ``op`` on ``device``; a constant to torch.compile (read at trace time)."""
    chosen = backend.resolve(op, device)
    if chosen == "triton" and _kernel_module(kernel) is None:
        chosen = backend.resolve(op, device, supported=False)
    return chosen


CORRUPTED_INPUT_MODES = ("auto", "regenerate", "store")


def corrupted_input_mode() -> str:
    """What ``encode(x, W, b, noise=spec)`` does with x~, from ``FASTAE_CORRUPTED_INPUT``:
    ``store`` (``auto``, the default) runs one corrupt pass and keeps x~ for backward's dW
    product (one more (B, d) tensor, as eager PyTorch keeps); ``regenerate`` corrupts x as the
    encoder GEMM loads it and regenerates it from the seed in backward, so x~ is never
    written. Both give the same values.

    Why ``store``: regenerating draws every element's noise once per column tile of each GEMM
    (H / BLOCK_N times) instead of once. Each draw is one Philox call per element (the stream
    of ``tl.rand``), about 65 instructions for a mask and 180 for a Gaussian (sm_90 code), so
    the fused GEMM loop turns from tensor-core bound to integer bound (bf16 128x128x64 tile:
    96 instructions per K step without noise, about 2,100 with a mask). On the CPU, the
    reference backend's second Philox pass in backward costs more than keeping x~.
    """
    choice = os.environ.get("FASTAE_CORRUPTED_INPUT", "auto")
    if choice not in CORRUPTED_INPUT_MODES:
        raise ValueError(
            f"FASTAE_CORRUPTED_INPUT must be one of {CORRUPTED_INPUT_MODES}, got {choice!r}"
        )
    return "store" if choice == "auto" else choice


# What torch.compiler.assume_constant_result sets, without importing torch._dynamo here:
# read at trace time, the choices are constants of a compiled graph (as
# _checks.autocast_available)
_backend_for._dynamo_marked_constant = True
corrupted_input_mode._dynamo_marked_constant = True


def _triton_requested() -> bool:
    """Whether the triton backend is asked for by name (a constant to torch.compile)."""
    return backend.get_backend() == "triton"


_triton_requested._dynamo_marked_constant = True


def _impl(backend_name: str, kernel: str):
    return _kernel_module(kernel) if backend_name == "triton" else reference


def _fresh(out: Tensor, x: Tensor) -> Tensor:
    """Custom ops return new contiguous tensors (as their fake implementations promise)."""
    return out.clone(memory_format=torch.contiguous_format) if out is x else out.contiguous()


def _plain_eager(args: tuple) -> bool:
    """Whether nothing but autograd can see a call with ``args``: not compiling or exporting,
    no torch.func transform, no dispatch or function mode, no tensor subclass. Such calls
    skip the dispatcher (see :func:`_with_eager_route`)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch.overrides.has_torch_function(args)
    )


def _with_eager_route(op, body, setup_context, backward, plain_math):
    """Registers ``backward`` as ``op``'s autograd formula and returns a caller of ``op`` with a
    direct route for plain eager calls: ``body`` (the op's implementation) itself when no
    gradient is recorded, else a ``torch.autograd.Function`` made of the same ``body``,
    ``setup_context`` and ``backward``. Both routes run the same code. The dispatcher's
    Python hops of a ``custom_op`` with an autograd formula cost host time that a GPU step of
    a few tens of microseconds cannot hide: with the kernels stubbed out, a training step with
    all three regularizers at 8 x 16 -> 16 took 1.6 times as long through the dispatcher as by
    this route with the ops composed (449 against 283 us on a 2-core CPU, ``python
    bench/host_time.py --routes``).
    Traced or intercepted calls (torch.compile, dispatch modes, opcheck, tensor subclasses) go
    through the registered op. Under torch.func transforms and forward-mode AD the call runs
    ``plain_math`` instead: the reference math of ``body``'s outputs in plain torch ops, which
    functorch differentiates (in either mode, to any order) and vmaps. (The op's autograd
    formula cannot serve there: torch wraps it in an ``autograd.Function`` that functorch
    refuses, and its kernels cannot take functorch's wrapped tensors.)"""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    name = body.__name__.removeprefix("_").removesuffix("_body")
    # a class built with its name, so its grad_fn reads "<op>_eagerBackward"
    eager_route = type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def call(*args):
        if _under_torch_func(args):
            if _triton_requested():
                raise RuntimeError(
                    f"backend 'triton' was requested for {name}, but under torch.func "
                    "transforms and forward-mode AD the ops run the reference math; use the "
                    "'auto' or 'reference' backend there"
                )
            return plain_math(*args)
        if not _plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return eager_route.apply(*args)
        return body(*args)

    return call


def _under_torch_func(args: tuple) -> bool:
    """Whether a call runs inside a torch.func transform (grad, vjp, jacrev, jacfwd, jvp, vmap,
    hessian) or one of its tensors carries a forward-mode tangent (torch.autograd.forward_ad).
    """
    if torch._C._are_functorch_transforms_active():  # also where compile traces a transform
        return True
    if torch.compiler.is_compiling():
        return False
    if forward_ad._current_level < 0:
        return False  # no dual level entered: no tensor carries a tangent
    return any(
        isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args
    )


def _backward_call(op, body, *args):
    """A backward op inside a first-order backward formula: ``body`` directly when its own
    gradient is not recorded (no ``create_graph``) and the call is plain eager; else through
    the dispatcher, which records the op's double-backward formula."""
    if torch.is_grad_enabled() or not _plain_eager(args):
        return op(*args)
    return body(*args)


def _autocast(device: torch.device, **tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Inside ``torch.autocast`` for this device, cast float16/bfloat16/float32 inputs to the
    autocast dtype (as autocast does for matmul ops); float64 and everything else stay, and a
    float64 input beside a cast one is refused naming both dtypes as passed."""
    if not (_checks.autocast_available(device.type) and torch.is_autocast_enabled(device.type)):
        return tuple(tensors.values())
    dtype = torch.get_autocast_dtype(device.type)
    low = (torch.float16, torch.bfloat16, torch.float32)
    (first_name, first), *others = tensors.items()
    for name, value in others:
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and first.is_floating_point()
            and (value.dtype in low) != (first.dtype in low)
        ):
            raise TypeError(
                f"{name} must have the dtype of {first_name} ({first.dtype}), got {value.dtype} "
                f"(under torch.autocast, float16, bfloat16 and float32 mix: they are cast to "
                f"{dtype})"
            )
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype in low else t for t in tensors.values()
    )


# encode's seed argument without noise (never read as a seed, never written): one tensor
# for every call instead of a new one (about 10 us of host time each)
_NO_NOISE_SEED = torch.tensor(0, dtype=torch.int64, device="cpu")  # whatever the default device


_CPU = torch.device("cpu")


def _seed_tensor(seed: int | None, backend_name: str, device: torch.device) -> Tensor:
    """A Philox seed as an int64 scalar tensor: ``seed``, or for None a fresh draw from torch's
    generator (a tensor, so torch.compile traces the draw instead of baking in a constant).
    For the triton backend on CUDA it lives on the GPU, where the kernels read it: a CUDA graph
    that captured its draw then draws afresh at each replay (torch's CUDA generator is
    graph-safe), where a launch argument would repeat. Elsewhere it is a CPU scalar."""
    if backend_name != "triton" or device.type != "cuda":
        device = _CPU
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    if device.type == "cpu":
        return torch.tensor(seed, dtype=torch.int64, device=device)
    return torch.full((), seed, dtype=torch.int64, device=device)


def _backend_for_grads(backend_name: str, *grads: Tensor | None) -> str:
    """The backend of a backward call: the reference for gradients batched by autograd's own
    vmap (``is_grads_batched``, ``autograd.functional.jacobian(vectorize=True)``), which have
    no storage the kernels could read; its math runs on them as torch ops."""
    batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)  # torch-private
    if backend_name != "triton" or batched is None:
        return backend_name
    return "reference" if any(g is not None and batched(g) for g in grads) else backend_name


def _seed_for(seed: Tensor, backend_name: str) -> Tensor | int:
    """The seed as an implementation takes it: the tensor for the kernels (which read it in
    device memory), the integer for the reference."""
    return seed if backend_name == "triton" else int(seed)


def _stat_empty(like: Tensor, *shape: int) -> Tensor:
    return like.new_empty(shape, dtype=reference.stat_dtype(like.dtype))


def _second_order(forward, primals, cotangents, grads_of_first_order):
    """Double backward through the reference: the first-order gradients are the
    vector-Jacobian product J(primals)^T cotangents of ``forward`` (the reference forward,
    plain torch); this returns the gradients of <grads_of_first_order, J^T cotangents> with
    respect to (cotangents, primals), by ``torch.func.vjp`` of that product. Every step is a
    torch op, so higher orders work as well. A None among ``grads_of_first_order`` is zero."""

    def first_order(cotangents, primals):
        return torch.func.vjp(forward, *primals)[1](cotangents)

    first, pullback = torch.func.vjp(first_order, cotangents, primals)
    return pullback(_zero_if_none(grads_of_first_order, first))


def _zero_if_none(grads, like):
    """Gradients of ``like`` with None (an unused output) as zeros."""
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True))


# ----------------------------------------------------------------------------- corrupt


def _corrupt_body(
    x: Tensor, kind: str, level: float, low: float, high: float, seed: Tensor, backend_name: str
) -> Tensor:
    impl = _impl(backend_name, "noise")
    return _fresh(impl.corrupt(x, kind, level, low, high, _seed_for(seed, backend_name)), x)


_corrupt_op = torch.library.custom_op("fastae::corrupt", mutates_args=())(_corrupt_body)


@_corrupt_op.register_fake
def _(x, kind, level, low, high, seed, backend_name):
    return x.new_empty(x.shape)


def _corrupt_backward_body(
    grad: Tensor, kind: str, level: float, seed: Tensor, backend_name: str
) -> Tensor:
    backend_name = _backend_for_grads(backend_name, grad)
    impl = _impl(backend_name, "noise")
    return _fresh(impl.corrupt_input_grad(grad, kind, level, _seed_for(seed, backend_name)), grad)


_corrupt_backward_op = torch.library.custom_op("fastae::corrupt_backward", mutates_args=())(
    _corrupt_backward_body
)


@_corrupt_backward_op.register_fake
def _(grad, kind, level, seed, backend_name):
    return grad.new_empty(grad.shape)


def _corrupt_setup(ctx, inputs, output):
    _, ctx.kind, ctx.level, _, _, ctx.seed, ctx.backend_name = inputs
    ctx.set_materialize_grads(False)


def _corrupt_bwd(ctx, grad):
    if grad is None:
        return (None,) * 7
    dx = _backward_call(
        _corrupt_backward_op, _corrupt_backward_body,
        grad.contiguous(), ctx.kind, ctx.level, ctx.seed, ctx.backend_name,
    )  # fmt: skip
    return dx, None, None, None, None, None, None


def _seed_value(seed: Tensor) -> int:
    """The Philox seed of a call under torch.func as an int."""
    try:
        return int(seed)
    except RuntimeError as error:  # a seed drawn under vmap(randomness="different")
        raise RuntimeError(
            "under torch.func.vmap(randomness='different') every sample would need its own "
            "Philox seed, which the ops cannot take: use randomness='same' (one seed for all), "
            "or give the noise spec or reparameterize an explicit seed"
        ) from error


def _corrupt_math(x, kind, level, low, high, seed, backend_name):
    return reference.corrupt(x, kind, level, low, high, _seed_value(seed))


_corrupt = _with_eager_route(
    _corrupt_op, _corrupt_body, _corrupt_setup, _corrupt_bwd, _corrupt_math
)


def _corrupt_backward_setup(ctx, inputs, output):
    _, ctx.kind, ctx.level, ctx.seed, ctx.backend_name = inputs


def _corrupt_backward_bwd(ctx, grad):
    # the backward is linear in its gradient (the same mask): its own adjoint
    dgrad = _corrupt_backward_op(grad.contiguous(), ctx.kind, ctx.level, ctx.seed, ctx.backend_name)
    return dgrad, None, None, None, None


_corrupt_backward_op.register_autograd(_corrupt_backward_bwd, setup_context=_corrupt_backward_setup)


def _check_input(x: object) -> Tensor:
    x = _checks.tensor("x", x, 2)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have at least one row and one column, got {tuple(x.shape)}")
    return x


# Box-Muller with u1 clamped at 1e-7 (tl.randn, philox.box_muller): |eps| <= sqrt(-2 ln 1e-7)
_LARGEST_NORMAL_DRAW = math.sqrt(-2.0 * math.log(np.float32(1.0e-7)))


def _overflow(dtype: torch.dtype) -> float:
    """The magnitude from which rounding to nearest in ``dtype`` gives inf: half an ulp above
    the largest value (largest = (2 - eps) 2^e, its ulp eps 2^e)."""
    info = torch.finfo(dtype)
    return info.max + info.eps * info.max / (2 - info.eps) / 2


_OVERFLOW = {dtype: _overflow(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32)}


def _noise_params(noise: Noise, x: Tensor) -> tuple[str, float, float, float]:
    """``noise.params()``, with the values it puts into x~ checked to fit x's dtype: a
    salt-and-pepper fill, a Gaussian draw (sigma eps, computed in float32) and a rescaled
    mask's factor 1 / (1 - p) must not round to inf (the parameters are finite in float32)."""
    kind, level, low, high = noise.params()
    # float32 and float64 inputs: the noise is computed in float32
    bound = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    overflow = _OVERFLOW[bound]
    if kind == "salt_pepper" and bound != torch.float32:
        for name, value in (("low", low), ("high", high)):
            # the kernels and the reference fill in float32 first: compare that rounding
            if abs(float(np.float32(value))) >= overflow:
                raise ValueError(
                    f"noise's {name}={value!r} is beyond {_range(bound, x)}: x would be filled "
                    "with inf"
                )
    elif kind == "gaussian" and float(np.float32(level)) * _LARGEST_NORMAL_DRAW >= overflow:
        raise ValueError(
            f"noise's sigma={level!r} times the largest normal draw "
            f"({_LARGEST_NORMAL_DRAW:.4g}) is beyond {_range(bound, x)}: x~ could hold inf"
        )
    elif kind == "masking_rescale" and 1.0 / (1.0 - float(np.float32(level))) >= overflow:
        raise ValueError(
            f"noise's p={level!r} rescales the kept entries by 1 / (1 - p) = "
            f"{1.0 / (1.0 - float(np.float32(level))):.6g}, beyond {_range(bound, x)}: x~ "
            "could hold inf"
        )
    return kind, level, low, high


def _range(dtype: torch.dtype, x: Tensor) -> str:
    """``dtype``'s range, for a message; saying where x's dtype came from autocast."""
    cast = _checks.autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    where = " (x's under torch.autocast)" if cast and dtype == x.dtype else ""
    return f"{dtype}'s range{where} (largest magnitude {torch.finfo(dtype).max:.6g})"


def corrupt(x: Tensor, noise: Noise) -> Tensor:
    """Corrupted copy of ``x`` (B, d). ``noise.seed=None`` draws a seed from torch's generator.

    The gradient with respect to ``x`` regenerates the mask from the seed.
    """
    x = _check_input(x)
    noise = check_noise(noise, optional=False)
    kind, level, low, high = _noise_params(noise, x)
    name = _backend_for("corrupt", "noise", x.device)
    return _corrupt(x, kind, level, low, high, _seed_tensor(noise.seed, name, x.device), name)


# ----------------------------------------------------------------------------- encode


def _encode_body(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    noise_kind: str,
    level: float,
    low: float,
    high: float,
    seed: Tensor,
    backend_name: str,
    statistics: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend_name, "encoder")
    seed = _seed_for(seed, backend_name)
    out = impl.encode_forward(
        x, weight, bias, activation, noise_kind, level, low, high, seed, statistics
    )
    return tuple(_fresh(t, x) for t in out)


_encode_op = torch.library.custom_op("fastae::encode", mutates_args=())(_encode_body)


@_encode_op.register_fake
def _(x, weight, bias, activation, noise_kind, level, low, high, seed, backend_name, statistics):
    hidden = weight.shape[0]
    h = x.new_empty((x.shape[0], hidden))
    if not statistics:
        return h, _stat_empty(x, 0), _stat_empty(x, 0), _stat_empty(x, 2, 0)
    return h, _stat_empty(x, hidden), _stat_empty(x), _stat_empty(x, 2, hidden)


def _encode_backward_body(
    grad_h: Tensor,
    grad_rho: Tensor | None,
    grad_jac: Tensor | None,
    x: Tensor,
    weight: Tensor,
    h: Tensor,
    stats: Tensor,
    activation: str,
    noise_kind: str,
    level: float,
    low: float,
    high: float,
    seed: Tensor,
    backend_name: str,
    needs_input_grad: bool,
) -> list[Tensor]:
    backend_name = _backend_for_grads(backend_name, grad_h, grad_rho, grad_jac)
    impl = _impl(backend_name, "encoder")
    seed = _seed_for(seed, backend_name)
    dw, db, dx = impl.encode_backward(
        grad_h, grad_rho, grad_jac, x, weight, h, stats, activation, noise_kind, level, low,
        high, seed, needs_input_grad,
    )  # fmt: skip
    return [dw, db] if dx is None else [dw, db, dx]


_encode_backward_op = torch.library.custom_op("fastae::encode_backward", mutates_args=())(
    _encode_backward_body
)


@_encode_backward_op.register_fake
def _(grad_h, grad_rho, grad_jac, x, weight, h, stats, *args):
    needs_input_grad = args[-1]
    out = [weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])]
    return out + [x.new_empty(x.shape)] if needs_input_grad else out


def _encode_setup(ctx, inputs, output):
    x, weight, bias, *params, ctx.statistics = inputs
    h, _, _, stats = output
    ctx.params = params  # activation, noise_kind, level, low, high, seed, backend_name
    # h, W and x are alive anyway; stats = [c; ||W_j||^2] are two H-vectors; never z or x~
    ctx.save_for_backward(x, weight, h, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs


def _encode_bwd(ctx, grad_h, grad_rho, grad_jac, _grad_stats):
    x, weight, h, stats = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    no_grads = (None,) * (4 + len(ctx.params))  # the inputs: x, W, b, params, statistics
    if not ctx.statistics:  # rho_hat and jac were empty placeholders
        grad_rho = grad_jac = None
    if grad_h is None and grad_rho is None and grad_jac is None:
        return no_grads
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    # a None grad_rho or grad_jac stays None: the backward skips its terms (no zero-fill)
    grads = _backward_call(
        _encode_backward_op, _encode_backward_body,
        grad_h.contiguous(), grad_rho, grad_jac, x, weight, h, stats, *ctx.params, needs_x,
    )  # fmt: skip
    dx = grads[2] if needs_x else None
    db = grads[1] if ctx.needs_input_grad[2] else None
    return (dx, grads[0], db) + no_grads[3:]


def _encode_math(
    x, weight, bias, activation, noise_kind, level, low, high, seed, backend_name, statistics
):  # fmt: skip
    return reference.encode_forward(
        x, weight, bias, activation, noise_kind, level, low, high, _seed_value(seed), statistics
    )


_encode = _with_eager_route(_encode_op, _encode_body, _encode_setup, _encode_bwd, _encode_math)


def _encode_backward_setup(ctx, inputs, output):
    grad_h, grad_rho, grad_jac, x, weight, h, _, *params, _ = inputs
    ctx.params = params[:-1]  # activation, noise_kind, level, low, high, seed
    ctx.save_for_backward(grad_h, grad_rho, grad_jac, x, weight, h)


def _encode_backward_bwd(ctx, grads):
    """Double backward of encode: the vector-Jacobian product of the reference backward as a
    function of (g_h, g_rho, g_jac, x, W, h), with stats = [sum_i a'(z)^2; ||W_j||^2]
    recomputed from h and W (a'(z) is a function of h). h's share reaches x, W and b through
    encode's own backward; plain torch ops throughout, so higher orders work too."""
    activation, noise_kind, level, low, high, seed = ctx.params
    # x~ regenerated from the seed as the forward made it, and dx~/dx (0 where replaced)
    x = ctx.saved_tensors[3]
    input_slope = reference.corrupt_input_grad(torch.ones_like(x), noise_kind, level, int(seed))

    def first_order(grad_h, grad_rho, grad_jac, x, weight, h):
        acc = reference.stat_dtype(h.dtype)
        c = reference.slope(h.to(acc), activation).square().sum(0)
        stats = torch.stack([c, weight.to(acc).square().sum(1)])
        x_tilde = reference.corrupt(x, noise_kind, level, low, high, int(seed))
        grad_w, grad_b, grad_x_tilde = reference.encode_backward(
            grad_h, grad_rho, grad_jac, x_tilde, weight, h, stats, activation, "none", 0.0,
            0.0, 1.0, 0, True,
        )  # fmt: skip
        return grad_w, grad_b, grad_x_tilde * input_slope

    grad_w, grad_b, grad_x = (list(grads) + [None])[:3]
    grad_h, grad_rho, grad_jac, x, weight, h = ctx.saved_tensors
    acc = reference.stat_dtype(h.dtype)
    zero_rho, zero_jac = grad_rho is None, grad_jac is None  # unused outputs: zero gradients
    grad_rho = h.new_zeros(h.shape[1], dtype=acc) if zero_rho else grad_rho
    grad_jac = h.new_zeros((), dtype=acc) if zero_jac else grad_jac
    first, pullback = torch.func.vjp(first_order, grad_h, grad_rho, grad_jac, x, weight, h)
    d_grad_h, d_grad_rho, d_grad_jac, d_x, d_w, d_h = pullback(
        _zero_if_none((grad_w, grad_b, grad_x), first)
    )
    d_grad_rho = None if zero_rho else d_grad_rho
    d_grad_jac = None if zero_jac else d_grad_jac
    return (d_grad_h, d_grad_rho, d_grad_jac, d_x, d_w, d_h) + (None,) * (len(ctx.params) + 3)


_encode_backward_op.register_autograd(_encode_backward_bwd, setup_context=_encode_backward_setup)


def _check_layer(
    inputs: Tensor, weight: object, bias: object, inputs_name: str = "x"
) -> tuple[Tensor, Tensor | None]:
    """weight (n, k) and bias (n,) or None of a layer applied to ``inputs`` (B, k)."""
    weight = _checks.tensor("weight", weight, 2)
    _checks.same_kind("weight", weight, inputs_name, inputs)
    _checks.size("weight", weight, 1, inputs.shape[1], f"{inputs_name} has that many features")
    if bias is not None:
        bias = _checks.tensor("bias", bias, 1)
        _checks.same_kind("bias", bias, inputs_name, inputs)
        _checks.size("bias", bias, 0, weight.shape[0], "weight has that many rows")
    return weight, bias


def encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str = "sigmoid",
    noise: Noise | None = None,
    statistics: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One encoder layer with its regularization statistics.

    Args:
        x: (B, d) input. weight: (H, d) (``nn.Linear`` layout). bias: (H,) or None.
        activation: "sigmoid", "tanh", "relu" or "softplus".
        noise: optional corruption applied to x first; ``encode(x, W, b, noise=spec)`` equals
            ``encode(corrupt(x, spec), W, b)`` for the same seed; with
            ``FASTAE_CORRUPTED_INPUT=regenerate`` x~ is never stored (see
            :func:`corrupted_input_mode`).
        statistics: False computes h only (rho_hat and jac come back None): no statistics in
            the GEMM's epilogue and no finishing launch, for a model without a sparsity or
            contractive penalty.

    Returns:
        h (B, H) = a(x~ W^T + b); rho_hat (H,) = mean_i h_i (float32 at least);
        jac () = (1/B) sum_i ||J_enc(x~_i)||_F^2 = (1/B) sum_ij a'(z_ij)^2 ||W_j||^2, the
        Jacobian of h with respect to the input it is computed from (x~ with noise: not the
        clean-input Jacobian of Rifai et al.'s CAE, which has no corruption).
    """
    h, rho_hat, jac, _ = _encode(*_encode_args(x, weight, bias, activation, noise, statistics))
    return (h, rho_hat, jac) if statistics else (h, None, None)


def _encode_args(x, weight, bias, activation, noise, statistics) -> tuple:
    """encode's checks and, where x~ is stored, its corruption pass: the arguments of
    ``_encode`` (x~ then stands in for x, and the noise is "none")."""
    statistics = _checks.flag("statistics", statistics)
    x = _check_input(x)
    x, weight, bias = _autocast(x.device, x=x, weight=weight, bias=bias)
    weight, bias = _check_layer(x, weight, bias)
    if weight.shape[0] == 0:
        raise ValueError(
            f"weight must have at least one row (one hidden unit), got shape {tuple(weight.shape)}"
        )
    activation = _checks.choice("activation", activation, reference.ACTIVATIONS)
    noise = check_noise(noise)
    if noise is None:
        kind, level, low, high = "none", 0.0, 0.0, 0.0
    else:
        kind, level, low, high = _noise_params(noise, x)
    name = _backend_for("encode", "encoder", x.device)
    seed = _NO_NOISE_SEED
    if kind != "none" and corrupted_input_mode() == "store":
        corrupt_backend = _backend_for("corrupt", "noise", x.device)
        seed = _seed_tensor(noise.seed, corrupt_backend, x.device)
        x = _corrupt(x, kind, level, low, high, seed, corrupt_backend)
        kind, level, low, high = "none", 0.0, 0.0, 0.0
    elif kind != "none":
        seed = _seed_tensor(noise.seed, name, x.device)
    return x, weight, bias, activation, kind, level, low, high, seed, name, statistics


# ----------------------------------------------------------------------------- decode_loss


def _decode_loss_body(
    h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, output: str, loss: str,
    backend_name: str, with_reconstruction: bool, with_gradient: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(per-sample loss, d ell / d z^ or an empty tensor, x^ or an empty tensor)."""
    impl = _impl(backend_name, "decoder")
    out = impl.decode_forward(
        h, weight, bias, target, output, loss, with_reconstruction, with_gradient
    )
    grad_z = out[1] if with_gradient else h.new_empty(0)
    return out[0], grad_z, out[2] if with_reconstruction else h.new_empty(0)


_decode_loss_op = torch.library.custom_op("fastae::decode_loss", mutates_args=())(_decode_loss_body)


@_decode_loss_op.register_fake
def _(h, weight, bias, target, output, loss, backend_name, with_reconstruction, with_gradient):
    per_sample = _stat_empty(h, h.shape[0])
    grad_z = target.new_empty(target.shape if with_gradient else (0,), dtype=h.dtype)
    x_hat = target.new_empty(target.shape if with_reconstruction else (0,), dtype=h.dtype)
    return per_sample, grad_z, x_hat


def _decode_backward_body(
    grad_loss: Tensor, h: Tensor, weight: Tensor, grad_z: Tensor, bias: Tensor | None,
    target: Tensor | None, output: str, loss: str, backend_name: str, needs_h_grad: bool,
) -> list[Tensor]:  # fmt: skip
    """(dV, dc[, dh]); bias, target (None unless it needs a gradient), output and loss are
    there for double backward only."""
    impl = _impl(_backend_for_grads(backend_name, grad_loss), "decoder")
    dw, db, dh = impl.decode_backward(grad_loss, h, weight, grad_z, needs_h_grad)
    return [dw, db] if dh is None else [dw, db, dh]


_decode_backward_op = torch.library.custom_op("fastae::decode_loss_backward", mutates_args=())(
    _decode_backward_body
)


@_decode_backward_op.register_fake
def _(grad_loss, h, weight, grad_z, bias, target, output, loss, backend_name, needs_h_grad):
    out = [reference.empty_in_layout(weight), weight.new_empty(weight.shape[0])]
    return out + [h.new_empty(h.shape)] if needs_h_grad else out


def _decode_target_grad_body(
    grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
    output: str, loss: str, backend_name: str,
) -> Tensor:  # fmt: skip
    impl = _impl(_backend_for_grads(backend_name, grad_loss), "decoder")
    return impl.decode_target_grad(grad_loss, h, weight, bias, target, output, loss)


_decode_target_grad_op = torch.library.custom_op(
    "fastae::decode_loss_target_grad", mutates_args=()
)(_decode_target_grad_body)


@_decode_target_grad_op.register_fake
def _(grad_loss, h, weight, bias, target, *args):
    return target.new_empty(target.shape)


def _decode_target_grad_setup(ctx, inputs, output):
    *tensors, ctx.output, ctx.loss, _ = inputs
    ctx.save_for_backward(*tensors)  # grad_loss, h, weight, bias, target


def _decode_target_grad_bwd(ctx, grad):
    grad_loss, h, weight, bias, target = ctx.saved_tensors

    def target_grad(grad_loss, h, weight, target, bias=None):
        return reference.decode_target_grad(
            grad_loss, h, weight, bias, target, ctx.output, ctx.loss
        )

    primals = (grad_loss, h, weight, target) + (() if bias is None else (bias,))
    d = torch.func.vjp(target_grad, *primals)[1](grad)
    return d[0], d[1], d[2], d[4] if bias is not None else None, d[3], None, None, None


_decode_target_grad_op.register_autograd(
    _decode_target_grad_bwd, setup_context=_decode_target_grad_setup
)


def _decode_setup(ctx, inputs, output):
    h, weight, bias, target, ctx.output, ctx.loss, ctx.backend_name, _, ctx.with_gradient = inputs
    ctx.target_grad = target.requires_grad
    _, grad_z, x_hat = output
    # besides h, V and c (alive anyway) one (B, d) tensor, d ell / d z^; the target is kept
    # only when it needs a gradient itself
    ctx.save_for_backward(h, weight, grad_z, bias, target if ctx.target_grad else None)
    ctx.mark_non_differentiable(grad_z, x_hat)
    ctx.set_materialize_grads(False)


def _decode_bwd(ctx, grad_loss, _grad_grad_z, _grad_x_hat):
    if grad_loss is None:
        return (None,) * 9
    if not ctx.with_gradient:
        raise RuntimeError(
            "fastae::decode_loss ran with with_gradient=False, so it kept no d ell / d z^ to "
            "differentiate with; decode_loss sets it whenever an input requires a gradient"
        )
    h, weight, grad_z, bias, target = ctx.saved_tensors
    needs_h = ctx.needs_input_grad[0]
    grads = _backward_call(
        _decode_backward_op, _decode_backward_body,
        grad_loss, h, weight, grad_z, bias, target, ctx.output, ctx.loss, ctx.backend_name,
        needs_h,
    )  # fmt: skip
    dh = grads[2] if needs_h else None
    db = grads[1] if ctx.needs_input_grad[2] else None
    dt = None
    if ctx.target_grad:
        dt = _backward_call(
            _decode_target_grad_op, _decode_target_grad_body,
            grad_loss, h, weight, bias, target, ctx.output, ctx.loss, ctx.backend_name,
        )  # fmt: skip
    return dh, grads[0], db, dt, None, None, None, None, None


def _decode_loss_math(
    h, weight, bias, target, output, loss, backend_name, with_reconstruction, with_gradient
):  # fmt: skip
    """(per-sample loss, an empty tensor, x^ (which carries no gradient) or an empty one)."""
    out = reference.decode_forward(
        h, weight, bias, target, output, loss, with_reconstruction, with_gradient=False,
        differentiable=True,
    )  # fmt: skip
    empty = h.new_empty(0)
    return out[0], empty, out[2].detach() if with_reconstruction else empty


_decode_loss = _with_eager_route(
    _decode_loss_op, _decode_loss_body, _decode_setup, _decode_bwd, _decode_loss_math
)


def _decode_backward_setup(ctx, inputs, output):
    grad_loss, h, weight, grad_z, bias, target, ctx.output, ctx.loss, _, _ = inputs
    ctx.save_for_backward(grad_loss, h, weight, grad_z, bias, target)


class _NoThirdDerivative(torch.autograd.Function):
    """A zero linked to ``sources`` whose gradient raises: decode_loss's double backward is
    plain torch ops on the saved d ell / d z^, exact in the upstream gradients (it is linear
    in them) but not in h, V, c or the target, so a third derivative in those is refused
    rather than dropped."""

    @staticmethod
    def forward(ctx, *sources):
        return sources[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "decode_loss: third derivatives in h, weight, bias or target are not supported "
            "(second are, and derivatives of the second in the upstream gradient)"
        )


def _decode_backward_bwd(ctx, grads):
    grad_loss, *kept = ctx.saved_tensors
    linear = any(t is not None and t.requires_grad for t in (*grads, grad_loss))
    refused = [t for t in kept if t is not None and t.requires_grad]
    kept = [None if t is None else t.detach() for t in kept]
    guard = _NoThirdDerivative.apply(*refused) if torch.is_grad_enabled() and refused else None
    if not (torch.is_grad_enabled() and linear):
        # nothing to differentiate exactly: computed unrecorded, the outputs guarded
        with torch.no_grad():
            out = _decode_second_order(ctx, grads, (grad_loss, *kept))
        return tuple(t if t is None or guard is None else t + guard for t in out)
    # recorded: exact in the upstream gradients (the double-backward trick of
    # torch.autograd.functional.hvp), refused through every saved value (d ell / d z^
    # included, which depends on them but is saved as a constant)
    if guard is not None:
        kept = [None if t is None else t + guard for t in kept]
    return tuple(_decode_second_order(ctx, grads, (grad_loss, *kept)))


def _decode_second_order(ctx, grads, saved):
    """Double backward of decode_loss, from the saved G = d ell / d z^ (no target needed):
    with dz = g G, dV = dz^T h, dc = sum_i dz, dh = dz V and upstream (A, a, A_h),
    Q = h A^T + a + A_h V^T is the gradient at dz; then d/dg_i = sum_k Q_ik G_ik,
    R = Q g G'(z^), dh = dz A + R V, dV = dz^T A_h + R^T h, dc = sum_i R, d target = Q g dG/dx,
    where G' = x^(1 - x^) (BCE), 2 (squared error, identity), 2 x^'^2 + G (1 - 2 x^)
    (squared error, sigmoid: x^' = x^(1 - x^))."""
    grad_loss, h, weight, grad_z, bias, target = saved
    grad_w, grad_b, grad_h = (list(grads) + [None])[:3]
    acc = reference.stat_dtype(h.dtype)
    h_acc, w_acc = h.to(acc), weight.to(acc)
    z = h_acc @ w_acc.t()
    if bias is not None:
        z = z + bias.to(acc)
    g = grad_loss.to(acc).unsqueeze(1)
    big_g = grad_z.to(acc)
    dz = g * big_g
    q = torch.zeros_like(dz)
    d_h = torch.zeros_like(h_acc)
    d_w = torch.zeros_like(w_acc)
    if grad_w is not None:
        q = q + h_acc @ grad_w.to(acc).t()
        d_h = d_h + dz @ grad_w.to(acc)
    if grad_b is not None:
        q = q + grad_b.to(acc)
    if grad_h is not None:
        q = q + grad_h.to(acc) @ w_acc.t()
        d_w = d_w + dz.t() @ grad_h.to(acc)
    if ctx.output == "sigmoid":
        x_hat = torch.sigmoid(z)
        slope = reference.sigmoid_slope(z)
    if ctx.loss == "bce":
        big_g_prime, big_g_target = slope, -1.0
    elif ctx.output == "identity":
        big_g_prime, big_g_target = 2.0, -2.0
    else:
        big_g_prime, big_g_target = 2 * slope * slope + big_g * (1 - 2 * x_hat), -2 * slope
    r = q * g * big_g_prime
    d_h = d_h + r @ w_acc
    d_w = d_w + r.t() @ h_acc
    d_grad_loss = (q * big_g).sum(1)
    d_bias = r.sum(0).to(bias.dtype) if bias is not None else None
    d_target = (q * g * big_g_target).to(target.dtype) if target is not None else None
    return (
        d_grad_loss.to(grad_loss.dtype), d_h.to(h.dtype), d_w.to(weight.dtype), None, d_bias,
        d_target, None, None, None, None,
    )  # fmt: skip


_decode_backward_op.register_autograd(_decode_backward_bwd, setup_context=_decode_backward_setup)


# what a model's BCE data error adds: the way out is the data's range or the model's loss
MODEL_BCE_ADVICE = (
    "scale the data into [0, 1] (as MinMaxScaler does), or build the model with "
    "output='identity', loss='mse'"
)


def check_unit_interval(name: str, values: Tensor, advice: str = "") -> None:
    """ValueError unless every value lies in [0, 1] (NaN fails); one sync on GPUs.
    ``advice`` ends the message."""
    if values.numel() == 0:
        return
    lo, hi = torch.aminmax(values.detach())
    # in float64 (exact for every input dtype): autocast refuses to stack float16 scalars
    # under bfloat16 autocast (and the reverse)
    bounds = torch.stack([lo.double(), hi.double()]).tolist()
    if math.isnan(bounds[0]) or math.isnan(bounds[1]):
        raise ValueError(f"{name} holds NaN, where loss 'bce' needs values in [0, 1]")
    if not (bounds[0] >= 0 and bounds[1] <= 1):
        raise ValueError(
            f"{name} must lie in [0, 1] for loss 'bce', got values in [{bounds[0]}, {bounds[1]}]"
            + (f"; {advice}" if advice else "")
        )


def _check_target(target: Tensor, name: str = "target", advice: str = "") -> None:
    """A BCE target in [0, 1], named ``name`` (a model's is its input x); not checked while
    torch.compile traces (a graph cannot raise on values) nor without values (meta)."""
    if target.is_meta or torch.compiler.is_compiling():
        return
    if not torch._C._are_functorch_transforms_active():
        check_unit_interval(name, target, advice)
        return
    try:
        check_unit_interval(name, target, advice)
    except RuntimeError as error:  # under vmap the values cannot be read
        raise RuntimeError(
            "decode_loss checks that a BCE target lies in [0, 1] by reading its values, which "
            "torch.func.vmap does not allow: check the data before the transform and pass "
            "check_target=False (a model: Autoencoder, DeepAutoencoder or VAE(..., "
            "check_targets=False))"
        ) from error


def decode_loss(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    target: Tensor,
    output: str = "sigmoid",
    loss: str = "bce",
    return_reconstruction: bool = False,
    check_target: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decoder layer plus reconstruction loss: per-sample l_i = sum_k ell(x^_ik, target_ik).

    Args:
        h: (B, H) code. weight: (d, H) (``nn.Linear`` layout; tied weights pass
            ``encoder_weight.t()`` and both uses' gradients add up). bias: (d,) or None.
        target: (B, d); in [0, 1] for BCE.
        output: "sigmoid" or "identity" (x^ = a_out(h V^T + c)).
        loss: "bce" (needs the sigmoid output; computed in the stable logits form) or "mse".
        return_reconstruction: also return x^ (B, d), computed in the same pass (no second
            GEMM); it carries no gradient.
        check_target: for BCE, check that the target lies in [0, 1] (a device-to-host sync
            on GPUs; ``fastae.fit`` checks tensor or array data once and turns this off per
            step). Not inside a ``torch.compile`` graph, which cannot raise on values: check
            the data before compiled steps.

    Where no input requires a gradient (scoring or validation under ``torch.no_grad``),
    d ell / d z^ (B, d), which backward would need, is neither computed nor stored.

    Returns:
        (B,) per-sample loss (float32 at least) — also the anomaly score of each sample —
        or (loss, x^) with ``return_reconstruction``.
    """
    h = _checks.tensor("h", h, 2)
    _checks.rows("h", h)
    h, weight, bias, target = _autocast(h.device, h=h, weight=weight, bias=bias, target=target)
    weight, bias = _check_layer(h, weight, bias, "h")
    if h.shape[1] == 0:
        raise ValueError(
            f"h must have at least one column (one code unit), got shape {tuple(h.shape)}"
        )
    target = _checks.tensor("target", target, 2)
    _checks.same_kind("target", target, "h", h)
    if tuple(target.shape) != (h.shape[0], weight.shape[0]):
        raise ValueError(
            f"target must have shape {(h.shape[0], weight.shape[0])} (rows of h, rows of "
            f"weight), got {tuple(target.shape)}"
        )
    output = _checks.choice("output", output, reference.OUTPUTS)
    loss = _checks.choice("loss", loss, reference.LOSSES)
    check_target = _checks.flag("check_target", check_target)
    if loss == "bce":
        if output != "sigmoid":
            raise ValueError(f"loss 'bce' needs output 'sigmoid', got output {output!r}")
        if check_target:
            _check_target(target)
    name = _backend_for("decode_loss", "decoder", h.device)
    return_reconstruction = _checks.flag("return_reconstruction", return_reconstruction)
    # d ell / d z^ (B, d) only where a gradient can be asked for: scoring and validation
    # under torch.no_grad neither compute nor store it
    with_gradient = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, weight, bias, target)
    )
    per_sample, _, x_hat = _decode_loss(
        h, weight, bias, target, output, loss, name, return_reconstruction, with_gradient
    )
    return (per_sample, x_hat) if return_reconstruction else per_sample


# ----------------------------------------------------------------------------- reparameterize


def _reparameterize_body(
    mu: Tensor, logvar: Tensor, seed: Tensor, backend_name: str
) -> tuple[Tensor, Tensor]:
    """(z, per-sample KL)."""
    impl = _impl(backend_name, "vae")
    return impl.reparameterize_forward(mu, logvar, _seed_for(seed, backend_name))


_reparameterize_op = torch.library.custom_op("fastae::reparameterize", mutates_args=())(
    _reparameterize_body
)


@_reparameterize_op.register_fake
def _(mu, logvar, seed, backend_name):
    return mu.new_empty(mu.shape), _stat_empty(mu, mu.shape[0])


def _reparameterize_backward_body(
    grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor, seed: Tensor,
    backend_name: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dmu, dlogvar); eps is regenerated from the seed."""
    backend_name = _backend_for_grads(backend_name, grad_z, grad_kl)
    impl = _impl(backend_name, "vae")
    seed = _seed_for(seed, backend_name)
    return impl.reparameterize_backward(grad_z, grad_kl, mu, logvar, seed)


_reparameterize_backward_op = torch.library.custom_op(
    "fastae::reparameterize_backward", mutates_args=()
)(_reparameterize_backward_body)


@_reparameterize_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, backend_name):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, ctx.seed, ctx.backend_name = inputs
    # mu and logvar are alive anyway; eps is regenerated from the seed, never stored
    ctx.save_for_backward(mu, logvar)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros


def _reparameterize_bwd(ctx, grad_z, grad_kl):
    if grad_z is None and grad_kl is None:
        return None, None, None, None
    mu, logvar = ctx.saved_tensors
    dmu, dlogvar = _backward_call(
        _reparameterize_backward_op, _reparameterize_backward_body,
        grad_z, grad_kl, mu, logvar, ctx.seed, ctx.backend_name,
    )  # fmt: skip
    needs_mu, needs_logvar = ctx.needs_input_grad[:2]
    return (dmu if needs_mu else None), (dlogvar if needs_logvar else None), None, None


def _reparameterize_math(mu, logvar, seed, backend_name):
    return reference.reparameterize_forward(mu, logvar, _seed_value(seed))


_reparameterize = _with_eager_route(
    _reparameterize_op, _reparameterize_body, _reparameterize_setup, _reparameterize_bwd,
    _reparameterize_math,
)  # fmt: skip


def _reparameterize_backward_setup(ctx, inputs, output):
    grad_z, grad_kl, mu, logvar, ctx.seed, _ = inputs
    ctx.save_for_backward(grad_z, grad_kl, mu, logvar)


def _reparameterize_backward_bwd(ctx, grad_mu, grad_logvar):
    """Double backward of reparameterize (eps regenerated from the seed once more)."""
    grad_z, grad_kl, mu, logvar = ctx.saved_tensors
    given = [i for i, g in enumerate((grad_z, grad_kl)) if g is not None]

    eps = reference.standard_normal(int(ctx.seed), mu.shape[0], mu.shape[1], mu.device)

    def forward(mu, logvar):
        out = reference.reparameterize_with(mu, logvar, eps)
        return tuple(out[i] for i in given)

    cotangents = tuple((grad_z, grad_kl)[i] for i in given)
    d_cotangents, (d_mu, d_logvar) = _second_order(
        forward, (mu, logvar), cotangents, (grad_mu, grad_logvar)
    )
    d_grads = [None, None]
    for i, d in zip(given, d_cotangents, strict=True):
        d_grads[i] = d
    return d_grads[0], d_grads[1], d_mu, d_logvar, None, None


_reparameterize_backward_op.register_autograd(
    _reparameterize_backward_bwd, setup_context=_reparameterize_backward_setup
)


def reparameterize(mu: Tensor, logvar: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Reparameterized sample of N(mu, exp(logvar)) and its KL divergence to N(0, I).

    Args:
        mu, logvar: (B, k) mean and log-variance of a diagonal Gaussian per sample (same
            shape, dtype and device).
        seed: Philox seed of eps; None draws one from torch's generator (so
            ``torch.manual_seed`` makes runs repeatable).

    Returns:
        z (B, k) = mu + exp(logvar / 2) * eps, eps = ``tl.randn(seed, row * k + col)`` (the
        stream of the noise ops), contiguous in mu's dtype; and kl (B,) =
        -1/2 sum_j (1 + logvar - mu^2 - exp(logvar)), float32 at least.
        The backward pass regenerates eps from the seed instead of storing it. logvar is
        not clamped: where exp(logvar) or mu^2 leaves kl's dtype (float32: logvar above
        about 88.7, |mu| above about 1.8e19), kl is inf (and so is d kl / d logvar).
    """
    mu = _checks.tensor("mu", mu, 2)
    logvar = _checks.tensor("logvar", logvar, 2)
    _checks.same_kind("logvar", logvar, "mu", mu)
    if logvar.shape != mu.shape:
        raise ValueError(
            f"logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}"
        )
    if mu.shape[0] == 0 or mu.shape[1] == 0:
        raise ValueError(f"mu must have at least one row and one column, got {tuple(mu.shape)}")
    seed = check_seed(seed)
    name = _backend_for("reparameterize", "vae", mu.device)
    seed = _seed_tensor(seed, name, mu.device)
    return _reparameterize(mu, logvar, seed, name)


# ----------------------------------------------------------------------------- bernoulli_kl


def _bernoulli_kl_body(rho_hat: Tensor, rho: float, backend_name: str) -> tuple[Tensor, Tensor]:
    """(kl, d kl / d rho_hat)."""
    return _impl(backend_name, "sparsity").bernoulli_kl(rho_hat, rho)


_bernoulli_kl_op = torch.library.custom_op("fastae::bernoulli_kl", mutates_args=())(
    _bernoulli_kl_body
)


@_bernoulli_kl_op.register_fake
def _(rho_hat, rho, backend_name):
    return _stat_empty(rho_hat), _stat_empty(rho_hat, *rho_hat.shape)


def _bernoulli_kl_setup(ctx, inputs, output):
    rho_hat, ctx.rho, _ = inputs
    ctx.save_for_backward(rho_hat, output[1])  # two H-vectors
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _bernoulli_kl_bwd(ctx, grad_kl, _grad_grad):
    if grad_kl is None:
        return None, None, None
    rho_hat, grad = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a gradient that is itself differentiable
        grad = reference.bernoulli_kl(rho_hat, ctx.rho)[1]
    return (grad_kl * grad).to(rho_hat.dtype), None, None


def _bernoulli_kl_math(rho_hat, rho, backend_name):
    return reference.bernoulli_kl(rho_hat, rho)


_bernoulli_kl = _with_eager_route(
    _bernoulli_kl_op, _bernoulli_kl_body, _bernoulli_kl_setup, _bernoulli_kl_bwd,
    _bernoulli_kl_math,
)  # fmt: skip


def bernoulli_kl(rho_hat: Tensor, rho: float) -> Tensor:
    """The KL sparsity penalty sum_j KL(rho || rho_hat_j) of Bernoulli means.

    Args:
        rho_hat: (H,) mean activation of each unit (``encode``'s second output), in [0, 1]
            (not checked, which would read the values: a device sync); clamped to
            [2^-20, 1 - 2^-20] (2^-20 about 1e-6), so a unit that is always off or on stays
            finite (its gradient is zero where the clamp acts, as for any value outside).
        rho: the target mean activation, in (0, 1).

    Returns:
        () sum_j rho log(rho / q_j) + (1 - rho) log((1 - rho) / (1 - q_j)), q the clamped
        rho_hat, in rho_hat's dtype (float32 at least). Forward computes the gradient as
        well (one kernel on the GPU), so backward is one product.
    """
    rho_hat = _checks.tensor("rho_hat", rho_hat, 1)
    if rho_hat.shape[0] == 0:
        raise ValueError("rho_hat must hold at least one unit's mean activation, got shape (0,)")
    # not while torch.compile traces, where rho may be a symbolic float with no value to
    # check (KLSparsity checked its rho when made)
    if not torch.compiler.is_compiling():
        rho = _checks.finite_number("rho", rho, low=0.0, high=1.0, open_low=True)
    name = _backend_for("bernoulli_kl", "sparsity", rho_hat.device)
    return _bernoulli_kl(rho_hat, rho, name)[0]
