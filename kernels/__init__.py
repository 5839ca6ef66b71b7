"""Triton kernels (installed as ``fastae.kernels``): jit kernels and their launchers only."""
