"""Benchmarks: kernels and end-to-end sampling against the reference PyTorch layers and diffusers."""
