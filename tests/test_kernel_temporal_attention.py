"""Temporal attention kernels (through the Triton interpreter on CPU) vs the PyTorch reference and the model:
forward, log-sum-exp, backward, the layout kernels around the projections, and the sm80/sm90 compile check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdengine.kernels import temporal_attention as ta
from pdengine.kernels import temporal_attention_ref as ref
from pdengine.kernels.compile_check import ARCHS, compile_all
from pdengine.model.layers import TemporalTransformer, video_group_norm
from tests.kernel_utils import assert_close, assert_low_precision_close


def _qkv(b: int, f: int, p: int, heads: int, d: int, dtype=torch.float32, fused: bool = True, seed: int = 0):
    """q, k, v (N, heads*D) in (b, f, p) order: column slices of one fused projection, or three tensors."""
    g = torch.Generator().manual_seed(seed)
    n, width = b * f * p, heads * d
    if fused:
        qkv = torch.randn(n, 3 * width, generator=g).to(dtype)
        return qkv[:, :width], qkv[:, width:2 * width], qkv[:, 2 * width:]
    return tuple(torch.randn(n, width, generator=g).to(dtype) for _ in range(3))


# (B, F, P, D): F = 2, odd, 16, > 16 (F_PAD 32 and 64); P never a multiple of the pixel block; batch 1 and 2.
CASES = [(1, 2, 3, 32), (2, 5, 7, 64), (2, 16, 5, 64), (1, 17, 4, 32), (1, 33, 3, 32)]


@pytest.mark.parametrize("b, f, p, d", CASES)
def test_forward_fp32_and_lse(b, f, p, d):
    q, k, v = _qkv(b, f, p, 2, d, fused=(f % 2 == 1))
    o, lse = ta.temporal_attention_with_lse(q, k, v, f, 2, pixels=p)
    o_ref, lse_ref = ref.temporal_attention_ref(q, k, v, f, 2, pixels=p, return_lse=True)
    assert o.is_contiguous() and o.shape == q.shape and lse.shape == (2, q.shape[0])
    assert_close(o, o_ref, torch.float32, "o")
    assert_close(lse, lse_ref, torch.float32, "lse")


@pytest.mark.parametrize("d", [8, 40])
def test_head_dim_padding(d):
    """Head dims that are not a power of two >= 16 (the tiny test model uses 8) are padded in-kernel."""
    q, k, v = _qkv(2, 3, 5, 3, d)
    scale = 0.3
    assert_close(ta.temporal_attention(q, k, v, 3, 3, scale, pixels=5),
                 ref.temporal_attention_ref(q, k, v, 3, 3, scale, pixels=5), torch.float32, "o")


@pytest.mark.parametrize("b, f, p, d", [(2, 16, 5, 64), (1, 5, 7, 32), (1, 33, 3, 64)])
def test_forward_bf16(b, f, p, d):
    q, k, v = _qkv(b, f, p, 2, d, torch.bfloat16)
    o = ta.temporal_attention(q, k, v, f, 2, pixels=p)
    assert o.dtype == torch.bfloat16
    o_lp = ref.temporal_attention_ref(q, k, v, f, 2, pixels=p, upcast=False)
    o_32 = ref.temporal_attention_ref(q.float(), k.float(), v.float(), f, 2, pixels=p)
    assert_low_precision_close(o, o_lp, o_32, "o bf16")


def _grads(fn, inputs, do):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, do)


@pytest.mark.parametrize("b, f, p, d", [(1, 2, 3, 32), (2, 5, 7, 64), (1, 16, 5, 64), (1, 33, 3, 32)])
def test_backward_fp32(b, f, p, d):
    q, k, v = _qkv(b, f, p, 2, d, fused=False, seed=1)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    scale = 0.2
    _, got = _grads(lambda q, k, v: ta.temporal_attention(q, k, v, f, 2, scale, pixels=p), (q, k, v), do)
    _, want = _grads(lambda q, k, v: ref.temporal_attention_ref(q, k, v, f, 2, scale, pixels=p), (q, k, v), do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, torch.float32, name)


@pytest.mark.parametrize("b, f, p, d", [(2, 5, 3, 32), (1, 17, 4, 64)])
def test_backward_fused_qkv_fp32(b, f, p, d):
    """Gradients through column slices of one projection: the slice path and the fused-qkv entry point."""
    width = 2 * d
    qkv = torch.randn(b * f * p, 3 * width, generator=torch.Generator().manual_seed(3))
    do = torch.randn(b * f * p, width, generator=torch.Generator().manual_seed(4))

    def sliced(fn):
        return lambda t: fn(t[:, :width], t[:, width:2 * width], t[:, 2 * width:], f, 2, pixels=p)

    o_ref, (want,) = _grads(sliced(ref.temporal_attention_ref), (qkv,), do)
    _, (got_slices,) = _grads(sliced(ta.temporal_attention), (qkv,), do)
    o_fused, (got_fused,) = _grads(lambda t: ta.temporal_attention_qkv(t, f, 2, pixels=p), (qkv,), do)
    assert_close(o_fused, o_ref, torch.float32, "o (qkv)")
    assert_close(got_slices, want, torch.float32, "dqkv (slices)")
    assert_close(got_fused, want, torch.float32, "dqkv (fused)")


def test_backward_bf16():
    b, f, p, d = 2, 16, 5, 64
    q, k, v = _qkv(b, f, p, 2, d, torch.bfloat16, seed=5)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    _, got = _grads(lambda q, k, v: ta.temporal_attention(q, k, v, f, 2, pixels=p), (q, k, v), do)
    _, lp = _grads(lambda q, k, v: ref.temporal_attention_ref(q, k, v, f, 2, pixels=p, upcast=False), (q, k, v), do)
    _, fp = _grads(lambda q, k, v: ref.temporal_attention_ref(q, k, v, f, 2, pixels=p),
                   (q.float(), k.float(), v.float()), do.float())
    for name, g, w_lp, w_fp in zip(("dq", "dk", "dv"), got, lp, fp):
        assert g.dtype == torch.bfloat16
        assert_low_precision_close(g, w_lp, w_fp, name)


def test_inputs_untouched():
    q, k, v = _qkv(2, 5, 3, 2, 32)
    before = [t.clone() for t in (q, k, v)]
    ta.temporal_attention(q, k, v, 5, 2, pixels=3)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("case, match", [
    ("shape", "one shape"),
    ("dtype", "one dtype"),
    ("col_stride", "unit column stride"),
    ("heads", "does not divide"),
    ("rows", "not a multiple"),
    ("frames", "outside 1..64"),
    ("head_dim", "head dim"),
])
def test_input_errors(case, match):
    q, k, v, f, heads, p = *_qkv(1, 4, 3, 2, 32), 4, 2, 3
    if case == "shape":
        k = k[:-1]
    elif case == "dtype":
        v = v.double()
    elif case == "col_stride":
        q = torch.randn(64, q.shape[0]).t()
    elif case == "heads":
        heads = 3
    elif case == "rows":
        p = 5
    elif case == "frames":
        q, k, v = _qkv(1, 65, 1, 2, 32)
        f, p = 65, 1
    elif case == "head_dim":
        q, k, v = _qkv(1, 4, 3, 1, 256)
        heads = 1
    with pytest.raises(ValueError, match=match):
        ta.temporal_attention(q, k, v, f, heads, pixels=p)


# ------------------------------------------------------------------------------------- inside the temporal layer


def _random_temporal_transformer(channels: int, heads: int, head_dim: int, groups: int) -> TemporalTransformer:
    torch.manual_seed(0)
    layer = TemporalTransformer(channels, heads, head_dim, groups)
    with torch.no_grad():
        for name, prm in layer.named_parameters():  # nothing zero-initialised: every path must matter
            prm.copy_(torch.randn_like(prm) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return layer


def test_reference_is_the_model_attention():
    """The reference on (b, f, p) rows == our TemporalTransformer's own attention on (b p) f sequences,
    compared before to_out for both self-attentions of the block, with the kernel beside it."""
    b, f, h, w, heads, d = 2, 5, 2, 3, 2, 16
    channels, p = heads * d, h * w
    layer = _random_temporal_transformer(channels, heads, d, groups=4)
    block = layer.transformer_blocks[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in ("attn1", "attn2"):
        attn = getattr(block, name)
        hooks.append(attn.register_forward_pre_hook(lambda m, args, name=name: seen.update({f"{name}.in": args[0]})))
        hooks.append(attn.to_out[0].register_forward_pre_hook(
            lambda m, args, name=name: seen.update({f"{name}.pre_out": args[0]})))
    x = torch.randn(b * f, channels, h, w)
    with torch.no_grad():
        layer(x, f)
    for hook in hooks:
        hook.remove()

    def to_frame_rows(t: torch.Tensor) -> torch.Tensor:  # (b p) f c -> (b f p) c
        return t.reshape(b, p, f, -1).permute(0, 2, 1, 3).reshape(b * f * p, -1)

    for name in ("attn1", "attn2"):
        attn = getattr(block, name)
        tokens = to_frame_rows(seen[f"{name}.in"])
        with torch.no_grad():
            qkv = F.linear(tokens, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
            q, k, v = qkv[:, :channels], qkv[:, channels:2 * channels], qkv[:, 2 * channels:]
            expected = to_frame_rows(seen[f"{name}.pre_out"])
            assert_close(ref.temporal_attention_ref(q, k, v, f, heads, pixels=p), expected, torch.float32, name)
            assert_close(ta.temporal_attention(q, k, v, f, heads, pixels=p), expected, torch.float32, name)


def _kernel_temporal_transformer(layer: TemporalTransformer, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The whole temporal layer on this module's kernels, tokens kept in (b, f, p) rows throughout."""
    p = x.shape[2] * x.shape[3]
    norm = layer.norm
    t = ta.video_group_norm_to_tokens(x, num_frames, norm.weight, norm.bias, norm.num_groups, norm.eps)
    t = layer.proj_in(t)
    block = layer.transformer_blocks[0]
    for attn, attn_norm in ((block.attn1, block.norm1), (block.attn2, block.norm2)):
        qkv = F.linear(attn_norm(t), torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        t = t + attn.to_out[0](ta.temporal_attention_qkv(qkv, num_frames, attn.heads, pixels=p))
    t = t + block.ff(block.norm3(t))
    return ta.tokens_to_video_residual(layer.proj_out(t), x, num_frames)


def test_whole_temporal_layer_on_kernels_matches_model():
    """GroupNorm-to-tokens, attention (fused qkv) and residual kernels composed into the temporal layer:
    output and gradients equal the model's PyTorch path (permutes and all)."""
    b, f, h, w, heads, d, groups = 1, 5, 3, 3, 2, 16, 4
    layer = _random_temporal_transformer(heads * d, heads, d, groups)
    x = torch.randn(b * f, heads * d, h, w, generator=torch.Generator().manual_seed(7))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    params = [prm for prm in layer.parameters()]
    out, grads = _grads(lambda x: _kernel_temporal_transformer(layer, x, f), (x,), dy)
    out_ref, grads_ref = _grads(lambda x: layer(x, f), (x,), dy)
    assert_close(out, out_ref, torch.float32, "out")
    # Gradients cross a whole layer of fp32 ops summed in other orders: 3x the per-op tolerance.
    assert_close(grads[0], grads_ref[0], torch.float32, "dx", scale=3.0)
    x_req = x.clone().requires_grad_()
    g_kernel = torch.autograd.grad(_kernel_temporal_transformer(layer, x_req, f), params, dy)
    g_model = torch.autograd.grad(layer(x_req, f), params, dy)
    for i, (g, g_ref) in enumerate(zip(g_kernel, g_model)):
        assert_close(g, g_ref, torch.float32, f"param {i}", scale=3.0)


# ------------------------------------------------------------------------------------------------ layout kernels


@pytest.mark.parametrize("b, f, c, groups, h, w", [(2, 5, 12, 4, 3, 5), (1, 16, 10, 2, 9, 9), (1, 3, 70, 7, 4, 2)])
def test_group_norm_to_tokens_fp32(b, f, c, groups, h, w):
    """Channels per group 3 and 5 (not powers of two), H*W not a block multiple, |mean| >> std."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(b * f, c, h, w, generator=g) * 2.0 + 30.0
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dy = torch.randn(b * f * h * w, c, generator=g)
    y, (dx, dw, db) = _grads(lambda x, wt, bs: ta.video_group_norm_to_tokens(x, f, wt, bs, groups, 1e-6),
                             (x, weight, bias), dy)
    y_ref, grads_ref = _grads(lambda x, wt, bs: ref.video_group_norm_to_tokens_ref(x, f, wt, bs, groups, 1e-6),
                              (x, weight, bias), dy)
    assert y.shape == (b * f * h * w, c) and y.is_contiguous()
    assert_close(y, y_ref, torch.float32, "tokens")
    assert_close(dx, grads_ref[0], torch.float32, "dx")
    # dweight / dbias are sums over all B*F*H*W tokens (the reference sums in float64): an fp32 sum of n
    # terms is accurate to ~1e-7 sqrt(n) of its terms' scale, so small entries get an absolute bound set by
    # the largest gradient rather than by their own size.
    for name, got, want in zip(("dweight", "dbias"), (dw, db), grads_ref[1:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)
    # The reference is the model's own video GroupNorm followed by the permute it replaces.
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        model = video_group_norm(x, f, norm).permute(0, 2, 3, 1).reshape(-1, c)
    assert_close(y_ref, model, torch.float32, "reference vs model")


def test_group_norm_to_tokens_bf16_and_no_affine():
    b, f, c, groups, h, w = 2, 4, 12, 3, 5, 3
    x = torch.randn(b * f, c, h, w, generator=torch.Generator().manual_seed(10)).bfloat16()
    weight = torch.randn(c, generator=torch.Generator().manual_seed(11))
    y = ta.video_group_norm_to_tokens(x, f, weight, None, groups, 1e-5)
    assert y.dtype == torch.bfloat16
    assert_low_precision_close(y, ref.video_group_norm_to_tokens_ref(x, f, weight, None, groups, 1e-5, upcast=False),
                               ref.video_group_norm_to_tokens_ref(x.float(), f, weight, None, groups, 1e-5), "bf16")
    assert_close(ta.video_group_norm_to_tokens(x.float(), f, None, None, groups, 1e-5),
                 ref.video_group_norm_to_tokens_ref(x.float(), f, None, None, groups, 1e-5), torch.float32, "plain")


def test_group_norm_to_tokens_backward_kernels_partial_grads_and_strided_dy():
    """The two backward kernels: only x needs a gradient (no weight, no bias); then weight and bias only;
    a token gradient with a row stride (a column slice) is read in place."""
    b, f, c, groups, h, w = 2, 3, 10, 5, 3, 3
    g = torch.Generator().manual_seed(13)
    x = torch.randn(b * f, c, h, w, generator=g) * 0.5 - 4.0
    weight = torch.randn(c, generator=g)
    dy = torch.randn(b * f * h * w, 2 * c, generator=g)[:, c:]
    (dx,) = _grads(lambda x: ta.video_group_norm_to_tokens(x, f, None, None, groups, 1e-5), (x,), dy)[1]
    (dx_ref,) = _grads(lambda x: ref.video_group_norm_to_tokens_ref(x, f, None, None, groups, 1e-5), (x,), dy)[1]
    assert_close(dx, dx_ref, torch.float32, "dx, no affine")
    bias = torch.randn(c, generator=g)
    got = _grads(lambda wt, bs: ta.video_group_norm_to_tokens(x, f, wt, bs, groups, 1e-5), (weight, bias), dy)[1]
    want = _grads(lambda wt, bs: ref.video_group_norm_to_tokens_ref(x, f, wt, bs, groups, 1e-5), (weight, bias),
                  dy)[1]
    for name, gt, wn in zip(("dweight", "dbias"), got, want):
        assert_close(gt, wn, torch.float32, name)


def test_group_norm_to_tokens_backward_bf16():
    b, f, c, groups, h, w = 2, 4, 12, 3, 5, 3
    g = torch.Generator().manual_seed(14)
    x = torch.randn(b * f, c, h, w, generator=g)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    dy = torch.randn(b * f * h * w, c, generator=g)
    got = _grads(lambda x: ta.video_group_norm_to_tokens(x, f, weight, bias, groups, 1e-5), (x.bfloat16(),),
                 dy.bfloat16())[1][0]
    lp = _grads(lambda x: ref.video_group_norm_to_tokens_ref(x, f, weight, bias, groups, 1e-5, upcast=False),
                (x.bfloat16(),), dy.bfloat16())[1][0]
    want = _grads(lambda x: ref.video_group_norm_to_tokens_ref(x, f, weight, bias, groups, 1e-5), (x,), dy)[1][0]
    assert got.dtype == torch.bfloat16
    assert_low_precision_close(got, lp, want, "dx bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_to_video_residual(dtype):
    b, f, c, h, w = 2, 3, 70, 5, 3
    g = torch.Generator().manual_seed(12)
    x = torch.randn(b * f, c, h, w, generator=g).to(dtype)
    t = torch.randn(b * f * h * w, 2 * c, generator=g).to(dtype)[:, c:]  # row stride 2C: a column slice
    dout = torch.randn(x.shape, generator=g).to(dtype)
    out, (dt, dx) = _grads(lambda t, x: ta.tokens_to_video_residual(t, x, f), (t, x), dout)
    out_ref, (dt_ref, dx_ref) = _grads(lambda t, x: ref.tokens_to_video_residual_ref(t, x, f), (t, x), dout)
    assert out.shape == x.shape and out.dtype == dtype
    # One rounding of an fp32 sum either way: equal in fp32, within one bf16 ulp in bf16.
    assert_close(out, out_ref, dtype, "out")
    assert torch.equal(dt, dt_ref) and torch.equal(dx, dx_ref)


def test_layout_input_errors():
    x = torch.randn(6, 12, 3, 3)
    with pytest.raises(ValueError, match="does not divide"):
        ta.video_group_norm_to_tokens(x, 3, None, None, 5, 1e-6)
    with pytest.raises(ValueError, match="num_frames=4"):
        ta.video_group_norm_to_tokens(x, 4, None, None, 4, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        ta.tokens_to_video_residual(torch.randn(54, 12), x.transpose(2, 3), 3)
    with pytest.raises(ValueError, match="token rows"):
        ta.tokens_to_video_residual(torch.randn(54, 11), x, 3)


# ------------------------------------------------------------------------------------- modeled bytes, compile


def test_modeled_bytes_counts_every_tensor_once():
    b, f, p, heads, d = 2, 16, 1024, 5, 64
    tensor = torch.empty(b * f * p, heads * d, dtype=torch.bfloat16)
    nbytes = tensor.numel() * tensor.element_size()
    lse = b * f * p * heads * 4
    assert ta.modeled_bytes(b, f, p, heads, d, torch.bfloat16) == 4 * nbytes + lse  # q, k, v in; o out
    assert ta.modeled_bytes(b, f, p, heads, d, torch.bfloat16, backward=True) == 8 * nbytes + lse
    # The permute path moves 3x the forward's q/k/v/o bytes.
    assert ref.reference_path_bytes(b, f, p, heads, d) == 12 * nbytes + lse
    layout = ta.modeled_layout_bytes(b, f, p, heads * d, 32)
    assert layout["tokens_to_video_residual"] == 3 * nbytes


def _specs(primary: bool) -> list:
    def is_primary(name: str) -> bool:  # the pixeldance launches: bf16, F = 16, head dim 64
        return name.endswith("bf16") and "f64" not in name and "d128" not in name

    return [s for s in ta.compile_specs() if is_primary(s.name) == primary]


def _check_compiles(specs: list) -> None:
    reports = compile_all(specs)  # in child processes with the interpreter off, side by side
    assert len(reports) == len(specs) * len(ARCHS)
    bounds = {s.name: s.max_narrow_global for s in specs}
    for r in reports:
        assert r.spills == 0, f"{r.name} sm{r.arch} spills {r.spills} bytes"
        if r.expects_mma:
            assert r.mma_instructions > 0, f"{r.name} sm{r.arch} has no tensor-core instructions"
        if bounds[r.name] is not None:  # the layout kernels move their activations as 16-byte vectors
            assert r.narrow_global <= bounds[r.name] and r.vector_global > 0, (r.name, r.arch, r.narrow_global)


def test_compile_specs_are_distinct_and_attention_expects_mma():
    specs = ta.compile_specs()
    keys = [(tuple(sorted(s.signature.items())), tuple(sorted(s.constexprs.items())), s.num_warps) for s in specs]
    assert len(set(keys)) == len(keys), "compile_specs lists a configuration twice"
    assert all(s.expects_mma == s.name.startswith("temporal_attn") for s in specs)


def test_compile_pixeldance_specs_no_spills():
    _check_compiles(_specs(primary=True))


@pytest.mark.slow
def test_compile_other_specs_no_spills():
    _check_compiles(_specs(primary=False))
