"""Per-op benchmarks: encode with and without statistics, corrupt, decode_loss.

Each timed call is the op's forward plus its backward into the trainable inputs (W, b; h, V,
c for decode_loss) with fixed upstream gradients; corrupt (no trainable input) is forward only.
"""

import pytest

from fastae import benchmark as fb


@pytest.mark.parametrize("case", fb.OPS)
def test_op(run_case, case, provider, size, dtype):
    run_case(case, provider, size, dtype)
