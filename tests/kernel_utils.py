"""Shared tolerances and comparison for kernel tests (one table for the whole suite)."""

from __future__ import annotations

import torch

# (rtol, atol) per dtype of the computation under test, compared against an fp32 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 name: str = "", scale: float = 1.0) -> None:
    """assert_close with the suite's tolerance for `dtype` (times `scale`); on failure the message says
    where the worst mismatch is."""
    rtol, atol = TOLERANCES[dtype]
    a, e = actual.detach().float(), expected.detach().float()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    bound = atol * scale + rtol * scale * e.abs()
    bad = err > bound
    if bad.any():
        worst = (err - bound).flatten().argmax()
        where = tuple(int(i) for i in torch.unravel_index(worst, err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance (rtol={rtol * scale}, "
            f"atol={atol * scale}); worst at {where}: got {a[where].item():.6g}, expected {e[where].item():.6g}"
        )


def assert_low_precision_close(actual_lp: torch.Tensor, reference_lp: torch.Tensor, reference_fp32: torch.Tensor,
                               name: str = "", factor: float = 2.0, floor: float = 1e-3) -> None:
    """The kernel in low precision may be at most `factor` x as far from the fp32 reference as PyTorch's
    own low-precision reference is (with a small absolute floor for near-exact cases)."""
    ref32 = reference_fp32.detach().float()
    err_kernel = (actual_lp.detach().float() - ref32).abs().max().item()
    err_torch = (reference_lp.detach().float() - ref32).abs().max().item()
    limit = factor * err_torch + floor * max(1.0, ref32.abs().max().item())
    if err_kernel > limit:
        raise AssertionError(f"{name}: low-precision error {err_kernel:.3g} > {factor} x PyTorch's {err_torch:.3g} "
                             f"(+ floor) = {limit:.3g}")


def assert_compiles_clean(specs, count: int) -> None:
    """Each of `count` distinct compile specs compiles for every target arch with no spilled bytes (local
    memory or stack), the matrix-multiplying ones use tensor cores, and the streaming ones (a
    `max_narrow_global` bound) move their activations as words or vectors."""
    from pdengine.kernels.compile_check import compile_all

    assert len({s.name for s in specs}) == len(specs) == count
    by_name = {s.name: s for s in specs}
    for report in compile_all(specs):  # every spec for every arch, in parallel child processes
        spec, arch = by_name[report.name], report.arch
        assert report.local_bytes == 0 and report.stack_bytes == 0, f"{spec.name} sm{arch} spills"
        if spec.expects_mma:
            assert report.mma_instructions > 0, f"{spec.name} sm{arch} has no tensor-core instructions"
        if spec.max_narrow_global is not None:
            assert report.narrow_global <= spec.max_narrow_global, (
                f"{spec.name} sm{arch}: {report.narrow_global} sub-word global accesses (at most "
                f"{spec.max_narrow_global}): the activation is not moved as words or vectors")


def assert_streaming_compiles_clean(specs) -> None:
    """An elementwise family's compile specs: each configuration listed once, none a matrix multiply; every spec
    compiles for every target arch with no spills, no tensor-core instructions, its activations moved as
    vectors (sub-word accesses within the spec's bound)."""
    from pdengine.kernels.compile_check import ARCHS, compile_all

    keys = [(tuple(sorted(s.signature.items())), tuple(sorted(s.constexprs.items()))) for s in specs]
    assert len(set(keys)) == len(keys), "compile_specs lists a configuration twice"
    assert not any(spec.expects_mma for spec in specs)  # elementwise: no matrix multiply
    bounds = {spec.name: spec.max_narrow_global for spec in specs}
    reports = compile_all(specs)  # every spec for every arch, in parallel child processes
    assert len(reports) == len(specs) * len(ARCHS)
    for report in reports:
        assert report.spills == 0, f"{report.name} sm{report.arch} spills {report.spills} bytes"
        assert report.mma_instructions == 0
        assert report.narrow_global <= bounds[report.name] and report.vector_global > 0, report.name
