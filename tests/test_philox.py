"""Philox-4x32-10 in plain torch (fastae.philox) against a pure-Python oracle, the Random123
known-answer vector, and Triton's own ``tl.randint4x`` / ``tl.rand`` / ``tl.randn``."""

import importlib.util
import math
import os

import pytest
import torch

from fastae import philox

MASK32 = 0xFFFFFFFF


def python_philox(seed: int, offset: int) -> tuple[int, int, int, int]:
    """Philox-4x32-10 on counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi)."""
    c0, c1, c2, c3 = offset & MASK32, (offset >> 32) & MASK32, 0, 0
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        prod_b = 0xCD9E8D57 * c2
        prod_a = 0xD2511F53 * c0
        c0, c1, c2, c3 = (
            (prod_b >> 32) ^ c1 ^ k0,
            prod_b & MASK32,
            (prod_a >> 32) ^ c3 ^ k1,
            prod_a & MASK32,
        )
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def python_uniform(word: int) -> float:
    signed = word - 2**32 if word >= 2**31 else word
    folded = ~signed if signed < 0 else signed
    return (torch.tensor(folded, dtype=torch.float32) * torch.tensor(4.6566127342e-10)).item()


SEEDS = [0, 1, 123456789, 2**32 - 1, 2**32 + 5, 0xDEADBEEFCAFEF00D >> 1, 2**63 - 1]
BASES = [0, 1000, 2**31 - 3, 2**32 - 4, 2**32 + 12345, 7 * 2**40 + 3, 2**62 + 11]


def test_known_answer_vector():
    # Random123 kat_vectors: philox4x32_10, counter 0, key 0
    words = philox.randint4x(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("base", [0, 2**32 - 4, 2**62 + 11])
@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_randint4x_matches_python_oracle(seed, base, impl):
    """Both implementations: numpy uint64 (CPU tensors) and torch int64 (other devices)."""
    offsets = base + torch.randint(0, 2**20, (24,), dtype=torch.int64)
    words = getattr(philox, f"_randint4x_{impl}")(seed, offsets)
    for w in words:
        assert w.dtype == torch.int64
        assert int(w.min()) >= 0 and int(w.max()) <= MASK32
    for i, offset in enumerate(offsets.tolist()):
        assert tuple(int(w[i]) for w in words) == python_philox(seed, offset)


def test_numpy_blocks_cover_every_offset(monkeypatch):
    """The numpy rounds run block by block: a 2-D tensor spanning several blocks (the last one
    partial) gives the torch implementation's words, in the offsets' shape, for every count
    of words (the last round computes only those); so do empty ones."""
    monkeypatch.setattr(philox, "_NUMPY_BLOCK", 64)
    for shape in [(5, 41), (0,), (3, 0)]:
        offsets = 2**40 + 7 + torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
        want = philox._randint4x_torch(2**62 + 5, offsets)
        for count in (1, 2, 3, 4):
            got = philox._randint4x_numpy(2**62 + 5, offsets, count)
            assert len(got) == count
            for g, w in zip(got, want[:count], strict=True):
                assert g.shape == offsets.shape
                assert torch.equal(g, w)


def test_randint4x_count():
    offsets = torch.arange(10, dtype=torch.int64)
    words = philox.randint4x(3, offsets)
    for count in (1, 2, 3, 4):
        assert all(
            torch.equal(a, b)
            for a, b in zip(philox.randint4x(3, offsets, count), words[:count], strict=True)
        )
    for count in (0, 5):
        with pytest.raises(ValueError, match="count"):
            philox.randint4x(3, offsets, count)


def test_mul_hi_lo_matches_integer_product():
    x = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    x[:4] = torch.tensor([0, 1, MASK32, 2**31])
    for const in (0xD2511F53, 0xCD9E8D57, MASK32, 1):
        hi, lo = philox._mul_hi_lo(const, x)
        expect = [const * v for v in x.tolist()]
        assert hi.tolist() == [p >> 32 for p in expect]
        assert lo.tolist() == [p & MASK32 for p in expect]


def test_uniform_edges_and_range():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 12345678], dtype=torch.int64)
    u = philox.uint_to_uniform(words)
    assert u.dtype == torch.float32
    assert u.tolist() == [python_uniform(w) for w in words.tolist()]
    assert float(u.max()) < 1.0 and float(u.min()) >= 0.0
    assert u[2] == u[3] and u[0] == u[4]  # ~x folds negative int32 onto [0, 2^31)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_box_muller_clamps_a_zero_uniform_as_triton(device):
    """u1 = 0 (the word 0 or 2^32 - 1) gives the finite radius sqrt(-2 log 1e-7), as Triton's
    ``pair_uniform_to_normal`` clamps, not inf (numpy's path on the CPU, torch's elsewhere)."""
    u1 = torch.tensor([0.0, 1e-7, 0.5], dtype=torch.float32, device=device)
    u2 = torch.zeros(3, dtype=torch.float32, device=device)
    normal = philox.box_muller(u1, u2).cpu()
    assert torch.isfinite(normal).all() and normal[0] == normal[1]
    assert normal[0].item() == pytest.approx(math.sqrt(-2 * math.log(1e-7)), rel=1e-6)


