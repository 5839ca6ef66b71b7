"""Jit helpers shared by the kernels: activations, their derivatives, Philox corruption,
block-size choice. Codes for constexpr switches are defined here once."""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from fastae import reference
from fastae.backend import triton_interpreting

ACTIVATION_CODES = {"sigmoid": 0, "tanh": 1, "relu": 2, "softplus": 3}
NOISE_CODES = {"none": 0, "gaussian": 1, "masking": 2, "masking_rescale": 3, "salt_pepper": 4}

SIGMOID: tl.constexpr = tl.constexpr(0)
TANH: tl.constexpr = tl.constexpr(1)
RELU: tl.constexpr = tl.constexpr(2)
SOFTPLUS: tl.constexpr = tl.constexpr(3)

NOISE_NONE: tl.constexpr = tl.constexpr(0)
NOISE_GAUSSIAN: tl.constexpr = tl.constexpr(1)
NOISE_MASKING: tl.constexpr = tl.constexpr(2)
NOISE_MASKING_RESCALE: tl.constexpr = tl.constexpr(3)
NOISE_SALT_PEPPER: tl.constexpr = tl.constexpr(4)


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator dtype: float64 for float64 inputs (gradcheck), else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: for float32 that of torch's own CUDA matmuls, else IEEE."""
    return cuda_matmul_precision() if dtype == torch.float32 else "ieee"


def cuda_matmul_precision() -> str:
    """The precision of torch's float32 CUDA matmuls, "tf32" or "ieee": the per-backend setting
    (``torch.backends.cuda.matmul.fp32_precision``), else the generic one
    (``torch.backends.fp32_precision``), else the legacy
    ``torch.get_float32_matmul_precision()`` ("highest": IEEE), which raises where the newer
    settings are mixed with it."""
    chosen = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if chosen == "none":
        chosen = getattr(torch.backends, "fp32_precision", "none")
    if chosen in ("tf32", "ieee"):
        return chosen
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:
        return "ieee"


# Fused multiply-add in the kernels' floating-point arithmetic, asked for at every launch:
# Triton's default up to 3.9, which warns that 3.10 turns it off. Asked for explicitly, the
# compiled code (and what the tests and benchmarks measured) does not change with the
# installed Triton; TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
FP_FUSION = True


def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator) for host code: plain integer arithmetic (``triton.cdiv``
    is a constexpr function in recent Triton, several times slower per call)."""
    return -(-numerator // denominator)


def interpreting() -> bool:
    return triton_interpreting()


# Tests set this to fill every output buffer with NaN before a kernel writes it, so an
# element a kernel forgets to write shows up.
poison_outputs = False


def empty(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Output buffer for a kernel to fill (every element must be written)."""
    if poison_outputs:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def ticket(device: torch.device) -> torch.Tensor:
    """An int32 counter for "which program finishes last"; a kernel launched before its reader
    zeroes it (under ``poison_outputs`` it starts nonzero, so a missing zeroing shows up)."""
    out = torch.empty(1, device=device, dtype=torch.int32)
    return out.fill_(-12345) if poison_outputs else out


def empty_in_layout(matrix: torch.Tensor) -> torch.Tensor:
    """Output buffer shaped and laid out as ``matrix`` (``fastae.reference.empty_in_layout``)."""
    out = reference.empty_in_layout(matrix)
    return out.fill_(float("nan")) if poison_outputs else out


@triton.jit
def log1p(u):
    """log(1 + u) to full precision: log(w) * u / (w - 1), w = 1 + u (Goldberg's trick)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))


@triton.jit
def one_minus_exp_neg(h):
    """1 - exp(-h) = -expm1(-h) to full precision: (1 - v) h / -log(v), v = exp(-h) (Kahan).
    Below 2^-60, v leaves 1 - v = 1 in float32 and float64 alike; there it is taken as 1, as
    log of a float32 v that small (subnormal from h = 87.3 on) is inexact, or -inf where the
    GPU flushes it to zero."""
    return one_minus(tl.exp(-h), h)


@triton.jit
def one_minus(v, h):
    """1 - v for v = exp(-h) given both: :func:`one_minus_exp_neg`'s formula."""
    return tl.where(
        v == 1.0, h, tl.where(v < 8.673617379884035e-19, 1.0, (1.0 - v) * h / -tl.log(v))
    )


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == SIGMOID:
        h = 1.0 / (1.0 + tl.exp(-z))
    elif ACTIVATION == TANH:
        # tanh(z) = sign(z) t, t = (1 - v) / (1 + v), v = exp(-2|z|). Below |z| = ln(2) / 2
        # as u / (2 - u) with u = 1 - v to full precision (no cancellation); above as
        # 1 - 2v / (1 + v), whose last subtraction is its only rounding that counts: t within
        # about half an ulp where tanh saturates, so the slope 1 - h^2 taken from h keeps all
        # the precision h's format leaves it (the Kahan form there is off by a few ulps, the
        # slope by up to 11% at |z| = 6.5 in float32)
        two_a = 2.0 * tl.abs(z)
        v = tl.exp(-two_a)
        u = one_minus(v, two_a)
        t = tl.where(v < 0.5, 1.0 - 2.0 * v / (1.0 + v), u / (2.0 - u))
        h = tl.where(z < 0, -t, t)
    elif ACTIVATION == RELU:
        h = tl.maximum(z, 0.0, tl.PropagateNan.ALL)  # as torch.relu: NaN stays NaN
    else:
        # softplus(z) = max(z, 0) + log(1 + exp(-|z|))
        h = tl.maximum(z, 0.0) + log1p(tl.exp(-tl.abs(z)))
    return h


