"""The Triton corruption kernel (fastae.kernels.noise) against the reference streams."""

import math

import pytest
import torch
from guard_bands import guarded_input, guarded_outputs

import fastae
from fastae import ops, philox, reference

pytest.importorskip("triton")
from fastae.kernels import common, noise  # noqa: E402

FUSED_KERNELS = True  # fused GEMMs at every shape, noisy encodes memory-free (conftest)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [
    ("gaussian", 0.7, 0.0, 0.0),
    ("masking", 0.3, 0.0, 0.0),
    ("masking_rescale", 0.45, 0.0, 0.0),
    ("salt_pepper", 0.35, -1.0, 3.0),
]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(common, "poison_outputs", True)


def _x(rows, cols, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


@pytest.mark.parametrize("kind,level,low,high", KINDS)
@pytest.mark.parametrize(
    "base, dtype",
    [(0, torch.float32), (2**32 - 77, torch.float32), (3 * 2**40 + 5, torch.float32)]
    + [(0, torch.bfloat16), (0, torch.float16), (0, torch.float64)],
)
def test_kernel_equals_reference(kind, level, low, high, base, dtype):
    """Masks bit for bit (also past 2^32, where the counter's high word is used, and in half
    precision); Gaussian noise too in the interpreter (numpy's float32 log and cos on both
    sides), on a GPU to float32 rounding of libm's log/cos (in half precision: one rounding of
    x + sigma eps to the dtype, at most one unit in the last place apart)."""
    x = _x(19, 37, dtype)
    seed = 2**45 + 123
    got = noise.corrupt(x, kind, level, low, high, seed, base)
    want = reference.corrupt(x, kind, level, low, high, seed, base)
    assert got.dtype == dtype
    if kind == "gaussian" and DEVICE == "cuda":
        wide = dtype in (torch.float32, torch.float64)  # eps (float32) added at this width
        atol = 4e-6 * level if wide else 0
        rtol = 0 if wide else torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    else:
        assert torch.equal(got, want)
    grad = _x(19, 37, dtype, seed=1)
    got_grad = noise.corrupt_input_grad(grad, kind, level, seed, base)
    assert torch.equal(got_grad, reference.corrupt_input_grad(grad, kind, level, seed, base))


@pytest.mark.parametrize("kind,low,high", [(k, low, high) for k, _, low, high in KINDS[1:]])
@pytest.mark.parametrize("impl", [reference, noise], ids=["reference", "triton"])
def test_an_element_whose_uniform_equals_the_level_is_kept(impl, kind, low, high):
    """keep = u >= p, on both sides: at a level equal to one element's uniform (a float32
    value, so exactly that), the element and its gradient are kept, the elements of the
    uniforms below it dropped."""
    seed = 2**45 + 123
    x = _x(19, 37)
    uniforms = fastae.philox.element_uniforms(seed, 19, 37, x.device)[0]
    row, col = divmod(int((uniforms - 0.3).abs().argmin()), 37)
    level = float(uniforms[row, col])
    got = impl.corrupt(x, kind, level, low, high, seed, 0)
    level32 = torch.tensor(level, dtype=torch.float32)  # levels act in float32
    keep_rate = 1 - level32 if kind == "masking_rescale" else 1
    assert got[row, col] == x[row, col] / keep_rate
    grad = impl.corrupt_input_grad(torch.ones_like(x), kind, level, seed, 0)
    assert grad[row, col] == 1 / keep_rate and (grad[uniforms < level] == 0).all()


@pytest.mark.parametrize("kind,level,low,high", KINDS[1:])
@pytest.mark.parametrize("impl", [reference, noise], ids=["reference", "triton"])
def test_non_finite_inputs(impl, kind, level, low, high):
    """Masking multiplies by the mask (x m, as dropout): a NaN stays NaN and a dropped inf
    becomes NaN; salt-and-pepper replaces entries, NaN or not. The backward mask likewise."""
    x = _x(8, 40)
    x[::2, ::3] = math.nan
    x[1::2, ::5] = math.inf
    seed = 77
    out = impl.corrupt(x, kind, level, low, high, seed, 0)
    kept = reference.corrupt(torch.ones_like(x), "masking", level, 0, 0, seed, 0) != 0
    if kind == "salt_pepper":
        torch.testing.assert_close(out[kept], x[kept], equal_nan=True, rtol=0, atol=0)
        assert torch.isin(out[~kept], torch.tensor([low, high], device=DEVICE)).all()
    else:
        assert torch.isnan(out[x.isnan()]).all()
        assert torch.isnan(out[x.isinf() & ~kept]).all() and out[x.isinf() & kept].isinf().all()
        finite = x.isfinite()
        assert out[finite & ~kept].eq(0).all()
    grad = impl.corrupt_input_grad(x, kind, level, seed, 0)
    if kind == "salt_pepper":
        assert grad[~kept].eq(0).all()
    else:
        assert torch.isnan(grad[x.isnan()]).all()


def test_large_base_offsets_do_not_repeat():
    """Offsets 2^32 apart share their low counter word but must give different streams."""
    x = torch.ones(4, 64, device=DEVICE)
    first = noise.corrupt(x, "masking", 0.5, 0.0, 0.0, 7, 0)
    wrapped = noise.corrupt(x, "masking", 0.5, 0.0, 0.0, 7, 2**32)
    assert not torch.equal(first, wrapped)


def test_strided_input():
    x = _x(12, 30)
    view = x.t().contiguous().t()
    assert not view.is_contiguous()
    assert torch.equal(
        noise.corrupt(view, "salt_pepper", 0.4, 0.0, 1.0, 5),
        noise.corrupt(x, "salt_pepper", 0.4, 0.0, 1.0, 5),
    )


# Statistics of the streams on large draws: the kernel on CUDA; on CPU the reference, whose
# streams the kernel reproduces bit for bit (above) but the interpreter is too slow to draw.
_large_corrupt = noise.corrupt if DEVICE == "cuda" else reference.corrupt


def test_masking_rate_within_five_sigma():
    n = 128 * 1024
    x = torch.ones(128, 1024, device=DEVICE)
    p = 0.3
    dropped = (_large_corrupt(x, "masking", p, 0.0, 0.0, 2024) == 0).sum().item()
    assert abs(dropped - p * n) < 5 * math.sqrt(n * p * (1 - p))


def test_gaussian_moments():
    n = 128 * 1024
    eps = _large_corrupt(torch.zeros(128, 1024, device=DEVICE), "gaussian", 1.0, 0, 0, 99)
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    # var of the sample variance of N(0,1) is 2/n
    assert abs(eps.var().item() - 1.0) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize(
    "spec",
    [
        fastae.GaussianNoise(0.4),
        fastae.MaskingNoise(0.3),
        fastae.MaskingNoise(0.3, rescale=True),
        fastae.SaltPepperNoise(0.2),
    ],
)
def test_gradcheck_and_opcheck_triton(spec):
    x = _x(3, 5, torch.float64).requires_grad_()
    with fastae.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda t: ops.corrupt(t, spec.with_seed(3)), (x,))
    kind, level, low, high = spec.params()
    seed = torch.tensor(3)
    torch.library.opcheck(
        torch.ops.fastae.corrupt.default, (x, kind, level, low, high, seed, "triton")
    )


