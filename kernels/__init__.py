"""Triton kernels for the PixelDance hot spots (temporal conv, temporal attention, concat conditioning,
noisy-latent update, the transformers' GEGLU, fused linears and add + LayerNorm, the ResNets' GroupNorm +
SiLU), each beside its pure-PyTorch reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_operator_depth = 0


@contextlib.contextmanager
def as_operators() -> Iterator[None]:
    """Inside this block the kernels' public entry points call their registered `torch.library` operators,
    as they do under torch.compile, instead of their autograd Functions. On `meta` tensors the operators'
    fake implementations then give every output's shape without launching anything: how the bench counts
    the aten ops and bytes of a step of the Triton backend on the CPU."""
    global _operator_depth
    _operator_depth += 1
    try:
        yield
    finally:
        _operator_depth -= 1


def operator_path() -> bool:
    """Whether entry points should call their operators: under torch.compile or inside `as_operators()`."""
    return _operator_depth > 0 or torch.compiler.is_compiling()