@triton.jit
def slope(h, ACTIVATION: tl.constexpr):
    """s = a'(z) in terms of h: sigmoid h (1 - h), tanh 1 - h^2, relu [h > 0], softplus
    1 - exp(-h)."""
    if ACTIVATION == SIGMOID:
        s = h * (1.0 - h)
    elif ACTIVATION == TANH:
        s = 1.0 - h * h
    elif ACTIVATION == RELU:
        s = tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    else:
        s = one_minus_exp_neg(h)
    return s


@triton.jit
def curvature(h, s, ACTIVATION: tl.constexpr):
    """a''(z): sigmoid s(1-2h), tanh -2hs, relu 0, softplus s(1-s) = s exp(-h) (1 - s is
    exp(-h): no cancellation where s rounds to 1)."""
    if ACTIVATION == SIGMOID:
        a2 = s * (1.0 - 2.0 * h)
    elif ACTIVATION == TANH:
        a2 = -2.0 * h * s
    elif ACTIVATION == RELU:
        a2 = s * 0.0
    else:
        a2 = s * tl.exp(-h)
    return a2


@triton.jit
def element_offsets(rows, cols, n_cols, base):
    """Philox counters base + row * n_cols + col (int64) for a 2-D tile."""
    return base + rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]


@triton.jit
def uniform(words):
    """float32 in [0, 1) from Philox words, as ``fastae.philox.uint_to_uniform`` (and Triton's
    ``tl.rand``): read as int32, fold negatives with ~x, scale by 4.6566127342e-10."""
    signed = words.to(tl.int32, bitcast=True)
    signed = tl.where(signed < 0, ~signed, signed)
    return signed.to(tl.float32) * 4.6566127342e-10


@triton.jit
def corrupt_tile(x, offsets, seed, level, low, high, NOISE: tl.constexpr):
    """x~ of a tile (in the accumulator dtype), random numbers from Philox at ``offsets``.

    Same streams as fastae.philox / fastae.reference.corrupt: word 0 decides masking and
    salt-and-pepper corruption (u0 < p), word 1 salt vs pepper; Gaussian uses Box-Muller on
    words 0 and 1 (tl.randn).
    """
    # hyper-parameters act in float32 (as kernel scalar arguments do on the GPU)
    level = tl.cast(level, tl.float32)
    low = tl.cast(low, tl.float32)
    high = tl.cast(high, tl.float32)
    if NOISE == NOISE_GAUSSIAN:
        eps = tl.randn(seed, offsets)
        x = x + (level * eps).to(x.dtype)
    elif NOISE != NOISE_NONE:
        w0, w1, _, _ = tl.randint4x(seed, offsets)
        keep = uniform(w0) >= level
        if NOISE == NOISE_SALT_PEPPER:
            salt = uniform(w1) >= 0.5
            x = tl.where(keep, x, tl.where(salt, high, low).to(x.dtype))
        elif NOISE == NOISE_MASKING_RESCALE:
            x = x / (1.0 - level) * keep.to(x.dtype)  # x m: a dropped NaN stays NaN
        else:
            x = x * keep.to(x.dtype)
    return x


@triton.jit
def input_grad_mask(grad, offsets, seed, level, NOISE: tl.constexpr):
    """d x~ / d x applied to ``grad``: the kept-entry mask regenerated from the seed."""
    if NOISE >= NOISE_MASKING:
        w0, _, _, _ = tl.randint4x(seed, offsets)
        keep = uniform(w0) >= level
        if NOISE == NOISE_MASKING_RESCALE:
            grad = grad / (1.0 - tl.cast(level, tl.float32)) * keep.to(grad.dtype)
        elif NOISE == NOISE_SALT_PEPPER:
            grad = tl.where(keep, grad, 0.0)  # replaced entries do not depend on x
        else:
            grad = grad * keep.to(grad.dtype)
    return grad