def test_rand_is_uniform_and_pure():
    offsets = philox.element_offsets(300, 70, torch.device("cpu"), base=2**33)
    u = philox.rand(42, offsets)
    n = u.numel()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # mean of U(0,1) has sd sqrt(1/12n); 5 sigma
    assert abs(float(u.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert torch.equal(u, philox.rand(42, offsets))
    assert not torch.equal(u, philox.rand(43, offsets))
    # each element depends only on its own offset
    assert torch.equal(philox.rand(42, offsets[17:19, 5:60]), u[17:19, 5:60])


def test_randn_moments():
    offsets = philox.element_offsets(200, 100, torch.device("cpu"))
    z = philox.randn(7, offsets).double()
    n = z.numel()
    assert z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    # var of the sample variance of a normal is 2/(n-1)
    assert abs(float(z.var()) - 1.0) < 5 * math.sqrt(2 / (n - 1))


def test_element_offsets():
    offsets = philox.element_offsets(3, 5, torch.device("cpu"), base=2**40)
    assert offsets.dtype == torch.int64
    expect = [[2**40 + r * 5 + c for c in range(5)] for r in range(3)]
    assert offsets.tolist() == expect


def test_randint4x_rejects_int32_offsets():
    with pytest.raises(TypeError, match="offsets"):
        philox.randint4x(0, torch.arange(4, dtype=torch.int32))


# ----------------------------------------------------------------------------- vs Triton

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_device() -> str | None:
    """Where the Triton test kernel can run: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "cpu"
    return None


if HAS_TRITON:
    import triton
    import triton.language as tl
    from fastae.kernels import common

    @triton.jit
    def _philox_probe_kernel(
        offsets_ptr, seed, w0_ptr, w1_ptr, w2_ptr, w3_ptr, u_ptr, n_ptr, n, BLOCK: tl.constexpr
    ):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        offsets = tl.load(offsets_ptr + idx, mask=valid, other=0)
        w0, w1, w2, w3 = tl.randint4x(seed, offsets)
        tl.store(w0_ptr + idx, w0.to(tl.int64) & 0xFFFFFFFF, mask=valid)
        tl.store(w1_ptr + idx, w1.to(tl.int64) & 0xFFFFFFFF, mask=valid)
        tl.store(w2_ptr + idx, w2.to(tl.int64) & 0xFFFFFFFF, mask=valid)
        tl.store(w3_ptr + idx, w3.to(tl.int64) & 0xFFFFFFFF, mask=valid)
        tl.store(u_ptr + idx, tl.rand(seed, offsets), mask=valid)
        tl.store(n_ptr + idx, tl.randn(seed, offsets), mask=valid)

    @triton.jit
    def _uniform_probe_kernel(words_ptr, u_ptr, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        tl.store(u_ptr + idx, common.uniform(tl.load(words_ptr + idx)))


def _run_triton(seed: int, offsets: torch.Tensor):
    device = offsets.device
    n = offsets.numel()
    words = [torch.full((n,), -1, dtype=torch.int64, device=device) for _ in range(4)]
    u = torch.full((n,), -1.0, dtype=torch.float32, device=device)
    normal = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    block = 64
    grid = (triton.cdiv(n, block),)
    fused = common.FP_FUSION  # compiled as fastae's kernels are: randn's arithmetic with FMA
    _philox_probe_kernel[grid](
        offsets, seed, *words, u, normal, n, BLOCK=block, enable_fp_fusion=fused
    )
    return words, u, normal


@pytest.mark.interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("seed, base", list(zip(SEEDS, BASES, strict=True)))
def test_matches_triton_bit_for_bit(seed, base):
    device = _triton_device()
    if device is None:
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    # a run of consecutive offsets (crossing 2^32 for some bases) plus random ones past it
    consecutive = base + torch.arange(70, dtype=torch.int64)
    scattered = base + torch.randint(0, 2**40, (30,), dtype=torch.int64)
    offsets = torch.cat([consecutive, scattered]).to(device)
    words, u, normal = _run_triton(seed, offsets)
    ours = philox.randint4x(seed, offsets)
    for got, expect in zip(words, ours, strict=True):
        assert torch.equal(got, expect)
    ours_u = philox.rand(seed, offsets)
    assert torch.equal(u.view(torch.int32), ours_u.view(torch.int32))
    # tl.randn may use approximate log/cos on a GPU: equal up to libm rounding
    torch.testing.assert_close(normal, philox.randn(seed, offsets), rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_uniform_equals_uint_to_uniform_at_the_edges():
    """The kernels' ``common.uniform`` (for words Triton's ``tl.rand`` does not take) folds a
    negative int32 with ~x, as uint_to_uniform: the words near 2^31 and 2^32, where the
    fold's one-off would show (small values are exact in float32)."""
    device = _triton_device()
    if device is None:
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    edges = [0, 1, 2, 2**24 + 1, 2**31 - 2**24, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1]
    edges += [2**31 + 2**24, 2**32 - 2**24 - 1, 12345678, 2**32 - 12345678]
    edges += [2**32 - 3, 2**32 - 2, 2**32 - 1]
    words = torch.tensor(edges, dtype=torch.int64)
    got = torch.full((16,), float("nan"), device=device)
    _uniform_probe_kernel[(1,)](words.to(torch.int32).to(device), got, BLOCK=16)
    assert torch.equal(got.cpu(), philox.uint_to_uniform(words))


@pytest.mark.parametrize("base", [0, 2**32 - 7, 2**62 + 11])
def test_element_streams_equal_the_offset_streams(base):
    """element_uniforms / element_normals (numpy end to end on the CPU) give rand / randn at
    the element offsets bit for bit, and the second uniform is the second word's."""
    cpu = torch.device("cpu")
    offsets = philox.element_offsets(7, 13, cpu, base)
    u1, u2 = philox.element_uniforms(99, 7, 13, cpu, base, count=2)
    assert u1.shape == (7, 13) and u1.dtype == torch.float32
    assert torch.equal(u1, philox.rand(99, offsets))
    assert torch.equal(u2, philox.uint_to_uniform(philox.randint4x(99, offsets)[1]))
    assert torch.equal(philox.element_uniforms(99, 7, 13, cpu, base)[0], u1)
    assert torch.equal(philox.element_normals(99, 7, 13, cpu, base), philox.randn(99, offsets))
    with pytest.raises(ValueError, match="count"):
        philox.element_uniforms(99, 7, 13, cpu, base, count=5)