def test_fused_encoder_regenerates_instead_of_storing():
    """encode(noise=...) on the triton backend keeps no (B, d) tensor besides x."""
    x = _x(8, 24, torch.float64).requires_grad_()
    weight = _x(6, 24, torch.float64, seed=2).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with fastae.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h, rho_hat, jac = ops.encode(x, weight, noise=fastae.MaskingNoise(0.5, seed=1))
    big = [t for t in saved if t.shape == x.shape]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


def test_wide_column_variant_matches_reference(monkeypatch):
    """The int64 column-index variant (chosen for a strided x whose column offsets reach
    2^31) on a small transposed view: with the threshold at 1 it is taken."""
    monkeypatch.setattr(common, "INDEX_LIMIT", 1)
    x = _x(12, 30)
    view = x.t().contiguous().t()
    assert common.wide_columns(view)
    got = noise.corrupt(view, "salt_pepper", 0.4, -1.0, 2.0, 5, 2**33)
    assert torch.equal(got, reference.corrupt(x, "salt_pepper", 0.4, -1.0, 2.0, 5, 2**33))
    got = noise.corrupt_input_grad(view, "masking_rescale", 0.3, 6)
    assert torch.equal(got, reference.corrupt_input_grad(x, "masking_rescale", 0.3, 6))


