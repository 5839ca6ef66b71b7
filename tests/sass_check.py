"""Run by tests/test_sass.py in a subprocess, with Triton compiling (not interpreting) for a
stand-in driver (bench/fake_driver.py): every matrix-product kernel of fastae, compiled for
sm_90 in bfloat16 at its first config (``FASTAE_AUTOTUNE=0``) for a shape whose d and H are
multiples of 16 (elsewhere the fusion rules take cuBLAS's products: ``product_aligned``),
disassembled with the ``cuobjdump`` that Triton ships. Each must multiply on Hopper's tensor
cores (``HGMMA``), keep one product in flight while the next tiles load (a
``WARPGROUP.DEPBAR.LE gsb0, 0x1`` wait in its loop, not only waits for zero), and keep its
registers out of local memory (no stack frame). The one exception: dV with a per-sample
weight, whose G tiles are scaled in registers on their way to the tensor cores, a product
Triton does not keep in flight. Exit status 0: all held; it prints one line per kernel
variant.

``--dtype tf32`` compiles them for float32 with tf32 products instead and checks what the
fusion rules assume there (``common.tf32_products``): the encoder's forward, whose operands
are contiguous along the reduction dimension, fills shared memory with 16-byte copies only,
and the weight gradients (dW, dV), whose operands never are, with 4-byte copies (one
element each), which the rules hand to cuBLAS. If a Triton version vectorizes those, the
check fails and the rules should be measured again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import fake_driver  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from fastae.kernels import common, decoder, encoder  # noqa: E402

CUOBJDUMP = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
PRODUCT_KERNELS = {
    encoder: (
        "_encoder_forward_kernel",
        "_encoder_grad_weight_kernel",
        "_encoder_grad_input_kernel",
    ),
    decoder: (
        "_decoder_forward_kernel",
        "_decoder_grad_weight_kernel",
        "_decoder_grad_code_kernel",
    ),
}
# (kernel, constexpr name, value) whose products may wait for zero: G scaled in registers
SERIAL = {("_decoder_grad_weight_kernel", "UNIFORM", False)}
# in tf32, whether a kernel fills shared memory with 4-byte copies (an operand strided along
# the reduction dimension), by its compiled constants (Triton specializes a stride of 1);
# None: not checked
TF32_NARROW_COPIES = {
    "_encoder_forward_kernel": lambda constants: False,
    "_encoder_grad_weight_kernel": lambda constants: True,
    "_decoder_forward_kernel": lambda constants: constants.get("stride_vk") != 1,  # tied: V^T = W
    "_decoder_grad_weight_kernel": lambda constants: True,
}
VARIANT_FLAGS = ("STATISTICS", "HAS_GRAD_JAC", "UNIFORM", "SPLIT")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", re.MULTILINE)


def launch_every_product(batch: int, features: int, hidden: int, dtype: torch.dtype) -> None:
    x, weight = (
        torch.randn(batch, features, dtype=dtype),
        torch.randn(hidden, features, dtype=dtype),
    )
    for statistics in (True, False):
        h, _, _, stats = encoder.encode_forward(
            x, weight, weight[:, 0], "sigmoid", "none", 0.0, 0.0, 1.0, 0, statistics
        )
        grad_rho, grad_jac = (torch.randn(hidden), torch.randn(())) if statistics else (None, None)
        encoder.encode_backward(
            torch.randn_like(h), grad_rho, grad_jac, x, weight, h, stats,
            "sigmoid", "none", 0.0, 0.0, 1.0, 0, True,
        )  # fmt: skip
    _, grad_z = decoder.decode_forward(h, weight.t(), None, x, "sigmoid", "bce")
    untied = torch.randn(features, hidden, dtype=dtype)  # V^T contiguous along H
    decoder.decode_forward(h, untied, None, x, "sigmoid", "bce")
    for grad_loss in (torch.rand(()).expand(batch), torch.rand(batch)):
        decoder.decode_backward(grad_loss, h, weight.t(), grad_z, True)
    # the weight gradients' split-K variant (the first config with SPLIT = 2), at any shape
    common.SPLIT_MIN_BATCH, common.SPLIT_MAX_TILES = 1, 10**9
    for kernel in (encoder._encoder_grad_weight_kernel, decoder._decoder_grad_weight_kernel):
        first = kernel.configs[0]
        blocks = dict(first.kwargs, SPLIT=2)
        config = triton.Config(blocks, num_stages=first.num_stages, num_warps=first.num_warps)
        kernel.configs = [config, config]  # Triton prunes (fits shared memory) only a list
        kernel.cache.clear()  # the SPLIT = 1 config chosen for this shape above
    common._launches.clear()
    h, _, _, stats = encoder.encode_forward(
        x, weight, weight[:, 0], "sigmoid", "none", 0.0, 0.0, 1.0, 0, True
    )
    encoder.encode_backward(
        torch.randn_like(h), torch.randn(hidden), torch.randn(()), x, weight, h, stats,
        "sigmoid", "none", 0.0, 0.0, 1.0, 0, False,
    )  # fmt: skip
    for grad_loss in (torch.rand(()).expand(batch), torch.rand(batch)):
        decoder.decode_backward(grad_loss, h, weight.t(), grad_z, False)


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS, resource usage) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        outputs = []
        for flag in ("-sass", "-res-usage"):
            command = [str(CUOBJDUMP), flag, str(path)]
            outputs.append(subprocess.run(command, capture_output=True, text=True, check=True))
        return outputs[0].stdout, outputs[1].stdout


def corrupt_instructions() -> int:
    """``--corrupt``: instructions per element of the standalone corrupt kernel (its first
    config, float32), per noise kind: what one Philox draw per element costs, against a copy's
    one load and one store. Prints one line per kind; no judgement."""
    from fastae.kernels import noise

    x = torch.rand(8192, 4096)
    with fake_driver.installed():
        for kind in ("masking", "salt_pepper", "gaussian"):
            noise.corrupt(x, kind, 0.3, 0.0, 1.0, torch.tensor(5))
    jit = noise._corrupt_kernel.fn
    for kernel in [k for caches in jit.device_caches.values() for k in caches[0].values()]:
        constants = {jit.arg_names[i[0]]: v for i, v in kernel.src.constants.items()}
        sass, _ = disassemble(kernel.asm["cubin"])
        total = len(INSTRUCTION.findall(sass))
        per_thread = constants["BLOCK_M"] * constants["BLOCK_N"] // (32 * kernel.metadata.num_warps)
        multiplies = len(re.findall(r"\bIMAD(?:\.HI|\.WIDE)?(?:\.U32)?\s", sass))
        kind = {v: k for k, v in common.NOISE_CODES.items()}[constants["NOISE"]]
        print(
            f"_corrupt_kernel {kind} {constants['BLOCK_M']}x{constants['BLOCK_N']}: "
            f"{total} instructions for {per_thread} elements a thread, "
            f"{total / per_thread:.0f} an element "
            f"({multiplies / per_thread:.0f} integer multiplies)"
        )
    return 0


def main(argv: list[str]) -> int:
    """``sass_check.py [BxDxH] [--dtype bf16|tf32]``: the kernels compiled for that shape
    (default 200x384x528: d and H multiples of 16, where the fusion rules take these
    kernels). ``sass_check.py --corrupt``: see :func:`corrupt_instructions`."""
    if "--corrupt" in argv:
        return corrupt_instructions()
    tf32 = "--dtype" in argv and argv[argv.index("--dtype") + 1] == "tf32"
    shape = [a for a in argv if "x" in a and a[0].isdigit()]
    batch, features, hidden = map(int, (shape[0] if shape else "200x384x528").split("x"))
    for name in ("FASTAE_ENCODER_FUSION", "FASTAE_DECODER_FUSION"):
        os.environ[name] = "gemm"
    torch.set_float32_matmul_precision("high")  # tf32 products for float32
    with fake_driver.installed():
        launch_every_product(batch, features, hidden, torch.float32 if tf32 else torch.bfloat16)
    failures = 0
    for module, names in PRODUCT_KERNELS.items():
        for name in names:
            jit = getattr(module, name).fn  # under the autotuner
            compiled = [k for caches in jit.device_caches.values() for k in caches[0].values()]
            if not compiled:
                print(f"{name}: not compiled")
                failures += 1
            for kernel in compiled:
                constants = {jit.arg_names[i[0]]: v for i, v in kernel.src.constants.items()}
                sass, usage = disassemble(kernel.asm["cubin"])
                products = len(re.findall(r"\bHGMMA\.", sass))
                in_flight = "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
                stack = int(re.search(r"STACK:(\d+)", usage).group(1))
                registers = int(re.search(r"REG:(\d+)", usage).group(1))
                serial = any((name, key, value) in SERIAL for key, value in constants.items())
                flags = {k: v for k, v in constants.items() if k in VARIANT_FLAGS}
                blocks = "x".join(str(v) for k, v in constants.items() if k.startswith("BLOCK"))
                narrow = len(re.findall(r"LDGSTS\.E\s", sass))  # 4-byte async copies
                if tf32:  # what the fusion rules assume (see the module's docstring)
                    expected = TF32_NARROW_COPIES.get(name, lambda constants: None)(constants)
                    ok = products > 0 and expected in (None, narrow > 0)
                else:
                    ok = products > 0 and (in_flight or serial) and stack == 0
                failures += not ok
                print(
                    f"{'ok ' if ok else 'BAD'} {name} {flags} {blocks}: HGMMA {products}, a "
                    f"product in flight {in_flight}, stack {stack} bytes; instructions "
                    f"{len(INSTRUCTION.findall(sass))}, async 16-byte copies "
                    f"{sass.count('LDGSTS.E.BYPASS.128')}, 4-byte async copies {narrow}, "
                    f"2-byte loads {sass.count('LDG.E.U16')}, registers {registers}"
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