def gemm_configs(
    names: tuple[str, str, str], accumulator_per_thread: int | None = None, split: bool = False
):
    """Autotuning candidates; one small config under the interpreter (it is slow). With
    ``accumulator_per_thread``, only tiles whose float32 accumulator takes at most that many
    registers per thread (BLOCK_M * BLOCK_N / threads): for kernels whose epilogue needs the
    registers the larger tiles would spill. ``split``: every config has a ``SPLIT`` (1), and
    two tiles come with the split-K counts of :data:`SPLITS` too (see there)."""
    m, n, k = names
    if interpreting():
        blocks = {m: 16, n: 16, k: 16, "GROUP": 4} | ({"SPLIT": 1} if split else {})
        return [triton.Config(blocks, num_warps=1)]
    shapes = [
        (128, 128, 64, 4, 8),
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ]
    splits = [(shape, 1) for shape in shapes]
    if split:
        splits += [(shape, s) for shape in shapes[:1] + shapes[3:4] for s in SPLITS]
    return [
        triton.Config(
            {m: bm, n: bn, k: bk, "GROUP": 8} | ({"SPLIT": s} if split else {}),
            num_stages=stages,
            num_warps=warps,
        )  # fmt: skip
        for (bm, bn, bk, stages, warps), s in splits
        if accumulator_per_thread is None or bm * bn <= accumulator_per_thread * 32 * warps
    ]


# Split-K over the batch for the weight-gradient products (dW = dz^T x~, dV = (g G)^T h). Their
# output (H x d) can be too few tiles to fill the GPU while each tile loops over every row:
# 1024 x 784 is 56 tiles of 128 x 128 against an H100's 132 SMs, each a loop over B = 4096. With
# SPLIT programs per tile, each takes a contiguous share of the row blocks and stores its
# partial tile (float32); the last to finish (an atomic ticket per tile) adds the partials in
# split order (deterministic whichever finishes last) and runs the epilogue. The candidates
# are offered only where splitting can pay (split_k_possible); the autotuner times them
# against SPLIT = 1, which stays the first config (FASTAE_AUTOTUNE=0 runs it).
SPLITS = (2, 4)
SPLIT_MIN_BATCH = 1024  # rows to share out
SPLIT_MAX_TILES = 128  # output tiles of 128 x 128


def split_k_possible(batch: int, rows: int, cols: int) -> bool:
    """Whether split-K candidates run for a (rows x cols) weight gradient over ``batch`` rows."""
    return batch >= SPLIT_MIN_BATCH and cdiv(rows, 128) * cdiv(cols, 128) <= SPLIT_MAX_TILES


def split_k_buffers(
    like: torch.Tensor, batch: int, rows: int, cols: int, vector: bool = False,
    placeholders: bool = False,
):  # fmt: skip
    """The split-K buffers of a (rows x cols) weight gradient: (partial tiles, tickets), with
    ``vector`` (partial tiles, partial vectors, tickets). Room for ``max(SPLITS)`` partials of
    every tile of any size up to 128 x 128 and of a rows-vector (float32; float64 for
    float64), and zeroed tickets for tiles down to 16 x 16 (the kernels put each back to zero
    when done). Where no split runs, ``like`` for each (the kernels do not touch it). With
    ``placeholders``, one-element tensors of the same dtypes and device in their place, made
    once: arguments that key a launch as the buffers do, for a kernel that runs unsplit (see
    :func:`launch_split_k`)."""
    if not split_k_possible(batch, rows, cols):
        return (like, like, like) if vector else (like, like)
    if placeholders:
        work = _placeholder(like.device, reference.stat_dtype(like.dtype))
        tickets = _placeholder(like.device, torch.int32)
        return (work, work, tickets) if vector else (work, tickets)
    work = stat_buffer(like, max(SPLITS) * (rows + 127) * (cols + 127))
    tickets = torch.zeros(cdiv(rows, 16) * cdiv(cols, 16), dtype=torch.int32, device=like.device)
    if vector:
        return work, stat_buffer(like, max(SPLITS) * (rows + 127)), tickets
    return work, tickets


_placeholders: dict = {}


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _placeholders:
        _placeholders[key] = torch.empty(1, dtype=dtype, device=device)
    return _placeholders[key]


