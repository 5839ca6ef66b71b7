"""The brute-force contractive penalty (``torch.func.jacrev`` of every sample's encoder) against
the analytic eager penalty and fastae, once, at a small size."""

import pytest

from fastae import benchmark as fb


@pytest.mark.parametrize("method", [fb.JACREV, "eager", "fastae"])
def test_contractive_gap(run_case, method, first_dtype):
    run_case("contractive", method, fb.JACREV_SIZE, first_dtype)
