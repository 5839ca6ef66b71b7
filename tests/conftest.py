import contextlib
import os
import re
import zlib

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the variable must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use small tensors, where one intra-op thread is fastest and immune to a busy
# machine's oversubscription (two threads on two loaded cores make each tiny op slow).
torch.set_num_threads(1)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from packaging.version import Version  # noqa: E402

from fastae.backend import triton_interpreting, triton_missing  # noqa: E402

# Property tests: a small profile for CI, FASTAE_HYPOTHESIS_PROFILE=long for a thorough run.
_slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=12, deadline=None, suppress_health_check=_slow_ok)
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=_slow_ok)
settings.load_profile(os.environ.get("FASTAE_HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _interpret_products_as_a_gpu_does() -> None:
    """Make Triton's interpreter multiply and round as an NVIDIA GPU does, so the tests check
    the kernels' bfloat16 and tf32 paths on the CPU too.

    bfloat16: the interpreter keeps values as their uint16 bit patterns, multiplies those bit
    patterns in ``tl.dot`` (only 8-bit floats are converted first; triton-lang/triton#11584,
    not supported upstream) and rounds float32 to bfloat16 toward zero: garbage products and
    biased sums. Here bfloat16 operands are widened to float32 first (exact: the bits shifted
    into the high half; tensor cores multiply bfloat16 exactly into float32 sums), and float32
    rounds to the nearest bfloat16, ties to even.

    tf32: the interpreter multiplies float32 exactly whatever the input precision. Here a
    ``tf32`` product drops each float32 operand's low 13 mantissa bits first, as the tensor
    cores read them from Triton's kernels (which do not round them: triton-lang/triton#4574),
    so a product that should be IEEE float32 but is not shows as tf32 error."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    product, cast = builder.create_dot, builder.cast_impl

    def operand(handle, input_precision):
        if handle.dtype == tl.bfloat16:
            widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened, tl.float32)
        if handle.dtype == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            bits = np.ascontiguousarray(handle.data, dtype=np.float32).view(np.uint32)
            return interpreter.TensorHandle(
                (bits & np.uint32(0xFFFFE000)).view(np.float32), tl.float32
            )
        return handle

    def create_dot(self, a, b, d, input_precision, *args):
        a, b = operand(a, input_precision), operand(b, input_precision)
        return product(self, a, b, d, input_precision, *args)

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return cast(self, src, dst_type)
        values = np.ascontiguousarray(src.data, dtype=np.float32)
        bits = values.view(np.uint32)
        # round to nearest even: add 0x7FFF plus the lowest kept bit, then drop 16 bits
        nearest = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x40).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(values), quiet_nan, nearest), tl.bfloat16)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


if triton_interpreting():
    with contextlib.suppress(ImportError):  # no Triton: the kernel tests skip themselves
        _interpret_products_as_a_gpu_does()


def pytest_configure(config):
    """Triton's interpreter before 3.7 turns loop bounds into 1-element arrays, which numpy 2.4
    and newer refuse to convert to int: every interpreted kernel would fail with "only
    0-dimensional arrays can be converted to Python scalars". Say so once instead."""
    if not triton_interpreting():
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    old_interpreter = Version(triton.__version__) < Version("3.7")
    if old_interpreter and Version(numpy.__version__) >= Version("2.4"):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails under numpy "
            f"{numpy.__version__}: install 'numpy<2.4' or 'triton>=3.7'"
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped without a CUDA device. Every test that needs one carries
    the mark (a skip condition whose reason names CUDA or a GPU without it is an error), so
    ``pytest -m cuda`` selects them all: bench/gpu_check.sh runs them first. Tests of the
    triton backend are skipped without Triton."""
    needs_cuda = pytest.mark.skip(reason="needs a CUDA device")
    triton_absent = triton_missing()
    needs_triton = pytest.mark.skip(reason=triton_absent or "Triton")
    for item in items:
        marked = item.get_closest_marker("cuda") is not None
        for mark in item.iter_markers("skipif"):
            if not marked and re.search("cuda|gpu", str(mark.kwargs.get("reason")), re.I):
                raise pytest.UsageError(
                    f"{item.nodeid}: a test that needs CUDA takes @pytest.mark.cuda (which "
                    "skips it without a CUDA device), not a skipif of its own"
                )
        if marked and not torch.cuda.is_available():
            item.add_marker(needs_cuda)
        if triton_absent and _runs_the_triton_backend(item):
            item.add_marker(needs_triton)
    _select_shard(config, items)


def _runs_the_triton_backend(item) -> bool:
    """Whether ``item`` is parametrized with the triton backend (``backend`` or
    ``backend_name``): without Triton installed (no 'fastae[triton]') it is skipped, as the
    kernel test modules skip themselves."""
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    return "triton" in (params.get("backend"), params.get("backend_name"))


def _select_shard(config, items) -> None:
    """Under ``FASTAE_TEST_SHARD=k/n`` (tests/parallel.py) only the tests whose id hashes to k
    modulo n run: n processes given k = 0..n-1 run the suite between them, each test once,
    whatever order each collects them in."""
    shard = os.environ.get("FASTAE_TEST_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    mine = [zlib.crc32(item.nodeid.encode()) % count == index for item in items]
    config.hook.pytest_deselected(items=[t for t, m in zip(items, mine, strict=True) if not m])
    items[:] = [t for t, m in zip(items, mine, strict=True) if m]


@pytest.fixture
def kernel_device():
    """Where the triton backend's tensors live: the GPU where there is one (and Triton
    compiles for it), else the CPU (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_inputs(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts with the default backend choice."""
    import fastae.backend as backend

    saved = list(backend._override)
    backend._override.clear()
    yield
    backend._override[:] = saved


@pytest.fixture(autouse=True)
def _fused_kernels(request, monkeypatch):
    """Modules with ``FUSED_KERNELS = True`` check the fused GEMM kernels at odd shapes and the
    memory-free path of a noisy encode (noise drawn inside the encoder GEMMs and again in
    backward), so they select both: by default d or H not a multiple of 16 takes cuBLAS's
    products, and encode corrupts x in one pass and keeps x~. A test may set its own."""
    if getattr(request.module, "FUSED_KERNELS", False):
        monkeypatch.setenv("FASTAE_CORRUPTED_INPUT", "regenerate")
        monkeypatch.setenv("FASTAE_ENCODER_FUSION", "gemm")
        monkeypatch.setenv("FASTAE_DECODER_FUSION", "gemm")


@pytest.fixture
def spy_launches(monkeypatch):
    """``spy_launches(module, name)``: a list that receives the ``name`` keyword (None if
    absent) of every kernel launch through ``module.launch`` from then on, in order."""

    def install(module, name):
        seen = []
        real_launch = module.launch

        def spy(kernel, grid, *args, **meta):
            seen.append(meta.get(name))
            return real_launch(kernel, grid, *args, **meta)

        monkeypatch.setattr(module, "launch", spy)
        return seen

    return install


@pytest.fixture
def launched_kernels(monkeypatch):
    """A list that receives the name of every Triton kernel fastae launches from then on.
    Every kernel module is imported first: one imported while the spy is in place would keep
    it as its ``launch``."""
    from fastae.kernels import common, decoder, encoder, noise, sparsity, vae

    names = []
    real_launch = common.launch

    def spy(kernel, grid, *args, **meta):
        names.append(getattr(kernel, "fn", kernel).__name__)  # an autotuner holds its kernel
        return real_launch(kernel, grid, *args, **meta)

    for module in (common, encoder, decoder, noise, sparsity, vae):
        monkeypatch.setattr(module, "launch", spy)
    return names


@pytest.fixture
def split_k(monkeypatch):
    """``split_k(module, kernel, split, dtype=torch.float64)``: ``kernel`` (a weight-gradient
    kernel of ``module``) runs its first config with SPLIT = ``split`` (on a GPU, fitted to
    its shared memory for ``dtype`` operands), split-K allowed at every shape; returns what
    its launches got: ``tickets``, their ticket buffers (each must be back at zero after a
    launch), and ``splits``, the SPLIT each ran (compiled kernels the direct launch kept are
    dropped first: one kept for another SPLIT would serve launches of the same arguments)."""
    import types

    from fastae.kernels import common

    def install(module, kernel, split, dtype=torch.float64):
        config = kernel.configs[0]
        blocks = dict(config.kwargs, SPLIT=split)
        config = type(config)(blocks, num_stages=config.num_stages, num_warps=config.num_warps)
        if not triton_interpreting():
            # Triton prunes (here: fits the GPU's shared memory for the dtype) only a list of
            # configs; the weight gradients' products are BLOCK_N x BLOCK_K over BLOCK_M
            import triton

            properties = triton.runtime.driver.active.utils.get_device_properties(
                torch.cuda.current_device()
            )
            element_size = torch.empty((), dtype=dtype).element_size()
            names = ("BLOCK_N", "BLOCK_K", "BLOCK_M")
            (config,) = common.fit_shared_memory(
                [config], names, element_size, properties["max_shared_mem"]
            )
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(common, "SPLIT_MIN_BATCH", 1)
        monkeypatch.setattr(common, "SPLIT_MAX_TILES", 10**9)
        monkeypatch.setattr(common, "_launches", {})
        launched = types.SimpleNamespace(tickets=[], splits=[])

        def buffers(*args, **kwargs):
            out = common.split_k_buffers(*args, **kwargs)
            launched.tickets.append(out[-1])
            return out

        def grid(*args):
            made = common.grid_split_k(*args)

            def recorded(meta):
                launched.splits.append(meta["SPLIT"])
                return made(meta)

            return common.Grid(recorded)

        monkeypatch.setattr(module, "split_k_buffers", buffers)
        monkeypatch.setattr(module, "grid_split_k", grid)
        return launched

    return install