def launch_split_k(kernel, grid, before, buffers, after, **meta):
    """``launch(kernel, grid, *before, *buffers(), *after, **meta)`` for a weight-gradient
    kernel whose parameters between ``before`` and ``after`` are its split-K buffers
    (``buffers``: :func:`split_k_buffers` for the gradient, taking ``placeholders``).

    The buffers cost two or three allocations and a memset per launch wherever split-K is
    offered, whichever config the autotuner picks. Once the direct path keeps a compiled kernel for
    these arguments (the buffers' placeholders key a launch as the buffers do) and it runs
    SPLIT = 1, the placeholders are launched instead: that kernel never touches them. The
    choice is read from the kept kernel's own meta-parameters, not inferred, so it holds
    whatever the autotuner picked; anywhere else the buffers are made. A kept kernel that
    splits gets them without a second key: their key parts are compared with the
    placeholders' instead."""
    meta.setdefault("enable_fp_fusion", FP_FUSION)
    index = _foreign_device(before)
    if index is not None:
        with torch.cuda.device(index):
            return launch_split_k(kernel, grid, before, buffers, after, **meta)
    placeholders = buffers(placeholders=True)
    args = (*before, *placeholders, *after)
    kept = _kept_launch(kernel, args, meta)
    if kept is None or kept[1] is None:
        return launch(kernel, grid, *before, *buffers(), *after, **meta)
    (_, device, *_), entry = kept
    if entry[3]["SPLIT"] > 1:
        made = buffers()
        if list(map(_tensor_part, made)) != list(map(_tensor_part, placeholders)):
            return launch(kernel, grid, *before, *made, *after, **meta)
        args = (*before, *made, *after)
    return _run_kept(entry, grid, args, device)


