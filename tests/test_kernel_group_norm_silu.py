"""GroupNorm + SiLU kernel (`kernels/group_norm_silu.py`) against its PyTorch reference
(`kernels/group_norm_silu_ref.py`, the eager ops of diffusers' ResnetBlock2D): forward and gradients, awkward
shapes, the timestep shift, low precision, input errors, saved activations, the operator path on meta, the
ResNet block wired to it, compile check."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdengine.bench.common import count_bytes
from pdengine.kernels import as_operators
from pdengine.kernels.group_norm_silu import compile_specs, group_norm_silu, modeled_bytes
from pdengine.kernels.group_norm_silu_ref import group_norm_silu_ref
from tests.kernel_utils import assert_close, assert_compiles_clean, assert_low_precision_close


def _t(shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g) + shift


@pytest.mark.parametrize("shape, groups", [((1, 4, 1, 1), 2), ((3, 12, 5, 7), 4), ((2, 6, 40, 60), 3),
                                           ((2, 32, 3, 3), 32)])
@pytest.mark.parametrize("with_shift", [False, True])
def test_matches_reference(shape, groups, with_shift):
    """Groups of 3 channels (not a power of two), blocks shorter than, equal to and longer than one
    2048-element step (2 x 40 x 60 = 4800), one channel per group, 1x1 images; a mean far from zero."""
    x = _t(shape, scale=2.0, shift=50.0)
    c = shape[1]
    weight, bias = 1.0 + 0.3 * _t((c,), 1), 0.5 * _t((c,), 2)
    shift = _t((shape[0], c), 3) if with_shift else None
    assert_close(group_norm_silu(x, weight, bias, groups, 1e-5, shift),
                 group_norm_silu_ref(x, weight, bias, groups, 1e-5, shift), name="fused", scale=2.0)
    # Gradients of every input against autograd through the reference (the mean offset taken out: the
    # reference's own fp32 gradient is inexact on top of 50).
    inputs = [x - 50.0, weight, bias] + ([shift] if with_shift else [])
    fast = [t.clone().requires_grad_() for t in inputs]
    slow = [t.clone().requires_grad_() for t in inputs]
    y = group_norm_silu(fast[0], fast[1], fast[2], groups, 1e-5, fast[3] if with_shift else None)
    y_ref = group_norm_silu_ref(slow[0], slow[1], slow[2], groups, 1e-5, slow[3] if with_shift else None)
    dy = _t(y.shape, seed=11)
    y.backward(dy)
    y_ref.backward(dy)
    for name, a, b in zip(("x", "weight", "bias", "shift"), fast, slow):
        assert_close(a.grad, b.grad, name=f"grad {name}", scale=3.0)


def test_without_affine_and_strided_input():
    x = _t((2, 8, 6, 4), seed=4).transpose(2, 3)  # non-contiguous: taken as a contiguous copy
    assert_close(group_norm_silu(x, None, None, 4, 1e-6), group_norm_silu_ref(x, None, None, 4, 1e-6),
                 name="no affine")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    group_norm_silu(xa, None, None, 4, 1e-6).square().sum().backward()
    group_norm_silu_ref(xb, None, None, 4, 1e-6).square().sum().backward()
    assert_close(xa.grad, xb.grad, name="no affine, grad", scale=3.0)


def test_training_saves_only_the_input():
    """Autograd keeps x (and the shift) and the per-group statistics; the eager ops also keep the timestep
    sum and the GroupNorm's output: two activation-sized tensors less per ResNet norm."""
    def saved(fn) -> int:
        x = torch.empty(4, 32, 8, 8, device="meta", requires_grad=True)
        w = torch.empty(32, device="meta", requires_grad=True)
        shift = torch.empty(4, 32, device="meta", requires_grad=True)
        leaves = {t.untyped_storage()._cdata for t in (x, w, shift)}
        storages = {}

        def pack(t):
            if t.untyped_storage()._cdata not in leaves:
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), as_operators():
            fn(x, w, w, 8, 1e-5, shift)
        return sum(storages.values())

    activation = 4 * 32 * 8 * 8 * 4
    assert saved(group_norm_silu) == 2 * 4 * 8 * 4  # the fp32 mean and rstd per image and group
    assert saved(group_norm_silu_ref) >= 2 * activation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x32 = _t((2, 16, 12, 10), seed=5, scale=1.5, shift=0.3)
    weight, bias, shift = 1.0 + 0.2 * _t((16,), 6), 0.2 * _t((16,), 7), _t((2, 16), 8)
    lp = [t.to(dtype) for t in (x32, weight, bias, shift)]
    got = group_norm_silu(lp[0], lp[1], lp[2], 4, 1e-5, lp[3])
    assert got.dtype == dtype
    assert_low_precision_close(got, group_norm_silu_ref(lp[0], lp[1], lp[2], 4, 1e-5, lp[3]),
                               group_norm_silu_ref(x32, weight, bias, 4, 1e-5, shift), name=str(dtype))


