"""Triton kernels for the PixelDance hot spots (temporal conv, temporal attention, concat
conditioning, noisy-latent update), each beside its pure-PyTorch reference."""