@triton.jit
def split_k_tile(
    n_rows, n_cols, B, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP, SPLIT: tl.constexpr,
):  # fmt: skip
    """This program's output tile of a weight gradient (row block, column block; grouped
    order), the number of tiles, and the first and end batch rows it sums over: all of them,
    or with SPLIT > 1 the share of split program_id // tiles, whole row blocks of BLOCK_M each
    (the last share may be short or empty)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_rows, BLOCK_R) * tl.cdiv(n_cols, BLOCK_C)
    first_row, end_row = 0, B
    if SPLIT > 1:
        per_split = tl.cdiv(tl.cdiv(B, BLOCK_M), SPLIT) * BLOCK_M
        first_row = (pid // n_tiles) * per_split
        end_row = tl.minimum(first_row + per_split, B)
        pid = pid % n_tiles
    pid_r, pid_c = tile_ids(pid, n_rows, n_cols, BLOCK_R, BLOCK_C, GROUP)
    return pid_r, pid_c, n_tiles, first_row, end_row


@triton.jit
def split_k_sum(acc, work_ptr, ticket_ptr, pid, n_tiles, SPLIT: tl.constexpr):
    """Stores this program's partial tile; returns (the sum of the tile's SPLIT partials, in
    split order, and True) to the program that finishes the tile last, (acc, False) to the
    others. The last program puts the tile's ticket back to zero. Partials of other vectors
    stored before the call are ordered by the same barrier and ticket."""
    tile = pid % n_tiles
    size: tl.constexpr = acc.shape[0] * acc.shape[1]
    offsets = tl.arange(0, acc.shape[0])[:, None] * acc.shape[1] + tl.arange(0, acc.shape[1])
    tl.store(work_ptr + pid.to(tl.int64) * size + offsets, acc)
    # every thread's stores, then the ticket (acquire-release): the last program sees them all
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == SPLIT - 1
    total = acc
    if last:
        total = tl.zeros(acc.shape, acc.dtype)
        for s in tl.static_range(SPLIT):
            part = work_ptr + (s * n_tiles + tile).to(tl.int64) * size + offsets
            total += tl.load(part, volatile=True)
        tl.store(ticket_ptr + tile, 0)
    return total, last


def fit_shared_memory(configs, names: tuple[str, str, str], element_size: int, limit: int):
    """The configs whose pipelined operand tiles fit in ``limit`` bytes of shared memory,
    estimated as stages * (BLOCK_M + BLOCK_N) * BLOCK_K * element size (the estimate of
    Triton's matmul performance model; an upper bound). A config that does not fit is tried
    with BLOCK_K halved (down to 16), so float32 keeps the large tiles that 16-bit types get.
    If none fits, the one that needs least is kept (the autotuner needs a config). For 8-byte
    elements (float64: gradcheck, where speed does not matter) the smallest tile comes first,
    so ``FASTAE_AUTOTUNE=0`` compiles it: a 128x128 float64 tile spills registers heavily and
    compiles about twice as long."""
    m, n, k = names
    fitting, smallest = {}, None
    for config in configs:
        blocks = dict(config.kwargs)
        per_k = config.num_stages * (blocks[m] + blocks[n]) * element_size  # bytes per unit of K
        while per_k * blocks[k] > limit and blocks[k] > 16:
            blocks[k] //= 2
        candidate = triton.Config(blocks, num_stages=config.num_stages, num_warps=config.num_warps)
        if smallest is None or per_k * blocks[k] < smallest[0]:
            smallest = (per_k * blocks[k], candidate)
        key = (*sorted(blocks.items()), config.num_stages, config.num_warps)
        if per_k * blocks[k] <= limit:
            fitting.setdefault(key, candidate)
    kept = list(fitting.values()) or [smallest[1]]
    if element_size == 8:
        kept.sort(key=lambda config: config.kwargs[m] * config.kwargs[n])
    return kept


def autotuning() -> bool:
    """``FASTAE_AUTOTUNE=0`` runs each kernel's first candidate config instead of timing every
    candidate on the first call for each shape: a fast start (the GPU tests use it), slower
    kernels. Default 1."""
    choice = os.environ.get("FASTAE_AUTOTUNE", "1")
    if choice not in ("0", "1"):
        raise ValueError(f"FASTAE_AUTOTUNE must be 0 or 1, got {choice!r}")
    return choice == "1"


def benchmark(kernel_call, quantiles):
    """The autotuner's timing of a candidate: the driver's benchmarker (Triton's default), and
    under ``FASTAE_AUTOTUNE=0`` none, the kernel not run (one candidate is left, which Triton
    3.6 would still time: some 0.1 s a kernel and shape)."""
    if not autotuning():
        return [0.0] * len(quantiles)
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(configs, key: list[str], fit=None, **kwargs):
    """``triton.autotune`` whose candidates are ``fit(configs, named_args)`` (all if None),
    only the first of them under ``FASTAE_AUTOTUNE=0``."""

    def prune(configs, named_args, **_):
        kept = fit(configs, named_args) if fit else configs
        return kept if autotuning() else kept[:1]

    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
        do_bench=benchmark, **kwargs,
    )  # fmt: skip


def gemm_autotune(
    names: tuple[str, str, str],
    operands: tuple[str, str],
    accumulator_per_thread: int | None = None,
    split: bool = False,
):
    """:func:`autotune` over :func:`gemm_configs` (names: the M, N and K block sizes of the
    kernel's product; operands: the pointer arguments it multiplies; accumulator_per_thread
    and split: see there), keyed on the problem's B, D and H and the product's precision
    (tf32 and IEEE float32 tune apart; by Triton also on the dtypes).
    Configs that cannot fit the GPU's shared memory for the operands' dtype are reshaped or
    dropped before any is compiled; split-K configs where :func:`split_k_possible` says no
    (the launcher then has no buffers for them)."""

    def fit(configs, named_args):
        if split and not split_k_possible(named_args["B"], named_args["H"], named_args["D"]):
            configs = [config for config in configs if config.kwargs["SPLIT"] == 1]
        if interpreting():
            return configs
        tensors = [named_args[name] for name in operands]
        driver = triton.runtime.driver.active  # on CPU tensors: a stand-in (bench/fake_driver.py)
        device = tensors[0].device
        index = device.index if device.type == "cuda" else driver.get_current_device()
        properties = driver.utils.get_device_properties(index)
        size = max(t.element_size() for t in tensors)
        return fit_shared_memory(configs, names, size, properties["max_shared_mem"])

    configs = gemm_configs(names, accumulator_per_thread, split)
    return autotune(configs, key=["B", "D", "H", "PRECISION"], fit=fit)


def elementwise_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
        for bm, bn, w in [(64, 64, 4), (128, 64, 4), (32, 128, 4), (64, 128, 8)]
    ]


@triton.jit
def tile_ids(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP):
    """Grouped program order (Triton tutorial 03) so neighbouring programs share L2 tiles."""
    tiles_r = tl.cdiv(n_rows, BLOCK_R)
    tiles_c = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * tiles_c
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


class Grid:
    """A launch grid (meta-parameters -> grid) that keeps the meta-parameters of its last
    call: those of the config the launch ran. A launcher sizes its partial sums from them,
    not from the autotuner's ``best_config``, one attribute for every caller, which a launch
    at another shape in another thread can change in between."""

    def __init__(self, grid_of_meta):
        self.grid_of_meta = grid_of_meta
        self.meta = None

    def __call__(self, meta):
        self.meta = meta
        return self.grid_of_meta(meta)


def grid_2d(rows: int, cols: int, block_rows: str, block_cols: str) -> Grid:
    """One program per (block_rows x block_cols) tile, flattened."""
    return Grid(lambda meta: (cdiv(rows, meta[block_rows]) * cdiv(cols, meta[block_cols]),))


def grid_split_k(rows: int, cols: int) -> Grid:
    """SPLIT programs per (BLOCK_N x BLOCK_K) tile of a weight gradient, flattened, split-major
    (program = split * tiles + tile)."""
    return Grid(
        lambda meta: (cdiv(rows, meta["BLOCK_N"]) * cdiv(cols, meta["BLOCK_K"]) * meta["SPLIT"],)
    )


def grid_tiles(rows: int, cols: int) -> Grid:
    """One program per (BLOCK_M x BLOCK_N) tile (the elementwise kernels), on one grid axis:
    CUDA caps the second and third at 65,535 blocks, which d / 64 passes from d = 4.2 M on.
    Each program finds its tile with :func:`flat_tile`."""
    return Grid(lambda meta: (cdiv(rows, meta["BLOCK_M"]) * cdiv(cols, meta["BLOCK_N"]),))


@triton.jit
def flat_tile(n_cols, BLOCK_N: tl.constexpr):
    """(row block, column block) of this program on :func:`grid_tiles`' grid, the column
    blocks varying fastest."""
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    return pid // n_col_blocks, pid % n_col_blocks


FUSIONS = ("auto", "gemm", "split")


def fusion_choice(variable: str) -> str:
    """A fusion boundary forced by the environment variable ``variable``, or ``auto``."""
    choice = os.environ.get(variable, "auto")
    if choice not in FUSIONS:
        raise ValueError(f"{variable} must be one of {FUSIONS}, got {choice!r}")
    return choice


# The fused GEMM kernels load and store whole 16-byte vectors, asynchronously and pipelined
# (cp.async into shared memory, one tensor-core product in flight), only where Triton can
# prove it: where d and H, which bound the contiguous dimension of every tile and set the
# row strides, are multiples of 16, the divisibility it specializes integer arguments on.
# Compiled for sm_90 in bfloat16 with H = 520 or d = 392 (multiples of 8), every product
# kernel loads 2-byte elements one by one instead, synchronously, each product waiting for
# the last, and some spill registers (tests/sass_check.py prints it for a shape).
PRODUCT_ALIGNMENT = 16


def product_aligned(features: int, hidden: int) -> bool:
    """Whether d and H let the fused GEMM kernels load full vectors (see above); the
    encoder's and decode_loss's fusion rules take cuBLAS's products where not."""
    return features % PRODUCT_ALIGNMENT == 0 and hidden % PRODUCT_ALIGNMENT == 0


# Hopper's tensor-core products (wgmma) read tf32 operands from shared memory only K-major
# (the reduction dimension contiguous); they transpose 16-bit operands only. For a float32
# operand whose reduction dimension is strided in memory, Triton fills shared memory with one
# 4-byte asynchronous copy per element instead of 16-byte ones (LDGSTS.E against
# LDGSTS.E.BYPASS.128: tests/sass_check.py --dtype tf32), four times the copy instructions.
# The weight gradients always read such operands (dW = dz^T x~ and dV = (g G)^T h reduce over
# the batch, the rows of both), and so do dx = dz W, dh = G V with an untied V, and a tied
# decoder's forward (V^T = W). On an H200 in tf32 (2026-11-28 profiles), at 4096 x 784 ->
# 1024 our dW took 285 us and dV 262 us of GPU time where cuBLAS's product of the same shape
# took 44 us (our bf16 dW: 49 us); at 8192 x 4096 -> 4096 the strided ones took 2.6-4.3x
# cuBLAS's time (dW 4,377 us, dV 3,072, a tied forward 2,718, against 1,025-1,058), the
# contiguous ones about as long (the encoder forward with its statistics 854 us, a tied dh
# 751, against 703-788). The fusion rules hand the strided products to cuBLAS in tf32.
def tf32_products(dtype: torch.dtype) -> bool:
    """Whether products of ``dtype`` run on tf32 tensor cores (see above)."""
    return dot_precision(dtype) == "tf32"


def k_major(tensor: torch.Tensor, dim: int) -> bool:
    """Whether the reduction dimension ``dim`` of a product's operand is contiguous."""
    return tensor.stride(dim) == 1 or tensor.shape[dim] == 1


# Offsets at or past this need int64 arithmetic (a module constant so tests can lower it and
# run the wide variants on small tensors).
INDEX_LIMIT = 2**31


def wide_index(*tensors: torch.Tensor) -> bool:
    """Whether an element offset (sum of index * stride) of some tensor can pass 2^31 - 1, so
    a kernel must compute its offsets in int64."""

    def last_offset(t: torch.Tensor) -> int:
        return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))

    return any(t.numel() > 0 and last_offset(t) >= INDEX_LIMIT for t in tensors)


