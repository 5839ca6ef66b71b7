"""A stand-in for Triton's CUDA driver: Triton's host-side launch path, without a GPU.

Kernels compile for an H100/H200 (sm_90, with the ptxas that Triton ships) and every launch
reaches a recording launcher instead of the device: nothing runs, outputs stay unwritten.
For measuring the host time of launches (``bench/launch_time.py``) and for
checking that fastae's direct launches hand the launcher exactly what Triton's own path does
(``tests/test_launch.py``). Tensors may live on the CPU; only their data pointers are used.

    with fake_driver.installed() as launches:
        ...  # launch kernels; launches.calls holds what reached the launcher
"""

from __future__ import annotations

import contextlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

TARGET = GPUTarget("cuda", 90, 32)
PROPERTIES = {
    "max_shared_mem": 232448,
    "multiprocessor_count": 132,
    "max_num_regs": 65536,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 3201000,
    "mem_bus_width": 6144,
}


class Launches:
    """What reached the launcher: (kernel name, grid, stream, function handle, packed
    metadata, arguments) per launch, while ``recording``."""

    def __init__(self):
        self.calls = []
        self.recording = True


class _Utils:
    def __init__(self):
        self.binaries = {}

    def load_binary(self, name, binary, shared, device):
        """(module, function, registers, spills, max threads); one handle per binary."""
        handle = self.binaries.setdefault(bytes(binary), len(self.binaries) + 1)
        return handle, handle, 0, 0, 1024

    def get_device_properties(self, device):
        return dict(PROPERTIES)


class _Driver:
    def __init__(self, launches: Launches):
        self.utils = _Utils()
        launches_ = launches

        class Launcher:
            def __init__(self, src, metadata):
                self.name = src.fn.__name__

            def __call__(self, grid_x, grid_y, grid_z, stream, function, packed, metadata,
                         enter_hook, exit_hook, *args):  # fmt: skip
                if enter_hook is not None:  # as Triton's launcher: the hooks around a launch
                    enter_hook(metadata)
                if launches_.recording:
                    launches_.calls.append(
                        (self.name, (grid_x, grid_y, grid_z), stream, function, packed, args)
                    )
                if exit_hook is not None:
                    exit_hook(metadata)

        self.launcher_cls = Launcher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return TARGET

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def _bench_nothing(self, *args, config, **meta):
    return [1.0, 1.0, 1.0]  # every config ties: the autotuner keeps the first


@contextlib.contextmanager
def installed():
    """Makes the fake driver Triton's active one (autotuning times nothing) while inside."""
    launches = Launches()
    saved_bench, saved_driver = Autotuner._bench, driver._active  # None: not created yet
    driver.set_active(_Driver(launches))
    Autotuner._bench = _bench_nothing
    try:
        yield launches
    finally:
        Autotuner._bench = saved_bench
        driver._active = saved_driver
