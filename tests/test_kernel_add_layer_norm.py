"""Residual add + LayerNorm kernel (`kernels/add_layer_norm.py`) against its PyTorch reference
(`kernels/add_layer_norm_ref.py`, the eager add and LayerNorm of a pre-norm transformer block): awkward shapes,
low precision, strided rows, input errors, the operator path on meta, the transformer blocks wired to it,
compile check."""

from __future__ import annotations

import pytest
import torch

from pdengine.bench.common import count_bytes
from pdengine.kernels import as_operators
from pdengine.kernels.add_layer_norm import add_layer_norm, compile_specs, modeled_bytes
from pdengine.kernels.add_layer_norm_ref import add_layer_norm_ref
from tests.kernel_utils import assert_close, assert_compiles_clean, assert_low_precision_close


def _t(shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g) + shift


@pytest.mark.parametrize("shape", [(1, 8), (37, 40), (2, 9, 320), (3, 1100), (4, 2048)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(shape, affine):
    """Rows not a multiple of the row block, widths not a power of two, one row over 1024 and the widest row;
    a mean far from zero (the statistics are centred)."""
    c = shape[-1]
    x, y = _t(shape, 1, 2.0, 40.0), _t(shape, 2)
    w, b = (1.0 + 0.2 * _t((c,), 3), 0.3 * _t((c,), 4)) if affine else (None, None)
    with torch.no_grad():
        s, h = add_layer_norm(x, y, w, b, 1e-5)
    s_ref, h_ref = add_layer_norm_ref(x, y, w, b, 1e-5)
    assert s.shape == h.shape == x.shape and s.is_contiguous() and h.is_contiguous()
    assert_close(s, s_ref, name="sum")
    assert_close(h, h_ref, name="norm", scale=2.0)


def test_bf16_within_twice_pytorchs_error_and_strided_rows():
    """bf16 against the fp32 computation, within 2x PyTorch's own bf16 error; x a column slice of a wider
    buffer (row stride > width), as a packed projection's output would be."""
    wide = _t((50, 3 * 320), 5).bfloat16()
    x, y = wide[:, 320:640], _t((50, 320), 6).bfloat16()
    w, b = (1.0 + 0.2 * _t((320,), 7)).bfloat16(), (0.3 * _t((320,), 8)).bfloat16()
    with torch.no_grad():
        s, h = add_layer_norm(x, y, w, b, 1e-5)
    s_lp, h_lp = add_layer_norm_ref(x, y, w, b, 1e-5)
    s32, h32 = add_layer_norm_ref(x.float(), y.float(), w.float(), b.float(), 1e-5)
    assert s.dtype == h.dtype == torch.bfloat16
    assert torch.equal(s, s_lp)  # the sum rounds exactly like the eager add
    assert_low_precision_close(h, h_lp, h32, "norm bf16")


def test_input_errors():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        add_layer_norm(x, torch.zeros(4, 9), None, None, 1e-5)
    with pytest.raises(ValueError, match="1..2048 channels"):
        add_layer_norm(torch.zeros(2, 4096), torch.zeros(2, 4096), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        add_layer_norm(x, x, torch.ones(9), None, 1e-5)
    with pytest.raises(RuntimeError, match="inference only"):
        add_layer_norm(x.requires_grad_(), x, None, None, 1e-5)


def test_operator_path_on_meta_moves_fewer_bytes_than_the_eager_ops():
    """On meta tensors (`as_operators`): one operator whose inputs and outputs are its modeled bytes, against the
    eager add + LayerNorm as counted (3 reads, 2 writes)."""
    x, y = torch.empty(64, 320, device="meta", dtype=torch.bfloat16), torch.empty(64, 320, device="meta",
                                                                                  dtype=torch.bfloat16)
    w = torch.empty(320, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), as_operators():
        fused, ops = count_bytes(add_layer_norm, x, y, w, w, 1e-5)
    eager, eager_ops = count_bytes(add_layer_norm_ref, x, y, w, w, 1e-5)
    assert ops == 1 and eager_ops >= 2
    assert fused == modeled_bytes(64, 320) + 2 * 320 * 2  # plus the affine
    assert 5 * fused < 4 * eager * 1.01


@pytest.mark.parametrize("cross", [True, False])
def test_transformer_blocks_use_it_at_inference(cross):
    """The spatial block (cross-attention) and the temporal block on token rows run their residual adds with the
    next LayerNorm as one kernel at inference with the kernels on (one `pdengine::add_layer_norm` per
    attention), equal to the PyTorch path; with gradients they run the eager ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pdengine.kernels.fused_linear import transformer_gemm
    from pdengine.model.layers import TransformerBlock

    torch.manual_seed(0)
    slow = TransformerBlock(32, 2, 16, 12 if cross else None)
    with torch.no_grad():
        for prm in slow.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    fast = TransformerBlock(32, 2, 16, 12 if cross else None, backend="triton")
    fast.load_state_dict(slow.state_dict())
    x, ctx = _t((2, 6, 32), 9, shift=0.3), _t((2, 4, 12), 10)

    def run(block):
        return block(x, ctx) if cross else block.forward_frames(x.reshape(12, 32), 3, 4).reshape(2, 6, 32)

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    names: list[str] = []
    with transformer_gemm("cublas"), torch.no_grad():
        assert_close(run(fast), run(slow), name="block", scale=2.0)
        with as_operators(), Names():
            run(fast)
    assert names.count("pdengine::add_layer_norm") == 2, names
    xs = x.clone().requires_grad_()
    names.clear()
    with transformer_gemm("cublas"), as_operators(), Names():
        (fast(xs, ctx) if cross else fast.forward_frames(xs.reshape(12, 32), 3, 4)).sum().backward()
    assert names and "pdengine::add_layer_norm" not in names and xs.grad is not None


def test_compile_specs_no_spills():
    assert_compiles_clean(compile_specs(), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, c", [(2 * 16 * 1024, 320), (2 * 16 * 64, 1280)])
def test_gpu_full_shapes_bf16(gpu, rows, c):
    """The top and 8x8 levels' token rows of one video's CFG batch, bf16 within 2x PyTorch's own bf16 error of
    the fp32 computation; the sum exactly as the eager bf16 add rounds it."""
    torch.manual_seed(0)
    x, y = torch.randn(rows, c, device="cuda") + 0.5, torch.randn(rows, c, device="cuda")
    w, b = 1.0 + 0.1 * torch.randn(c, device="cuda"), 0.1 * torch.randn(c, device="cuda")
    lp = [t.bfloat16() for t in (x, y, w, b)]
    with torch.no_grad():
        s, h = add_layer_norm(*lp, 1e-5)
        s_lp, h_lp = add_layer_norm_ref(*lp, 1e-5)
        _, h32 = add_layer_norm_ref(x, y, w, b, 1e-5)
    assert torch.equal(s, s_lp)
    assert_low_precision_close(h, h_lp, h32, name="bf16 norm")