def test_the_kernels_refuse_a_dimension_near_2_to_the_31():
    """Rows and columns are numbered in int32 in the kernels: a dimension near 2^31 would wrap
    (reads and writes before the tensor), so each kernel entry refuses it up front, naming
    the argument; expanded tensors hold the shapes without their memory."""
    from fastae.kernels import decoder, encoder, vae

    limit = common.DIMENSION_LIMIT
    tall = torch.zeros(1, 3, device=DEVICE).expand(limit, 3)
    wide = torch.zeros(3, 1, device=DEVICE).expand(3, limit)
    weight = torch.zeros(2, 3, device=DEVICE)
    calls = [
        lambda: noise.corrupt(tall, "masking", 0.5, 0.0, 0.0, 1),
        lambda: noise.corrupt_input_grad(wide, "masking", 0.5, 1),
        lambda: encoder.encode_forward(tall, weight, weight[:, 0], "sigmoid", "none", 0, 0, 0, 0),
        lambda: decoder.decode_forward(tall, weight.t(), weight[0], tall, "sigmoid", "bce"),
        lambda: vae.reparameterize_forward(wide, wide, 1),
    ]
    for call, name in zip(calls, ["x", "grad", "x", "h", "mu"], strict=True):
        with pytest.raises(ValueError, match=rf"^{name} has shape .*: the triton backend takes"):
            call()
    # one below passes
    assert common.check_sizes(x=torch.zeros(1, 1).expand(1, limit - 1)) is None


# Philox (seed 5, offset 1881619): word 1's uniform is exactly 0.5, word 0's 0.0219 (about
# one offset in 2^21 has it).
HALF_SEED, HALF_OFFSET = 5, 1881619


def test_salt_pepper_salts_an_element_whose_second_uniform_is_exactly_one_half():
    """salt = u1 >= 0.5, as the reference: at u1 == 0.5 the dropped element gets ``high``."""
    u0, u1 = philox.element_uniforms(HALF_SEED, 1, 1, torch.device("cpu"), HALF_OFFSET, count=2)
    assert u1.item() == 0.5 and u0.item() < 0.5  # the precondition the test relies on
    x = torch.zeros(1, 1, device=DEVICE)
    got = noise.corrupt(x, "salt_pepper", 0.5, -1.0, 3.0, HALF_SEED, HALF_OFFSET)
    want = reference.corrupt(x, "salt_pepper", 0.5, -1.0, 3.0, HALF_SEED, HALF_OFFSET)
    assert want.item() == 3.0
    assert torch.equal(got, want)


def test_rescaled_masking_of_a_value_whose_rescale_overflows_matches_the_reference():
    """x / (1 - p) * m in float32, as the reference: a dropped entry whose x / (1 - p)
    overflows is inf * 0 = NaN, a kept one inf (x * m / (1 - p) would give 0 there)."""
    x = torch.full((2, 40), 3e38, device=DEVICE)
    got = noise.corrupt(x, "masking_rescale", 0.5, 0.0, 0.0, 11)
    want = reference.corrupt(x, "masking_rescale", 0.5, 0.0, 0.0, 11)
    assert want.isnan().any() and want.isinf().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["masking", "salt_pepper"])
def test_base_just_below_2_to_the_31(kind):
    """A base that fits int32 while base + row * d does not: the counter is formed in int64
    (the interpreter types such a base i32), every run, not only when a property test's draw
    lands there."""
    x = torch.randn(3, 7, device=DEVICE)
    base = 2**31 - 5
    got = noise.corrupt(x, kind, 0.4, -1.0, 2.0, 9, base)
    assert torch.equal(got, reference.corrupt(x, kind, 0.4, -1.0, 2.0, 9, base))
    grad = noise.corrupt_input_grad(x, kind, 0.4, 9, base)
    assert torch.equal(grad, reference.corrupt_input_grad(x, kind, 0.4, 9, base))


@pytest.mark.parametrize("kind", ["masking", "salt_pepper"])
def test_corrupt_stores_nothing_past_its_output(kind, monkeypatch):
    """The tail masks of rows and columns: nothing is stored past the output (a stray store
    would crash the interpreter or, on a GPU, corrupt memory silently)."""
    guards = guarded_outputs(monkeypatch, noise)
    x = guarded_input(torch.randn(19, 37, device=DEVICE))
    got = noise.corrupt(x, kind, 0.4, -1.0, 2.0, 3)
    grad = noise.corrupt_input_grad(x, kind, 0.4, 3)
    assert torch.equal(got, reference.corrupt(x, kind, 0.4, -1.0, 2.0, 3))
    assert torch.equal(grad, reference.corrupt_input_grad(x, kind, 0.4, 3))
    assert len(guards) == 2 and all(g.isnan().all() for g in guards)
