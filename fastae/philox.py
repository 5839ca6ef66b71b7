"""Philox-4x32-10 in plain torch, bit-identical to Triton's ``tl.randint4x``/``tl.rand``.

Triton (triton/language/random.py) runs Philox on the counter
(c0, c1, c2, c3) = (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi), ten rounds, and
maps a word u to a float in [0, 1) as  float32(u' ) * 4.6566127342e-10,  u' = u if u < 2^31
else ~u  (u read as int32).  ``tl.randn`` applies Box-Muller to the first two uniforms.
On the CPU the rounds run in numpy uint64 (a 32 x 32-bit product fits exactly); on other
devices every uint32 lives in an int64 tensor and products are split into 16-bit halves so no
intermediate exceeds 2^50 (torch has no uint64 shifts). Both give the same words.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2^31 - 1) * s < 1 in float32


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of const * x for uint32 ``const`` and ``x`` (int64 tensor)."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    low_part = c_lo * x_lo
    mid = c_hi * x_lo + c_lo * x_hi
    # const * x = c_hi*x_hi*2^32 + mid*2^16 + low_part
    low_sum = (mid & 0xFFFF) * 65536 + low_part
    lo = low_sum & _MASK32
    hi = (c_hi * x_hi + (mid >> 16) + (low_sum >> 32)) & _MASK32
    return hi, lo


def randint4x(seed: int, offsets: torch.Tensor, count: int = 4) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (as int64 tensors) per offset of ``tl.randint4x(seed, offsets)``,
    or the first ``count`` of them (``tl.rand`` reads one, ``tl.randn`` two)."""
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    _check_count(count)
    if offsets.device.type == "cpu":
        return _randint4x_numpy(seed, offsets, count)
    return _randint4x_torch(seed, offsets)[:count]


# Elements per block of the numpy rounds: the seven uint64 work arrays of a block (896 KB)
# stay in a 1 MB L2 cache, and the rounds run in place (twice as fast as whole-array
# temporaries on a 256 x 784 tensor; 65536 ran 5-10% slower on a 1 MB L2, 4096 pays numpy's
# per-call cost: 1.5x slower).
_NUMPY_BLOCK = 16384


def _check_count(count: int) -> None:
    if count not in (1, 2, 3, 4):
        raise ValueError(f"count must be 1, 2, 3 or 4, got {count!r}")


def _round_keys(seed: int) -> list[tuple[np.uint64, np.uint64]]:
    keys, k0, k1 = [], seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        keys.append((np.uint64(k0), np.uint64(k1)))
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return keys


def _randint4x_numpy(seed: int, offsets: torch.Tensor, count: int = 4) -> tuple[torch.Tensor, ...]:
    counter = offsets.detach().contiguous().numpy().view(np.uint64).reshape(-1)  # offsets >= 0
    words = _numpy_words(seed, counter, count)
    return tuple(torch.from_numpy(w.view(np.int64).reshape(offsets.shape)) for w in words)


def _numpy_words(seed: int, counter: np.ndarray, count: int) -> np.ndarray:
    """(count, n) uint64: the first ``count`` words at the uint64 offsets ``counter``."""
    words = np.empty((count, counter.size), dtype=np.uint64)
    _philox_rounds(counter, _round_keys(seed), words)
    return words


def _philox_rounds(counter: np.ndarray, keys: list, words: np.ndarray) -> None:
    """Philox on the counters (lo, hi, 0, 0) of ``counter`` (uint64 offsets) into ``words``
    (count, n): the first ``count`` output words; the last round computes only those."""
    count = words.shape[0]
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    round_a, round_b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    work = np.empty((7, min(counter.size, _NUMPY_BLOCK)), dtype=np.uint64)
    for start in range(0, counter.size, _NUMPY_BLOCK):
        stop = min(start + _NUMPY_BLOCK, counter.size)
        c0, c1, c2, c3, prod_a, prod_b, spare = (row[: stop - start] for row in work)
        # round 1: c2 = c3 = 0, so (c0, c1, c2, c3) <- (hi ^ k0, 0, hi(A lo) ^ k1, lo(A lo))
        k0, k1 = keys[0]
        np.bitwise_and(counter[start:stop], mask, out=spare)
        np.multiply(spare, round_a, out=prod_a)
        np.right_shift(counter[start:stop], shift, out=c0)
        c0 ^= k0
        c1.fill(0)
        np.right_shift(prod_a, shift, out=c2)
        c2 ^= k1
        np.bitwise_and(prod_a, mask, out=c3)
        for round_index in range(1, N_ROUNDS):
            k0, k1 = keys[round_index]
            last = round_index == N_ROUNDS - 1
            # (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0))
            np.multiply(c2, round_b, out=prod_b)
            np.right_shift(prod_b, shift, out=spare)
            spare ^= c1
            spare ^= k0
            if not last or count > 1:
                np.bitwise_and(prod_b, mask, out=c1)
            if not last or count > 2:
                np.multiply(c0, round_a, out=prod_a)
                np.right_shift(prod_a, shift, out=c2)
                c2 ^= c3
                c2 ^= k1
                np.bitwise_and(prod_a, mask, out=c3)
            c0, spare = spare, c0
        words[:, start:stop] = (c0, c1, c2, c3)[:count]


