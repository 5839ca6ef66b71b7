"""Guard bands: a kernel's output buffers and inputs as the heads of longer buffers, so an
out-of-bounds store shows as an assertion failure (a GPU would corrupt memory silently)."""

import math

import torch


def guarded_outputs(monkeypatch, *modules):
    """Every output buffer the kernels of ``modules`` allocate (their ``empty``) becomes the
    head of a longer NaN-filled one; returns the tails, which a kernel must leave NaN."""
    guards = []

    def empty(shape, device, dtype):
        n = math.prod(shape)
        block = torch.full((n + 64,), math.nan, device=device, dtype=dtype)
        guards.append(block[n:])
        return block[:n].view(shape)

    for module in modules:
        monkeypatch.setattr(module, "empty", empty)
    return guards


def guarded_input(t, fill=7.0):
    """``t`` as the head of a longer buffer of finite values: an out-of-bounds read gets a
    finite value, so a store of it into a guard band shows."""
    block = torch.full((t.numel() + 64,), fill, device=t.device, dtype=t.dtype)
    block[: t.numel()] = t.reshape(-1)
    return block[: t.numel()].view(t.shape)
