"""GEGLU kernel (`kernels/geglu.py`) against its PyTorch reference (`kernels/geglu_ref.py`, the eager
computation diffusers runs): forward and gradient, awkward shapes, strided inputs, low precision, input
errors, the operator path on meta tensors, the feed-forward and spatial transformer wired to it, compile
check."""

from __future__ import annotations

import pytest
import torch

from pdengine.bench.common import count_bytes
from pdengine.kernels import as_operators, geglu_ref
from pdengine.kernels.fused_linear import transformer_gemm
from pdengine.kernels.geglu import compile_specs, ff_geglu, geglu, modeled_bytes
from tests.kernel_utils import assert_close, assert_compiles_clean, assert_low_precision_close


def _p(shape, seed=0, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


@pytest.mark.parametrize("shape", [(1, 2), (37, 600), (2, 19, 520), (5, 1, 3, 34)])
def test_forward_and_gradient_match_reference(shape):
    """Rows not a multiple of the row block, widths not a multiple of 256, 2-4 dims."""
    p = _p(shape).requires_grad_()
    y = geglu(p)
    p_ref = p.detach().clone().requires_grad_()
    y_ref = geglu_ref.geglu_ref(p_ref)
    assert_close(y, y_ref, name="forward")
    dy = _p(y.shape, seed=1)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(p.grad, p_ref.grad, name="grad p")
    assert_close(geglu_ref.geglu_backward_ref(dy, p.detach()), p_ref.grad, name="closed-form backward reference")


def test_row_strided_input_and_expanded_gradient():
    """p as a column slice of a wider projection (row stride > 2I), read in place; a broadcast dy."""
    wide = _p((3, 7, 2 * 40 + 24))
    p = wide[..., :80].clone().requires_grad_()  # a leaf copy for the reference
    view = wide[..., :80]
    assert view.stride(-1) == 1 and view.stride(-2) == 104
    assert_close(geglu(view), geglu_ref.geglu_ref(p.detach()), name="row-strided forward")
    dy = _p((1, 1, 40), seed=2).expand(3, 7, 40)
    src = wide.clone().requires_grad_()
    geglu(src[..., :80]).backward(dy)
    p.requires_grad_()
    geglu_ref.geglu_ref(p).backward(dy)
    assert_close(src.grad[..., :80], p.grad, name="grad through the slice")
    assert torch.count_nonzero(src.grad[..., 80:]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    p32 = _p((45, 2 * 264)).requires_grad_()
    p_lp = p32.detach().to(dtype).requires_grad_()
    p_ref_lp = p32.detach().to(dtype).requires_grad_()
    y, y_ref_lp, y32 = geglu(p_lp), geglu_ref.geglu_ref(p_ref_lp), geglu_ref.geglu_ref(p32)
    assert y.dtype == dtype
    assert_low_precision_close(y, y_ref_lp, y32, name="forward")
    dy = _p(y.shape, seed=3)
    y.backward(dy.to(dtype))
    y_ref_lp.backward(dy.to(dtype))
    y32.backward(dy)
    assert p_lp.grad.dtype == dtype
    assert_low_precision_close(p_lp.grad, p_ref_lp.grad, p32.grad, name="gradient")


def test_empty_rows():
    p = torch.empty(0, 8)
    assert geglu(p).shape == (0, 4)


@pytest.mark.parametrize("make, match", [
    (lambda: torch.randn(4, 7), "even"),
    (lambda: torch.randn(8, 4).t(), "unit stride"),
    (lambda: torch.ones(4, 8, dtype=torch.int32), "floating-point"),
    (lambda: torch.randn(6, 5, 8).transpose(0, 1), "collapse into rows"),
])
def test_input_errors(make, match):
    with pytest.raises(ValueError, match=match):
        geglu(make())


def test_operator_path_on_meta_counts_the_fused_pass():
    """Inside `as_operators()` the entry point is the registered operator: on meta tensors it gives the
    shape without launching, and its counted bytes are the kernel's model, under the eager reference's."""
    p = torch.empty(64, 2 * 512, device="meta", dtype=torch.bfloat16)
    with as_operators():
        y = geglu(p)
        fused, ops = count_bytes(geglu, p)
    assert y.shape == (64, 512) and y.device.type == "meta"
    assert ops == 1
    assert fused == modeled_bytes(64, 512, torch.bfloat16)
    reference, _ = count_bytes(geglu_ref.geglu_ref, p)
    assert fused == 3 * reference // 5  # eager: gelu reads and writes I, the product reads 2I and writes I


def test_feed_forward_saves_only_the_projection():
    """Training memory: autograd keeps gelu(gate) (rows x I) in the eager feed-forward, not with the kernel;
    everything else it saves (the block input, the projection, the gated output) is the same."""
    from pdengine.model.layers import FeedForward

    def saved(backend: str) -> int:
        ff = FeedForward(32, backend=backend).to("meta").train()
        x = torch.empty(6, 10, 32, device="meta", requires_grad=True)
        params = {p.untyped_storage()._cdata for p in ff.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage()._cdata not in params:
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), as_operators():
            ff(x)
        return sum(storages.values())

    assert saved("torch") - saved("triton") == 6 * 10 * 4 * 32 * 4  # rows x I fp32


def test_feed_forward_and_spatial_transformer_use_the_kernels():
    """The UNet layers wired to the kernels equal the PyTorch path, forward and every gradient: the
    feed-forward (GEGLU kernel) and the spatial transformer (per-image GroupNorm-to-tokens, GEGLU, the
    residual layout kernel)."""
    from pdengine.model.layers import FeedForward, SpatialTransformer

    torch.manual_seed(0)
    for make, args in (
        (lambda: FeedForward(24), lambda: (_p((2, 5, 24)),)),
        (lambda: SpatialTransformer(32, 2, 16, 8, 12), lambda: (_p((3, 32, 3, 5)), _p((3, 4, 12), seed=4))),
    ):
        ref = make()
        with torch.no_grad():
            for prm in ref.parameters():
                prm.normal_(0.0, 0.1)
        fast = make()
        fast.load_state_dict(ref.state_dict())
        fast.backend = "triton"
        inputs = args()
        outs, grads = [], []
        for layer in (ref, fast):
            xs = [t.clone().requires_grad_() for t in inputs]
            out = layer(*xs)
            out.backward(torch.ones_like(out) + out.detach())
            outs.append(out.detach())
            grads.append([t.grad for t in xs] + [prm.grad for prm in layer.parameters()])
        assert_close(outs[1], outs[0], name=f"{type(ref).__name__} forward")
        for i, (got, want) in enumerate(zip(grads[1], grads[0])):
            assert_close(got, want, name=f"{type(ref).__name__} grad {i}", scale=3.0)


def _ff_inputs(m_shape, k, inner, dtype=torch.float32, seed=5):
    x = _p((*m_shape, k), seed=seed, scale=1.0).to(dtype)
    w = (_p((2 * inner, k), seed=seed + 1, scale=1.0) * k ** -0.5).to(dtype)
    b = _p((2 * inner,), seed=seed + 2, scale=0.5).to(dtype)
    return x, w, b


@pytest.mark.parametrize("m_shape, k, inner", [((37,), 40, 24), ((2, 70), 64, 64), ((1,), 8, 3), ((130,), 96, 70)])
def test_ff_geglu_matches_projection_then_gate(m_shape, k, inner):
    """Rows, K (with and without the EVEN_K path) and widths not multiples of the tile; fp32 exact products."""
    x, w, b = _ff_inputs(m_shape, k, inner)
    want = geglu_ref.geglu_ref(torch.nn.functional.linear(x, w, b))
    assert_close(ff_geglu(x, w, b), want, name="fused forward")
    assert_close(ff_geglu(x, w), geglu_ref.geglu_ref(torch.nn.functional.linear(x, w)), name="without bias")


def test_ff_geglu_row_strided_input_and_bf16():
    x, w, b = _ff_inputs((50,), 64, 40)
    wide = torch.cat([x, torch.full((50, 16), float("nan"))], dim=1)  # never read: only the first K columns
    assert_close(ff_geglu(wide[:, :64], w, b), geglu_ref.geglu_ref(torch.nn.functional.linear(x, w, b)),
                 name="row-strided x")
    lp = [t.bfloat16() for t in (x, w, b)]
    want32 = geglu_ref.geglu_ref(torch.nn.functional.linear(x, w, b))
    want_lp = geglu_ref.geglu_ref(torch.nn.functional.linear(*lp))
    got = ff_geglu(*lp)
    assert got.dtype == torch.bfloat16
    assert_low_precision_close(got, want_lp, want32, name="bf16 fused")


def test_ff_geglu_input_errors():
    x, w, b = _ff_inputs((4,), 8, 6)
    with pytest.raises(ValueError, match="inference"):
        ff_geglu(x.requires_grad_(), w, b)
    x = x.detach()
    with pytest.raises(ValueError, match="weight must be"):
        ff_geglu(x, w[:, :4], b)
    with pytest.raises(ValueError, match="bias must be"):
        ff_geglu(x, w, b[:5])
    with pytest.raises(ValueError, match="share dtype"):
        ff_geglu(x, w.double(), b)
    with pytest.raises(ValueError, match="must be one of"):
        with transformer_gemm("cudnn"):
            pass


def test_feed_forward_fused_mode_at_inference_only():
    """`transformer_gemm("fused")`: the feed-forward equals the PyTorch path without gradients (one fused operator), and
    with gradients it keeps the projection + gate kernel (its backward needs the projection)."""
    from pdengine.model.layers import FeedForward

    torch.manual_seed(0)
    ref = FeedForward(16)
    fast = FeedForward(16, backend="triton")
    fast.load_state_dict(ref.state_dict())
    x = _p((3, 5, 16), seed=7, scale=1.0)
    with transformer_gemm("fused"):
        with torch.no_grad():
            assert_close(fast(x), ref(x), name="fused feed-forward")
        with as_operators(), torch.no_grad():
            meta_ff = FeedForward(16, backend="triton").to("meta")
            ops = count_bytes(meta_ff, torch.empty(3, 5, 16, device="meta"))[1]
        assert ops == 2  # ff_geglu + the output projection: the projection output is never written
        xg = x.clone().requires_grad_()
        fast(xg).sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    assert_close(xg.grad, xr.grad, name="training keeps the unfused path")


def test_compile_specs_no_spills():
    assert_compiles_clean(compile_specs(), 7)


@pytest.mark.gpu
def test_gpu_full_shape_bf16(gpu):
    """The preset's widest feed-forward at the CFG batch of one video (2 x 16 frames x 32x32 tokens, I =
    1280), bf16, forward and gradient within 2x PyTorch's own bf16 error."""
    p32 = torch.randn(2 * 16 * 1024, 2 * 1280, device="cuda").requires_grad_()
    p_lp = p32.detach().bfloat16().requires_grad_()
    p_ref = p32.detach().bfloat16().requires_grad_()
    y, y_ref, y32 = geglu(p_lp), geglu_ref.geglu_ref(p_ref), geglu_ref.geglu_ref(p32)
    assert_low_precision_close(y, y_ref, y32, name="forward")
    dy = torch.randn_like(y32)
    for out, grad in ((y, dy.bfloat16()), (y_ref, dy.bfloat16()), (y32, dy)):
        out.backward(grad)
    assert_low_precision_close(p_lp.grad, p_ref.grad, p32.grad, name="gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k, inner", [(2 * 16 * 1024, 320, 1280), (2 * 16 * 64, 1280, 5120)])
def test_gpu_ff_geglu_full_shapes_bf16(gpu, rows, k, inner):
    """The fused projection + gate at the top and the 8x8 level of one video's CFG batch, bf16 within 2x
    PyTorch's own bf16 error (cuBLAS projection + eager gate) of the fp32 computation."""
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda")
    w = torch.randn(2 * inner, k, device="cuda") * k ** -0.5
    b = torch.randn(2 * inner, device="cuda") * 0.1
    want32 = geglu_ref.geglu_ref(torch.nn.functional.linear(x, w, b))
    lp = [t.bfloat16() for t in (x, w, b)]
    want_lp = geglu_ref.geglu_ref(torch.nn.functional.linear(*lp))
    assert_low_precision_close(ff_geglu(*lp), want_lp, want32, name="fused bf16")