# below 2^31 by a margin for the loops that step a block past the last index
DIMENSION_LIMIT = 2**31 - 2**16


def check_sizes(**tensors: torch.Tensor) -> None:
    """The kernels number rows and columns (tiles, programs, loop counters) in int32,
    computing element offsets from them in int64 where these can pass 2^31 - 1
    (:func:`wide_index`): a dimension near 2^31 would wrap, so it is refused, naming the
    tensor's argument."""
    for name, t in tensors.items():
        if any(size >= DIMENSION_LIMIT for size in t.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: the triton backend takes dimensions below "
                "2**31 - 2**16; run this on the reference backend (with "
                "fastae.use_backend('reference'): or fastae.set_backend('reference'))"
            )


def wide_shape(rows: int, cols: int) -> bool:
    """Whether an element offset of a contiguous (rows, cols) tensor can pass 2^31 - 1."""
    return rows * cols - 1 >= INDEX_LIMIT


def wide_columns(*tensors: torch.Tensor) -> bool:
    """Whether the column offset (columns - 1) * column stride of some 2-D tensor can pass
    2^31 - 1. The kernels compute row offsets in int64 but column offsets ``cols * stride`` in
    int32 (int64 offset tensors cost registers and spills in the GEMM loops); a kernel's
    ``WIDE_COLUMNS`` variant, chosen with this, widens the column index first. Only strided
    huge operands need it: a column-major x with B * d >= 2^31, a tied V = W^T with
    H * d >= 2^31; a contiguous tensor never does (its column stride is 1)."""
    return any(t.numel() > 0 and (t.shape[1] - 1) * t.stride(1) >= INDEX_LIMIT for t in tensors)


