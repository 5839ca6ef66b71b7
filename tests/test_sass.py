"""The matrix-product kernels' machine code for Hopper (sm_90), read without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = Path(__file__).with_name("sass_check.py")


def test_products_run_on_tensor_cores_asynchronously_without_spills():
    """Each product kernel's first config in bfloat16 (tests/sass_check.py; a subprocess, as
    the interpreter is off there): HGMMA instructions, one product kept in flight while the
    next tiles load, no local-memory spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTAE_AUTOTUNE"] = "0"
    result = subprocess.run(
        [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok ") >= 8, result.stdout  # every kernel variant launched


def test_tf32_weight_gradients_load_one_element_per_copy():
    """What the fusion rules assume in tf32 (tests/sass_check.py --dtype tf32): the encoder's
    forward fills shared memory with 16-byte copies, the weight gradients and a tied
    decoder's forward with 4-byte ones (operands strided along the reduction dimension),
    the products that the rules hand to cuBLAS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTAE_AUTOTUNE"] = "0"
    result = subprocess.run(
        [sys.executable, str(CHECK), "--dtype", "tf32"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("ok ") >= 12, result.stdout  # every kernel variant launched