def test_empty_batch():
    assert group_norm_silu(torch.empty(0, 4, 2, 2), None, None, 2, 1e-5).shape == (0, 4, 2, 2)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(2, 6, 4), None, None, 2, None), "N, C, H, W"),
    (lambda: (torch.randn(2, 6, 4, 4), None, None, 4, None), "divide"),
    (lambda: (torch.randn(2, 6, 4, 4), torch.ones(6), None, 2, None), "go together"),
    (lambda: (torch.randn(2, 6, 4, 4), torch.ones(5), torch.ones(5), 2, None), "weight must be"),
    (lambda: (torch.randn(2, 6, 4, 4), None, None, 2, torch.ones(2, 5)), "shift must be"),
])
def test_input_errors(make, match):
    x, w, b, groups, shift = make()
    with pytest.raises(ValueError, match=match):
        group_norm_silu(x, w, b, groups, 1e-5, shift)


def test_operator_path_on_meta_counts_one_pass():
    """Inside `as_operators()` the entry point is one operator: the activation read and written once (the
    model, affine aside), against the eager add + GroupNorm + SiLU's three reads and three writes as counted."""
    n, c, hw = 32, 320, 32
    x = torch.empty(n, c, hw, hw, device="meta", dtype=torch.bfloat16)
    w = torch.empty(c, device="meta", dtype=torch.bfloat16)
    shift = torch.empty(n, c, device="meta", dtype=torch.bfloat16)
    with as_operators():
        assert group_norm_silu(x, w, w, 32, 1e-5, shift).shape == x.shape
        fused, ops = count_bytes(group_norm_silu, x, w, w, 32, 1e-5, shift)
    assert ops == 1
    assert fused - 2 * c * 2 == modeled_bytes(n, c, hw * hw, torch.bfloat16, shift=True)
    eager, _ = count_bytes(group_norm_silu_ref, x, w, w, 32, 1e-5, shift)
    assert 3 * fused < eager * 1.01  # eager: 6 activation passes as counted (GroupNorm's stats pass uncounted)


def test_resnet_block_uses_the_kernel():
    """With the kernels on, the ResNet block equals the PyTorch path (both norms, the timestep add folded into
    the second) and runs the kernel twice; its gradients (input, every parameter) equal the PyTorch path's."""
    from pdengine.model.layers import ResnetBlock2D

    torch.manual_seed(0)
    slow = ResnetBlock2D(12, 24, 16, 4, 1e-6)
    with torch.no_grad():
        for prm in slow.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    fast = ResnetBlock2D(12, 24, 16, 4, 1e-6, backend="triton")
    fast.load_state_dict(slow.state_dict())
    x, temb = _t((3, 12, 5, 6), seed=9), _t((3, 16), seed=10)
    names: list[str] = []

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        assert_close(fast(x, temb), slow(x, temb), name="ResNet block", scale=2.0)
        meta = ResnetBlock2D(12, 24, 16, 4, 1e-6, backend="triton").to("meta")
        with as_operators(), Names():
            meta(x.to("meta"), temb.to("meta"))
    assert names.count("pdengine::group_norm_silu") == 2 and "aten::native_group_norm" not in names
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    slow(xs, temb).square().sum().backward()
    fast(xf, temb).square().sum().backward()
    assert_close(xf.grad, xs.grad, name="grad x", scale=3.0)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert_close(a.grad, b.grad, name=f"grad {name}", scale=3.0)


def test_compile_specs_no_spills():
    assert_compiles_clean(compile_specs(), 10)


@pytest.mark.gpu
@pytest.mark.parametrize("c, hw", [(320, 32), (1280, 8), (1280, 4)])
def test_gpu_full_shapes_bf16(gpu, c, hw):
    """The ResNets' second norm (with the timestep shift) at three levels of one video's CFG batch (32
    images), bf16 within 2x PyTorch's own bf16 error of the fp32 computation."""
    torch.manual_seed(0)
    x = torch.randn(32, c, hw, hw, device="cuda") + 0.5
    w, b = 1.0 + 0.1 * torch.randn(c, device="cuda"), 0.1 * torch.randn(c, device="cuda")
    shift = torch.randn(32, c, device="cuda")
    lp = [t.bfloat16() for t in (x, w, b, shift)]
    assert_low_precision_close(group_norm_silu(lp[0], lp[1], lp[2], 32, 1e-5, lp[3]),
                               group_norm_silu_ref(lp[0], lp[1], lp[2], 32, 1e-5, lp[3]),
                               group_norm_silu_ref(x, w, b, 32, 1e-5, shift), name="bf16")
    dy = torch.randn_like(x)
    grads = []
    for fn, inputs, g in ((group_norm_silu, lp, dy.bfloat16()), (group_norm_silu_ref, lp, dy.bfloat16()),
                          (group_norm_silu_ref, (x, w, b, shift), dy)):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        fn(leaves[0], leaves[1], leaves[2], 32, 1e-5, leaves[3]).backward(g)
        grads.append([t.grad for t in leaves])
    for i, name in enumerate(("x", "weight", "bias", "shift")):
        assert_low_precision_close(grads[0][i], grads[1][i], grads[2][i], name=f"bf16 grad {name}")