@triton.jit
def column_index(cols, WIDE_COLUMNS: tl.constexpr):
    """``cols`` as int64 in the ``WIDE_COLUMNS`` variant, else unchanged (int32)."""
    if WIDE_COLUMNS:
        cols = cols.to(tl.int64)
    return cols


def seed_pointer(seed, like: torch.Tensor) -> torch.Tensor:
    """The int64 scalar tensor the kernels read their Philox seed from, on ``like``'s device:
    ``seed`` itself when it is one there, else a tensor holding it. The seed stays in device
    memory (not a launch argument), so a CUDA graph that draws it replays a fresh draw each
    time."""
    if isinstance(seed, torch.Tensor):
        return seed if seed.device == like.device else seed.to(like.device)
    return torch.full((), seed, dtype=torch.int64, device=like.device)


def stat_buffer(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return empty(shape, like.device, reference.stat_dtype(like.dtype))


# Triton's interpreter runs a grid on one process-wide builder (its program ids among it):
# launches from several threads take turns
_INTERPRETER = threading.Lock()


def direct_launching() -> bool:
    """``FASTAE_DIRECT_LAUNCH=0`` sends every launch through Triton's own path
    (``kernel[grid](...)``) instead of :func:`launch`'s direct one. Default 1."""
    choice = os.environ.get("FASTAE_DIRECT_LAUNCH", "1")
    if choice not in ("0", "1"):
        raise ValueError(f"FASTAE_DIRECT_LAUNCH must be 0 or 1, got {choice!r}")
    return choice == "1"


# (kernel id, device, argument key, meta) -> the compiled kernel and what its launch needs;
# emptied when it reaches LAUNCH_KEYS entries (exact sizes are part of a key: a long-lived
# process that sees many batch sizes would otherwise keep one entry per size and kernel)
_launches: dict = {}
LAUNCH_KEYS = 4096
# kernel id -> (kernel, is-constexpr flag per parameter, positions of unspecialized
# parameters, number of leading runtime parameters), or None where the direct path does not
# apply (an interpreted kernel, per-launch hooks)
_parameters: dict = {}


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, from the second call on without Triton's launch path.

    Triton's ``JITFunction.run`` (and ``Autotuner.run`` before it) binds and specializes
    every argument, formats the compile options into a cache key and looks the kernel up on
    each call: about 20 us of host time a launch more than this path on a 2-core x86 CPU (a
    step of nine launches: 435 against 253 us, measured with a stand-in driver,
    ``bench/launch_time.py``). The first call with a given key goes through Triton
    (autotuning and compiling as usual), and its compiled kernel, config and trailing
    constexpr arguments are kept; later calls with the same key hand them to the compiled
    kernel's launcher directly, as Triton would.

    The key holds everything Triton specializes on, at least as finely: each tensor's dtype
    and data pointer modulo 16, each integer's value (its i32/i64/u64 range for
    ``do_not_specialize`` ones), the type of each other argument, the ``meta`` keywords, the
    kernel and the current device. The autotuner keys on a subset of these, so a key also
    fixes the config. Positional arguments must be the kernel's leading non-constexpr
    parameters and ``meta`` its constexprs (or launch options such as ``num_warps``); other
    calls, and calls under the interpreter, take Triton's path every time. Callable grids get
    the meta-parameters (the constexprs and the config), not the runtime arguments. Triton's
    global debug and instrumentation settings are read at a key's first call. ``meta``
    without ``enable_fp_fusion`` gets :data:`FP_FUSION`. Triton launches on the current CUDA
    device: a launch whose tensors are on another one runs under ``torch.cuda.device`` of
    theirs (a model on cuda:1 while cuda:0 is current).
    """
    meta.setdefault("enable_fp_fusion", FP_FUSION)
    index = _foreign_device(args)
    if index is not None:
        with torch.cuda.device(index):
            return launch(kernel, grid, *args, **meta)
    kept = _kept_launch(kernel, args, meta)
    if kept is None:
        if interpreting():
            with _INTERPRETER:
                return kernel[grid](*args, **meta)
        return kernel[grid](*args, **meta)
    key, entry = kept
    if entry is None:
        return _launch_and_keep(key, kernel, grid, args, meta, _parameters[id(kernel)][1])
    return _run_kept(entry, grid, args, key[1])


def _foreign_device(args) -> int | None:
    """The CUDA device of the launch's first tensor where it is not the current device (None
    for the current one and for CPU tensors, which the interpreter runs)."""
    for value in args:
        if isinstance(value, torch.Tensor):
            index = value.get_device()
            return None if index < 0 or index == torch.cuda.current_device() else index
    return None


def _kept_launch(kernel, args, meta):
    """(key, what a launch with it keeps or None), or None where the direct path does not
    apply (see :func:`launch`)."""
    parameters = _parameters.get(id(kernel), False)
    if parameters is False:
        parameters = _parameters[id(kernel)] = _direct_parameters(kernel)
    if parameters is None or not direct_launching():
        return None
    device = driver.active.get_current_device()
    key = _argument_key(args, parameters)
    if key is None:
        return None
    key = (id(kernel), device, key, *meta.items())
    return key, _launches.get(key)


def _run_kept(entry, grid, args, device):
    """The launch of a kept compiled kernel on ``device``, as Triton's launcher gets it."""
    compiled, run, tail, meta_parameters = entry
    if callable(grid):
        grid = grid(meta_parameters)
    stream = driver.active.get_current_stream(device)
    enter_hook, exit_hook = (
        _hook(knobs.runtime.launch_enter_hook),
        _hook(knobs.runtime.launch_exit_hook),
    )
    launch_metadata = None
    if enter_hook is not None or exit_hook is not None:
        launch_metadata = compiled.launch_metadata(grid, stream, *args, *tail)
    run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
        compiled.function, compiled.packed_metadata, launch_metadata, enter_hook, exit_hook,
        *args, *tail,
    )  # fmt: skip
    return compiled


