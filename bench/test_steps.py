"""Training-step benchmarks: zero the gradients, forward, loss, backward (tied weights, sigmoid
encoder, BCE on a sigmoid decoder) for the plain, sparse, denoising, contractive and combined
autoencoders; a VAE's and a deep autoencoder's (ReLU layers, BCE)."""

import pytest

from fastae import benchmark as fb


@pytest.mark.parametrize("case", fb.STEPS)
def test_step(run_case, case, provider, size, dtype):
    run_case(case, provider, size, dtype)
