import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the variable must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts with the default backend choice."""
    import fastae.backend as backend

    saved = list(backend._override)
    backend._override.clear()
    yield
    backend._override[:] = saved