def _hook(hook):
    """A launch hook, or None for none or an empty chain of them (Triton's default: the
    launcher would call it with metadata made for nothing)."""
    return None if hook is None or getattr(hook, "calls", None) == [] else hook


def _direct_parameters(kernel):
    function = kernel.fn if isinstance(kernel, Autotuner) else kernel
    if type(function) is not JITFunction or function.pre_run_hooks:
        return None
    if isinstance(kernel, Autotuner) and any(c.pre_hook for c in kernel.configs):
        return None  # hooks that run on every launch
    constexprs = tuple(p.is_constexpr for p in function.params)
    loose = tuple(i for i, p in enumerate(function.params) if p.do_not_specialize)
    leading = constexprs.index(True) if True in constexprs else len(constexprs)
    return kernel, constexprs, loose, leading


def _tensor_part(tensor):
    return tensor.dtype, tensor.data_ptr() % 16


# argument type -> its part of the key (types not listed take Triton's path)
_KEY_PARTS = {
    torch.Tensor: _tensor_part,
    torch.nn.Parameter: _tensor_part,
    int: lambda value: value,
    str: lambda value: value,  # an unspecialized integer's range, from _argument_key
    float: lambda value: float,  # always fp32
    bool: lambda value: (bool, value),
    type(None): lambda value: None,
}


def _argument_key(args, parameters):
    """What Triton's specialization of ``args`` depends on, or None if the direct path does
    not apply to them."""
    _, _, loose, leading = parameters
    if len(args) > leading:  # a constexpr passed by position
        return None
    values = list(args)
    for i in loose:
        if i < len(values) and type(values[i]) is int:
            value = values[i]
            values[i] = "i32" if -(2**31) <= value < 2**31 else "i64" if value < 2**63 else "u64"
    try:
        return tuple([_KEY_PARTS[type(value)](value) for value in values])
    except KeyError:
        return None


def _launch_and_keep(key, kernel, grid, args, meta, constexprs):
    """Triton's own launch; keeps what later calls with ``key`` need to repeat it."""
    calls = []

    def grid_of(bound):
        calls.append(bound)
        return grid(bound) if callable(grid) else grid

    compiled = kernel[grid_of](*args, **meta)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if compiled is None or not calls:  # a user's compile hook stopped the launch
        return compiled
    bound = calls[-1]
    if len(bound) == len(constexprs) and all(constexprs[len(args) :]):
        tail = tuple(bound.values())[len(args) :]
        # the grid's view of the launch: the meta-parameters only (keeps no tensor alive)
        meta_parameters = {
            name: value for (name, value), c in zip(bound.items(), constexprs, strict=True) if c
        }
        if len(_launches) >= LAUNCH_KEYS:
            _launches.clear()
        _launches[key] = (compiled, compiled.run, tail, meta_parameters)
    return compiled
