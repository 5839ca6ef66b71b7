"""Direct kernel launches (``kernels.common.launch``): the same compiled kernel, grid and
arguments as Triton's own launch path, without its per-call host time."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastae

pytest.importorskip("triton")
from fastae.kernels import common  # noqa: E402

CHECK = Path(__file__).with_name("launch_check.py")


def test_direct_launches_match_tritons():
    """Every launcher of fastae, compiled for sm_90 against a stand-in driver: call for call,
    the direct path hands the launcher what Triton's path does (kernel, grid, arguments),
    over inputs that Triton specializes differently, and skips Triton's path once a key is
    known, and launches an unsplit weight gradient without its split-K buffers; every kernel
    asks for fused multiply-add, whatever Triton's default (tests/launch_check.py; a
    subprocess, as the interpreter is off there)."""
    unset = ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["FASTAE_AUTOTUNE"] = "0"  # one config a kernel: compiling dominates this test
    result = subprocess.run(
        [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "launches compared:" in result.stdout
    assert "fused multiply-add: True in every kernel kept" in result.stdout
    assert "_encoder_forward_kernel" in result.stdout and "_decoder_forward_kernel" in result.stdout
    assert "split-K: kept unsplit kernels launched with placeholders" in result.stdout


KERNEL_PARAMETERS = (None, (False,) * 6 + (True,), (4,), 6)  # 6 runtime, 1 constexpr; 4 loose


def key(*args):
    return common._argument_key(args, KERNEL_PARAMETERS)


def test_key_tells_apart_what_triton_specializes_on():
    x = torch.randn(8, 8)
    unaligned = torch.randn(65)[1:].view(8, 8)
    base = key(x, 16, 1.5, True, 7, None)
    assert base == key(x.clone(), 16, 0.5, True, 123, None)  # floats and seeds: one kernel
    assert base != key(unaligned, 16, 1.5, True, 7, None)  # alignment
    assert base != key(x.double(), 16, 1.5, True, 7, None)  # dtype
    assert base != key(x, 17, 1.5, True, 7, None)  # a specialized integer's value
    assert base != key(x, 16, 1.5, False, 7, None)
    assert base != key(x, 16, 1.5, True, 2**31, None)  # i32 -> i64
    assert key(x, 16, 1.5, True, 2**31, None) != key(x, 16, 1.5, True, 2**63, None)  # -> u64
    assert key(x, 16, 1.5, True, -(2**31) - 1, None) == key(x, 16, 1.5, True, 2**40, None)
    # 1, 1.0 and True are equal in Python; their key parts are not
    assert len({key(x, 1, 1.0, 1, 7, None), key(x, 1, 1, 1, 7, None)}) == 2
    assert key(x, 1, 1.0, True, 7, None) != key(x, 1, 1.0, 1, 7, None)


def test_key_refuses_what_it_cannot_vouch_for():
    x = torch.randn(4, 4)
    assert key(x, 16, 1.5, True, 7, None, 3) is None  # a constexpr passed by position
    assert key(x, torch.tensor(3).numpy(), 1.5, True, 7, None) is None  # a numpy scalar
    assert key(x, (1, 2), 1.5, True, 7, None) is None


def test_elementwise_grids_fit_cudas_axis_limits():
    """The elementwise kernels' grid (common.grid_tiles) holds every tile on axis 0, which
    takes up to 2^31 - 1 blocks: CUDA caps axes 1 and 2 at 65,535, which column blocks 64
    wide pass from d = 4.2 M on (a 1450 x 1450 RGB image, say)."""
    meta = {"BLOCK_M": 16, "BLOCK_N": 64}
    for rows, cols in [(1, 1450 * 1450 * 3), (4096, 10**7), (10**7, 1), (33, 70)]:
        grid = common.grid_tiles(rows, cols)(meta)
        assert len(grid) == 1 and grid[0] == common.cdiv(rows, 16) * common.cdiv(cols, 64)
        assert grid[0] < 2**31


def test_a_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a launch whose first tensor is on another
    one runs under torch.cuda.device of that one (here with cuda:1's tensor and cuda:0
    current, both faked), and one on the current device without the guard."""
    entered, launched = [], []

    @contextlib.contextmanager
    def on_device(index):
        entered.append(index)
        current = current_device[0]
        current_device[0] = index
        try:
            yield
        finally:
            current_device[0] = current

    current_device = [0]
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device[0])

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(current_device[0])

    x = torch.zeros(2)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)
    common.launch(Kernel(), (1,), x, 3)
    common.launch_split_k(Kernel(), (1,), (x,), lambda placeholders=False: (), (3,))
    assert entered == [1, 1] and launched == [1, 1]
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    common.launch(Kernel(), (1,), x, 3)
    assert entered == [1, 1] and launched == [1, 1, 0]


def test_direct_launch_switch(monkeypatch):
    monkeypatch.setenv("FASTAE_DIRECT_LAUNCH", "0")
    assert not common.direct_launching()
    monkeypatch.setenv("FASTAE_DIRECT_LAUNCH", "yes")
    with pytest.raises(ValueError, match="FASTAE_DIRECT_LAUNCH"):
        common.direct_launching()
    monkeypatch.delenv("FASTAE_DIRECT_LAUNCH")
    assert common.direct_launching()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_launch_equals_tritons_on_cuda(monkeypatch, dtype):
    """On a GPU, with the real driver: training steps of an autoencoder with all three
    regularizers and of a VAE give the same bits through fastae's direct launch as through
    Triton's own path, and a second direct pass never enters Triton's launch path.
    bench/gpu_check.sh runs this first and benchmarks Triton's path where it fails."""
    from triton.runtime.jit import JITFunction

    def steps() -> list[torch.Tensor]:
        torch.manual_seed(0)  # the noise's and the VAE's Philox seeds are drawn on the GPU
        x = torch.rand(96, 64, device="cuda", dtype=dtype)
        models = [
            fastae.Autoencoder(
                64, 48, noise=fastae.MaskingNoise(0.25),
                sparsity=fastae.KLSparsity(0.05, 0.1), contractive=0.1,
            ),
            fastae.VAE(64, 48, 16),
        ]  # fmt: skip
        results = []
        for model in models:
            model = model.to("cuda", dtype)
            loss = model(x).loss
            loss.backward()
            results += [loss.detach(), *(p.grad for p in model.parameters())]
        return results

    monkeypatch.setenv("FASTAE_DIRECT_LAUNCH", "0")
    tritons = steps()
    monkeypatch.setenv("FASTAE_DIRECT_LAUNCH", "1")
    first = steps()  # a key's first call goes through Triton's path and keeps its kernel
    entered = []
    tritons_run = JITFunction.run

    def counted(self, *args, **kwargs):
        entered.append(self)
        return tritons_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    second = steps()
    assert not entered, f"the second direct pass entered Triton's launch path {len(entered)} times"
    assert len(tritons) == 2 + 3 + 8  # two losses, the parameters' gradients
    for i, (want, a, b) in enumerate(zip(tritons, first, second, strict=True)):
        assert torch.equal(a, want) and torch.equal(b, want), f"result {i} differs"