def _randint4x_torch(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1) from uint32 words, as Triton's ``uint_to_uniform_float``."""
    signed = words.to(torch.int32)  # the low 32 bits read as int32 (the cast wraps)
    folded = signed ^ (signed >> 31)  # ~x = x ^ -1 for negative x, x ^ 0 otherwise
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """First Box-Muller normal, as Triton's ``pair_uniform_to_normal`` (float32).

    On the CPU log, sqrt and cos are numpy's float32 functions — what Triton's interpreter
    evaluates ``tl.randn`` with — so the result equals the interpreted kernel's bit for bit;
    on GPUs torch's (equal to the compiled kernel's up to libm rounding, about 1 ulp).
    """
    if u1.device.type == "cpu":
        return torch.from_numpy(_numpy_box_muller(u1.numpy(), u2.numpy()))
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = 6.283185307179586 * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta)


def _numpy_box_muller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    radius = np.sqrt(np.float32(-2.0) * np.log(np.maximum(a, np.float32(1.0e-7))))
    return radius * np.cos(np.float32(6.283185307179586) * b)


def _numpy_uniform(words: np.ndarray) -> np.ndarray:
    """:func:`uint_to_uniform` of uint64-held words, in numpy (the same float32 operations)."""
    signed = words.astype(np.uint32).view(np.int32)
    return (signed ^ (signed >> 31)).astype(np.float32) * np.float32(_UNIFORM_SCALE)


def element_offsets(rows: int, cols: int, device: torch.device, base: int = 0) -> torch.Tensor:
    """The logical offsets base + row * cols + col of a (rows, cols) tensor, as int64."""
    row = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1)
    col = torch.arange(cols, device=device, dtype=torch.int64)
    return base + row * cols + col


def element_uniforms(
    seed: int, rows: int, cols: int, device: torch.device, base: int = 0, count: int = 1
) -> tuple[torch.Tensor, ...]:
    """float32 uniforms (rows, cols) of the first ``count`` Philox words at the element offsets
    base + row * cols + col: the first is ``tl.rand(seed, offsets)``. On the CPU every step
    runs in numpy and only the results become tensors: under a torch.func transform every
    tensor made is a wrapper, whose values numpy cannot read."""
    if device.type != "cpu":
        words = randint4x(seed, element_offsets(rows, cols, device, base), count)
        return tuple(uint_to_uniform(w) for w in words)
    return tuple(torch.from_numpy(u) for u in _numpy_uniforms(seed, rows, cols, base, count))


def element_normals(
    seed: int, rows: int, cols: int, device: torch.device, base: int = 0
) -> torch.Tensor:
    """float32 normals (rows, cols): ``tl.randn(seed, offsets)`` at the element offsets
    base + row * cols + col (see :func:`box_muller`), from numpy on the CPU as
    :func:`element_uniforms`."""
    if device.type != "cpu":
        return randn(seed, element_offsets(rows, cols, device, base))
    return torch.from_numpy(_numpy_box_muller(*_numpy_uniforms(seed, rows, cols, base, 2)))


def _numpy_uniforms(seed: int, rows: int, cols: int, base: int, count: int) -> list[np.ndarray]:
    _check_count(count)
    words = _numpy_words(seed, np.arange(base, base + rows * cols, dtype=np.uint64), count)
    return [_numpy_uniform(w).reshape(rows, cols) for w in words]


def rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float32, equal bit for bit to ``tl.rand(seed, offsets)``."""
    return uint_to_uniform(randint4x(seed, offsets, count=1)[0])


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 as ``tl.randn(seed, offsets)`` (see :func:`box_muller`)."""
    w0, w1 = randint4x(seed, offsets, count=2)
    return box_muller(uint_to_uniform(w0), uint_to_uniform(w1))
