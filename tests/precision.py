"""The half-precision criterion of the kernel tests: fastae's error at a dtype within twice
torch's own error there, both measured against float64."""

import torch


def assert_within_twice_torchs_error(ours, torch_, oracle, dtype, names, sums=()):
    """For each result: |ours - oracle| / |oracle| <= 2 |torch - oracle| / |oracle| + 1e-6
    (Frobenius norms). The results named in ``sums`` are single numbers summed from many
    roundings at the dtype (a loss, the Jacobian norm): their error is a random sum, and
    torch's is at times luckily small, so a quarter of the dtype's epsilon also bounds it."""
    for name, a, b, ref in zip(names, ours, torch_, oracle, strict=True):
        err_ours = ((a.double() - ref).norm() / ref.norm()).item()
        err_torch = ((b.double() - ref).norm() / ref.norm()).item()
        bound = 2 * err_torch + 1e-6
        if name in sums:
            bound = max(bound, torch.finfo(dtype).eps / 4)
        assert err_ours <= bound, f"{name}: {err_ours:.2e} vs torch {err_torch:.2e}"
