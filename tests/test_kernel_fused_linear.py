"""Fused linear kernels (`kernels/fused_linear.py`: row statistics, the LayerNorm folded into the projection,
the residual add in the epilogue; the feed-forward's fused projection + gate with a folded norm) against
their PyTorch references (`kernels/fused_linear_ref.py`, the eager passes the transformer block runs):
awkward shapes, strided inputs, low precision, input errors, the operator path on meta, the transformer
blocks in the fused mode, compile check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdengine.bench.common import count_bytes
from pdengine.kernels import as_operators
from pdengine.kernels import fused_linear_ref as ref
from pdengine.kernels.fused_linear import (
    compile_specs,
    fold_layer_norm,
    fused_linear,
    group_norm_fold_ok,
    group_norm_linear,
    layer_norm_linear,
    linear_to_video_residual,
    merge_row_stats,
    modeled_bytes,
    row_stats,
    transformer_gemm,
    video_group_stats,
    video_layout_ok,
)
from pdengine.kernels.geglu import ff_geglu
from pdengine.kernels.geglu_ref import geglu_ref
from tests.kernel_utils import assert_close, assert_compiles_clean, assert_low_precision_close


def _t(shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g) + shift


def _layer(k, n, seed=1, bias=True, affine=True):
    """A LayerNorm's affine (gamma, beta) and the linear layer after it."""
    gamma = 1.0 + 0.5 * _t((k,), seed) if affine else None
    beta = 0.3 * _t((k,), seed + 1) if affine else None
    w = _t((n, k), seed + 2) * k ** -0.5
    b = 0.2 * _t((n,), seed + 3) if bias else None
    return gamma, beta, w, b


@pytest.mark.parametrize("shape", [(1, 8), (37, 40), (2, 9, 1100), (5, 3, 320)])
def test_row_stats_match_reference(shape):
    """Rows not a multiple of the row block, K not a power of two, K over one 1024-column step; a mean far
    from zero (the centred second pass keeps the variance exact)."""
    x = _t(shape, scale=2.0, shift=300.0)
    mean, rstd = row_stats(x, 1e-5)
    mean_ref, rstd_ref = ref.row_stats_ref(x, 1e-5)
    assert mean.shape == rstd.shape == (x.numel() // shape[-1],) and mean.dtype == torch.float32
    assert_close(mean, mean_ref, name="mean")
    assert_close(rstd, rstd_ref, name="rstd")


@pytest.mark.parametrize("m_shape, k, n", [((37,), 40, 24), ((2, 70), 64, 128), ((1,), 8, 3), ((130,), 96, 70)])
@pytest.mark.parametrize("affine, bias", [(True, True), (False, False), (True, False)])
def test_layer_norm_linear_matches_norm_then_linear(m_shape, k, n, affine, bias):
    """Rows, K (with and without the EVEN_K path) and N not multiples of the tiles; with and without the
    norm's affine and the linear's bias; fp32 exact products."""
    x = _t((*m_shape, k), seed=4, scale=1.5, shift=0.5)
    gamma, beta, w, b = _layer(k, n, affine=affine, bias=bias)
    folded = fold_layer_norm(gamma, beta, 1e-5, w, b)
    want = ref.layer_norm_linear_ref(x, gamma, beta, 1e-5, w, b)
    assert_close(layer_norm_linear(x, folded), want, name="folded LayerNorm + linear")


@pytest.mark.parametrize("m_shape, k, n", [((37,), 40, 24), ((3, 50), 64, 64)])
def test_residual_epilogue_with_and_without_norm(m_shape, k, n):
    x = _t((*m_shape, k), seed=5)
    res = _t((*m_shape, n), seed=6)
    gamma, beta, w, b = _layer(k, n, seed=7)
    assert_close(fused_linear(x, w, b, residual=res), ref.linear_residual_ref(x, w, b, res), name="residual")
    assert_close(fused_linear(x, w, None, residual=res), ref.linear_residual_ref(x, w, None, res),
                 name="residual without bias")
    assert_close(fused_linear(x, w), F.linear(x, w), name="plain")
    folded = fold_layer_norm(gamma, beta, 1e-5, w, b)
    got = fused_linear(x, folded.weight, folded.bias, stats=row_stats(x, 1e-5), colsum=folded.colsum, residual=res)
    assert_close(got, res + ref.layer_norm_linear_ref(x, gamma, beta, 1e-5, w, b), name="norm and residual")


def test_row_strided_inputs_are_read_in_place():
    """x and the residual as column slices of wider rows (row stride > K); the extra columns are never read."""
    x = _t((50, 64), seed=8)
    res = _t((50, 32), seed=9)
    wide_x = torch.cat([x, torch.full((50, 16), float("nan"))], dim=1)[:, :64]
    wide_r = torch.cat([res, torch.full((50, 8), float("nan"))], dim=1)[:, :32]
    assert wide_x.stride(0) == 80 and wide_r.stride(0) == 40
    gamma, beta, w, b = _layer(64, 32, seed=10)
    folded = fold_layer_norm(gamma, beta, 1e-5, w, b)
    assert_close(row_stats(wide_x, 1e-5)[1], ref.row_stats_ref(x, 1e-5)[1], name="row-strided stats")
    got = fused_linear(wide_x, folded.weight, folded.bias, stats=row_stats(wide_x, 1e-5), colsum=folded.colsum,
                       residual=wide_r)
    assert_close(got, res + ref.layer_norm_linear_ref(x, gamma, beta, 1e-5, w, b), name="row-strided linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_shape, n", [((37,), 24), ((2, 50), 200), ((3,), 130)])
def test_statistics_from_the_epilogue(dtype, m_shape, n):
    """`stats_out`: the output rows' LayerNorm statistics from the GEMM's epilogue (per column tile, merged in
    a fixed order) equal `row_stats` of the output as stored; N not a multiple of the tile (one to four tiles),
    a residual with a large mean (the per-tile centring keeps the variance exact)."""
    x = _t((*m_shape, 48), seed=34).to(dtype)
    w = (_t((n, 48), seed=35) * 48 ** -0.5).to(dtype)
    res = _t((*m_shape, n), seed=36, shift=40.0).to(dtype)
    y, partials = fused_linear(x, w, None, residual=res, stats_out=True)
    assert_close(y, fused_linear(x, w, None, residual=res), name="output unchanged", dtype=dtype)
    mean, rstd = merge_row_stats(partials, 1e-5)
    mean_ref, rstd_ref = ref.row_stats_ref(y, 1e-5)
    assert_close(mean, mean_ref, name="mean")
    assert_close(rstd, rstd_ref, name="rstd", scale=10.0)
    with pytest.raises(ValueError, match="tiles do not cover"):
        merge_row_stats(partials._replace(width=n + 200), 1e-5)


@pytest.mark.parametrize("bf, hw, k, c", [(3, (4, 4), 24, 20), (2, (4, 8), 40, 64), (2, (8, 8), 64, 70),
                                         (1, (16, 12), 32, 16)])
def test_linear_to_video_residual(bf, hw, k, c):
    """proj_out + the way back to the (B*F, C, H, W) layout + the residual in one GEMM: images of 16, 32, 64
    and 192 pixels (row tiles of 16 to 64 that never straddle two images), odd channel counts."""
    h, w = hw
    t = _t((bf * h * w, k), seed=30)
    x = _t((bf, c, h, w), seed=31)
    wgt, b = _t((c, k), seed=32) * k ** -0.5, 0.2 * _t((c,), seed=33)
    want = ref.linear_to_video_residual_ref(t, wgt, b, x)
    assert_close(linear_to_video_residual(t, wgt, b, x), want, name="to video")
    assert_close(linear_to_video_residual(t, wgt, None, x), ref.linear_to_video_residual_ref(t, wgt, None, x),
                 name="to video, no bias")
    lp = [u.bfloat16() for u in (t, wgt, b, x)]
    assert_low_precision_close(linear_to_video_residual(*lp), ref.linear_to_video_residual_ref(*lp), want,
                               name="to video bf16")


def test_linear_to_video_needs_whole_row_tiles_per_image():
    assert video_layout_ok(16, torch.bfloat16) and video_layout_ok(1024, torch.float32)
    assert not video_layout_ok(24, torch.bfloat16) and not video_layout_ok(8, torch.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        linear_to_video_residual(_t((2 * 24, 8)), _t((4, 8)), None, _t((2, 4, 4, 6)))
    with pytest.raises(ValueError, match="token rows"):
        linear_to_video_residual(_t((5, 8)), _t((4, 8)), None, _t((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="weight must be"):
        linear_to_video_residual(_t((32, 8)), _t((5, 8)), None, _t((2, 4, 4, 4)))


@pytest.mark.parametrize("b, f, c, groups, hw, n", [(2, 3, 24, 8, (8, 8), 40), (1, 2, 32, 4, (8, 16), 48),
                                                     (3, 1, 20, 5, (8, 8), 24)])
def test_group_norm_linear_matches_norm_permute_linear(b, f, c, groups, hw, n):
    """A transformer's GroupNorm (per video), permute to token rows and proj_in as one GEMM that normalises x
    as it loads it: channels per group not a power of two, K not a multiple of the K step, one frame per video
    (the spatial transformers), a mean far from zero (|mean| >> std: the statistics and the prologue centre
    before scaling); fp32 tight, bf16 within 2x of PyTorch's own bf16 path; the next LayerNorm's statistics
    from the epilogue."""
    x = _t((b * f, c, *hw), seed=50, scale=0.5, shift=30.0)
    gamma, beta, w, bias = _layer(c, n, seed=51)
    want = ref.group_norm_linear_ref(x, f, gamma, beta, groups, 1e-6, w, bias)
    stats = video_group_stats(x, f, groups, 1e-6)
    mean_ref, rstd_ref = ref.video_group_stats_ref(x, f, groups, 1e-6)
    assert_close(stats[0], mean_ref, name="group mean")
    assert_close(stats[1], rstd_ref, name="group rstd", scale=10.0)
    folded = fold_layer_norm(gamma, beta, 1e-6, w, bias)
    got = group_norm_linear(x, f, stats, folded)
    assert got.shape == (b * f * hw[0] * hw[1], n)
    assert_close(got, want, name="group norm + proj_in", scale=2.0)
    y, partials = group_norm_linear(x, f, stats, folded, stats_out=True)
    assert torch.equal(y, got)
    mean, rstd = merge_row_stats(partials, 1e-5)
    mean_y, rstd_y = ref.row_stats_ref(y, 1e-5)
    assert_close(mean, mean_y, name="next norm's mean")
    assert_close(rstd, rstd_y, name="next norm's rstd", scale=10.0)
    lp = [u.bfloat16() for u in (x, gamma, beta, w, bias)]
    got16 = group_norm_linear(lp[0], f, video_group_stats(lp[0], f, groups, 1e-6),
                              fold_layer_norm(lp[1], lp[2], 1e-6, lp[3], lp[4]))
    assert got16.dtype == torch.bfloat16
    assert_low_precision_close(got16, ref.group_norm_linear_ref(lp[0], f, *lp[1:3], groups, 1e-6, *lp[3:]),
                               want, name="group norm + proj_in bf16")


def test_group_norm_linear_inputs():
    """Images whose pixels would make row tiles under 64 (the 4x4 level) or straddle two images are refused
    (the layout kernel runs there), as are gradients and mismatched statistics."""
    assert group_norm_fold_ok(64, torch.bfloat16) and group_norm_fold_ok(1024, torch.float32)
    assert not group_norm_fold_ok(16, torch.bfloat16) and not group_norm_fold_ok(96, torch.float32)
    gamma, beta, w, bias = _layer(8, 12, seed=52)
    folded = fold_layer_norm(gamma, beta, 1e-6, w, bias)
    x = _t((2, 8, 4, 4), seed=53)
    with pytest.raises(ValueError, match="multiple of 64"):
        group_norm_linear(x, 1, video_group_stats(x, 1, 2, 1e-6), folded)
    x = _t((4, 8, 8, 8), seed=53)
    with pytest.raises(ValueError, match="statistics"):
        group_norm_linear(x, 2, video_group_stats(x, 1, 2, 1e-6), folded)
    with pytest.raises(ValueError, match="F = 3 dividing"):
        video_group_stats(x, 3, 2, 1e-6)
    with pytest.raises(ValueError, match="inference"):
        group_norm_linear(x.requires_grad_(), 2, video_group_stats(x.detach(), 2, 2, 1e-6), folded)


def test_low_precision():
    """bf16 operands (tensor cores on a GPU): the folded norm's error within 2x of PyTorch's own bf16
    LayerNorm + linear, and the residual epilogue's within 2x of its bf16 linear + add, both against fp32."""
    x32 = _t((90, 128), seed=11, scale=2.0, shift=1.0)
    res32 = _t((90, 96), seed=12)
    gamma, beta, w, b = _layer(128, 96, seed=13)
    lp = [t.bfloat16() for t in (x32, gamma, beta, w, b, res32)]
    xl, gl, bl, wl, bbl, rl = lp
    folded = fold_layer_norm(gl, bl, 1e-5, wl, bbl)
    assert folded.weight.dtype == torch.bfloat16 and folded.bias.dtype == torch.float32
    got = layer_norm_linear(xl, folded)
    assert got.dtype == torch.bfloat16
    assert_low_precision_close(got, ref.layer_norm_linear_ref(xl, gl, bl, 1e-5, wl, bbl),
                               ref.layer_norm_linear_ref(x32, gamma, beta, 1e-5, w, b), name="bf16 norm + linear")
    assert_low_precision_close(fused_linear(xl[:, :96], wl[:, :96].contiguous(), bbl, residual=rl),
                               ref.linear_residual_ref(xl[:, :96], wl[:, :96], bbl, rl),
                               ref.linear_residual_ref(x32[:, :96], w[:, :96], b, res32), name="bf16 residual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ff_geglu_with_a_folded_norm(dtype):
    """The feed-forward's first half after its LayerNorm: GEGLU(linear(layer_norm(x))) in one GEMM whose
    epilogue applies the norm and the gate (the norm's output and the projection never stored)."""
    x = _t((45, 64), seed=14, scale=1.5, shift=-0.7)
    gamma, beta, w, b = _layer(64, 2 * 40, seed=15)
    want32 = geglu_ref(ref.layer_norm_linear_ref(x, gamma, beta, 1e-5, w, b))
    xl, gl, bl, wl, bbl = (t.to(dtype) for t in (x, gamma, beta, w, b))
    folded = fold_layer_norm(gl, bl, 1e-5, wl, bbl)
    got = ff_geglu(xl, folded.weight, folded.bias, stats=row_stats(xl, 1e-5), colsum=folded.colsum)
    if dtype == torch.float32:
        assert_close(got, want32, name="fp32")
    else:
        assert_low_precision_close(got, geglu_ref(ref.layer_norm_linear_ref(xl, gl, bl, 1e-5, wl, bbl)), want32,
                                   name="bf16")


def test_input_errors():
    x = _t((4, 8))
    w = _t((6, 8))
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear(x, w[:, :4])
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear(x, w, torch.ones(5))
    with pytest.raises(ValueError, match="share dtype"):
        fused_linear(x, w.double())
    with pytest.raises(ValueError, match="go together"):
        fused_linear(x, w, stats=row_stats(x, 1e-5))
    with pytest.raises(ValueError, match="mean must be"):
        fused_linear(x, w, stats=row_stats(x[:3], 1e-5), colsum=torch.zeros(6))
    with pytest.raises(ValueError, match="colsum must be"):
        fused_linear(x, w, stats=row_stats(x, 1e-5), colsum=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual must be"):
        fused_linear(x, w, residual=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="unit last-dim stride"):
        row_stats(x.t(), 1e-5)
    with pytest.raises(ValueError, match="without a copy"):
        row_stats(_t((6, 5, 8)).transpose(0, 1), 1e-5)
    with pytest.raises(ValueError, match="inference"):
        fused_linear(x.clone().requires_grad_(), w)
    with pytest.raises(ValueError, match="ln_weight must be"):
        fold_layer_norm(torch.ones(7), None, 1e-5, w)
    with pytest.raises(ValueError, match="must be one of"):
        with transformer_gemm("cudnn"):
            pass


def test_operator_path_on_meta_counts_the_model():
    """Inside `as_operators()` each entry point is one registered operator: on meta tensors it gives the
    shape without launching, and its counted bytes are the kernel's model (weights aside), fewer than the
    eager LayerNorm + linear + residual add."""
    rows, k, n = 256, 320, 960
    x = torch.empty(rows, k, device="meta", dtype=torch.bfloat16)
    res = torch.empty(rows, n, device="meta", dtype=torch.bfloat16)
    folded = fold_layer_norm(torch.empty(k, device="meta", dtype=torch.bfloat16),
                             torch.empty(k, device="meta", dtype=torch.bfloat16), 1e-5,
                             torch.empty(n, k, device="meta", dtype=torch.bfloat16))
    weight_bytes = n * k * 2 + 2 * n * 4

    def fused():
        s = row_stats(x, 1e-5)
        return fused_linear(x, folded.weight, folded.bias, stats=s, colsum=folded.colsum, residual=res)

    with as_operators():
        assert fused().shape == (rows, n)
        counted, ops = count_bytes(fused)
    assert ops == 2
    assert counted - weight_bytes == modeled_bytes(rows, k, n, torch.bfloat16, norm=True, residual=True)
    ln = torch.nn.LayerNorm(k, device="meta", dtype=torch.bfloat16)
    eager, _ = count_bytes(lambda: res + F.linear(ln(x), folded.weight))
    assert counted < eager


def _block_pair(cross: bool):
    from pdengine.model.layers import TransformerBlock

    torch.manual_seed(0)
    ctx_dim = 12 if cross else None
    slow = TransformerBlock(32, 2, 16, ctx_dim)
    with torch.no_grad():
        for prm in slow.parameters():
            prm.add_(0.1 * torch.randn_like(prm))  # non-trivial LayerNorm affines
    fast = TransformerBlock(32, 2, 16, ctx_dim, backend="triton")
    fast.load_state_dict(slow.state_dict())
    return slow.eval(), fast.eval()


def test_transformer_blocks_fused_mode_equal_the_pytorch_path():
    """`transformer_gemm("fused")` at inference: the spatial block (SDPA, text cross-attention) and the
    temporal block on token rows (the attention kernel) equal the PyTorch path; the folded weights are
    computed once and recomputed after a weight changes; with gradients the block runs the unfused path."""
    slow, fast = _block_pair(cross=True)
    x, ctx = _t((3, 10, 32), seed=20, shift=0.4), _t((3, 4, 12), seed=21)
    with transformer_gemm("fused"), torch.no_grad():
        assert_close(fast(x, ctx), slow(x, ctx), name="spatial block", scale=2.0)
        folds = fast._folds()
        fast(x, ctx)
        assert fast._folds() is folds
        fast.norm3.weight.mul_(1.5)
        slow.norm3.weight.mul_(1.5)
        assert fast._folds() is not folds
        assert_close(fast(x, ctx), slow(x, ctx), name="spatial block after a weight change", scale=2.0)

    slow, fast = _block_pair(cross=False)
    frames, pixels = 3, 5
    t = _t((2 * frames * pixels, 32), seed=22)
    # The PyTorch path on (b p) f sequences; the kernel path on (b f p) token rows.
    seq = t.view(2, frames, pixels, 32).permute(0, 2, 1, 3).reshape(2 * pixels, frames, 32)
    with transformer_gemm("fused"), torch.no_grad():
        want = slow(seq).view(2, pixels, frames, 32).permute(0, 2, 1, 3).reshape(-1, 32)
        assert_close(fast.forward_frames(t, frames, pixels), want, name="temporal block", scale=2.0)
        with as_operators():
            meta = _block_pair(cross=False)[1].to("meta")
            meta._folds()  # once per weight version, not per call: outside the count
            fused_bytes, fused_ops = count_bytes(meta.forward_frames, t.to("meta"), frames, pixels)
    with as_operators(), torch.no_grad():
        plain_bytes, plain_ops = count_bytes(meta.forward_frames, t.to("meta"), frames, pixels)
    assert fused_ops < plain_ops and fused_bytes < plain_bytes

    slow, fast = _block_pair(cross=True)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with transformer_gemm("fused"):
        fast(xf, ctx).sum().backward()
    slow(xs, ctx).sum().backward()
    assert_close(xf.grad, xs.grad, name="training keeps the unfused path", scale=2.0)


@pytest.mark.parametrize("temporal, side", [(False, 4), (True, 4), (False, 8), (True, 8)])
def test_transformers_fused_mode_equal_the_pytorch_path(temporal, side, monkeypatch):
    """Whole spatial and temporal transformers in the fused mode at inference (proj_out goes straight back to
    the video layout with the residual; at 8x8 the GroupNorm folds into proj_in too) equal the PyTorch path,
    with fewer ops and bytes than the kernels' unfused path."""
    from pdengine.model.layers import SpatialTransformer, TemporalTransformer

    torch.manual_seed(0)

    def make(backend):
        m = TemporalTransformer(32, 2, 16, 8, backend=backend) if temporal else \
            SpatialTransformer(32, 2, 16, 8, 12, backend=backend)
        return m.eval()

    slow, fast = make("torch"), make("triton")
    with torch.no_grad():
        for prm in slow.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    fast.load_state_dict(slow.state_dict())
    x = _t((2 * 3, 32, side, side), seed=40)
    args = (3,) if temporal else (_t((6, 5, 12), seed=41),)
    import pdengine.kernels.fused_linear as fl

    folds = []
    original = fl.group_norm_linear
    monkeypatch.setattr(fl, "group_norm_linear", lambda *a, **k: folds.append(1) or original(*a, **k))
    with transformer_gemm("fused"), torch.no_grad():
        assert_close(fast(x, *args), slow(x, *args), name="fused transformer", scale=2.0)
    assert len(folds) == (side == 8)  # the GroupNorm folded into proj_in where the images allow
    meta = make("triton").to("meta")
    margs = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    counts = {}
    for mode in ("fused", "cublas"):
        with transformer_gemm(mode), torch.no_grad(), as_operators():
            meta(x.to("meta"), *margs)  # the folded weights, once
            counts[mode] = count_bytes(meta, x.to("meta"), *margs)
    assert counts["fused"][0] < counts["cublas"][0] and counts["fused"][1] < counts["cublas"][1]


def test_auto_mode_follows_the_launch_table():
    """"auto" (the default) runs the fused GEMMs only where the device's launch table records that `pdengine
    tune` chose them; without a table or a record, cuBLAS; a forced mode wins over the table."""
    from pdengine.kernels import temporal_conv as tc
    from pdengine.kernels import temporal_conv_table as ct
    from pdengine.kernels.fused_linear import transformer_gemm_for

    cpu = torch.device("cpu")
    fused = ct.parse({"device": "g", "entries": [], "transformer_gemm": {"choice": "fused"}}, "test")
    plain = ct.parse({"device": "g", "entries": []}, "test")
    per_level = ct.parse({"device": "g", "entries": [], "transformer_gemm": {
        "choice": "per_level", "levels": {"spatial:16:16": "fused", "temporal:16:16": "cublas"}}}, "test")
    with transformer_gemm("auto"):
        assert transformer_gemm_for(cpu) == "cublas"  # no table on the CPU
        with tc.launch_table(plain):
            assert transformer_gemm_for(cpu) == "cublas"
        with tc.launch_table(per_level):
            assert transformer_gemm_for(cpu) == "per_level"
            assert [transformer_gemm_for(cpu, lv) for lv in ("spatial:16:16", "temporal:16:16", "spatial:32:32")] == \
                ["fused", "cublas", "cublas"]  # a size the record does not list runs cuBLAS
            from pdengine.model.layers import SpatialTransformer, TemporalTransformer

            torch.manual_seed(0)
            spatial = SpatialTransformer(16, 2, 8, 4, 12, backend="triton").eval()
            temporal = TemporalTransformer(16, 2, 8, 4, backend="triton").eval()
            with torch.no_grad():
                spatial(_t((2, 16, 2, 2), seed=52), _t((2, 3, 12), seed=53))
                temporal(_t((4, 16, 2, 2), seed=54), 2)
            assert getattr(spatial.transformer_blocks[0], "_fold_cache", None) is not None  # ran fused
            assert getattr(temporal.transformer_blocks[0], "_fold_cache", None) is None  # ran on cuBLAS
        with tc.launch_table(fused):
            assert transformer_gemm_for(cpu) == "fused"
            with transformer_gemm("cublas"):
                assert transformer_gemm_for(cpu) == "cublas"
            slow, fast = _block_pair(cross=True)
            x, ctx = _t((2, 6, 32), seed=50), _t((2, 4, 12), seed=51)
            with torch.no_grad():
                fast(x, ctx)
                assert getattr(fast, "_fold_cache", None) is not None  # the fused path ran
                assert_close(fast(x, ctx), slow(x, ctx), name="auto -> fused", scale=2.0)


def _tiny_unet_config():
    from pdengine.model.config import resolve_config

    return resolve_config(dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=[
        "CrossAttnDownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], norm_num_groups=8,
        attention_head_dim=8, cross_attention_dim=16, in_channels=8, out_channels=4))


def _transformer_sizes(cfg) -> set[str]:
    from pdengine.kernels.temporal_conv_table import gemm_level
    from pdengine.model import UNet3D
    from pdengine.model.layers import SpatialTransformer, TemporalTransformer

    return {gemm_level("spatial" if isinstance(m, SpatialTransformer) else "temporal", m.proj_in.in_features,
                       m.proj_in.out_features)
            for m in UNet3D(cfg).modules() if isinstance(m, (SpatialTransformer, TemporalTransformer))}


def test_tune_measures_the_transformer_gemms_per_transformer_size():
    """`pdengine tune`'s measurement (run here on a tiny UNet on the CPU with a fake per-level timer): one call
    each way, each mode timed under its own setting, the outputs compared; each transformer size takes the
    fused GEMMs only where its output matches cuBLAS's and they are at least 3% faster there."""
    from pdengine.bench.conv_configs import (
        TRANSFORMER_KINDS,
        choose_transformer_gemm,
        measure_transformer_gemm,
        outputs_match,
    )
    from pdengine.kernels.fused_linear import transformer_gemm_mode

    def level_timer(model, fn):  # the spatial transformers 10% faster fused, the temporal ones 10% slower
        fused = transformer_gemm_mode() == "fused"
        levels = {m.gemm_level for m in model.modules() if type(m).__name__ in TRANSFORMER_KINDS}
        times = {lv: (0.9 if lv.startswith("spatial") else 1.1) if fused else 1.0 for lv in levels}
        return {**times, "total": 5.0 if fused else 6.0}

    rec = measure_transformer_gemm(torch.device("cpu"), cfg=_tiny_unet_config(), videos=1, frames=2, latent=4,
                                   level_timer=level_timer)
    assert rec["rel_diff"] < 1e-4 and (rec["cublas_ms"], rec["fused_ms"]) == (6.0, 5.0)
    # spatial:16:16, spatial:32:32 (the mid block), temporal:16:16, temporal:32:32 and the UNet's transformer_in
    assert rec["choice"] == "per_level" and set(rec["levels"]) == _transformer_sizes(_tiny_unet_config())
    assert all(v == ("fused" if k.startswith("spatial") else "cublas") for k, v in rec["levels"].items())
    assert rec["err_fused"] < 1e-4 and rec["err_cublas"] == 0.0  # fp32 here: cuBLAS's output is the reference
    assert choose_transformer_gemm(True, {"a": [10.0, 9.0], "b": [1.0, 0.5]}) == ("fused", {"a": "fused", "b": "fused"})
    assert choose_transformer_gemm(True, {"a": [10.0, 9.9]})[0] == "cublas"  # under 3% faster: not worth it
    assert choose_transformer_gemm(False, {"a": [10.0, 5.0]})[0] == "cublas"  # outputs differ: never, however fast
    # Matching is judged against fp32: bf16 rounding (a few %) is no reason to refuse, a wrong kernel is.
    assert outputs_match(0.03, 0.025) and not outputs_match(0.3, 0.025) and outputs_match(5e-4, 0.0)
    assert not outputs_match(2e-3, 0.0)


def test_transformer_level_times_group_the_transformers_by_size():
    """The default per-level timer on a real (tiny) UNet call: one entry per transformer size, and the total."""
    from pdengine.bench.conv_configs import _transformer_level_times
    from pdengine.model import UNet3D

    unet = UNet3D(_tiny_unet_config()).eval()
    x, ctx = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 3, 16)
    with torch.no_grad():
        times = _transformer_level_times(unet, lambda: unet(x, 10, ctx))
    assert set(times) == _transformer_sizes(_tiny_unet_config()) | {"total"}
    assert all(v >= 0 for v in times.values()) and times["total"] >= sum(v for k, v in times.items() if k != "total")


def test_compile_specs_no_spills():
    assert_compiles_clean(compile_specs(), 14)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k, n", [(2 * 16 * 1024, 320, 960), (2 * 16 * 64, 1280, 1280)])
def test_gpu_full_shapes_bf16(gpu, rows, k, n):
    """The folded LayerNorm + q/k/v projection and the residual epilogue at the top and 8x8 levels of one
    video's CFG batch, bf16 within 2x PyTorch's own bf16 error of the fp32 computation."""
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda") + 0.5
    res = torch.randn(rows, n, device="cuda")
    gamma = 1.0 + 0.2 * torch.randn(k, device="cuda")
    beta = 0.2 * torch.randn(k, device="cuda")
    w = torch.randn(n, k, device="cuda") * k ** -0.5
    b = 0.1 * torch.randn(n, device="cuda")
    lp = [t.bfloat16() for t in (x, gamma, beta, w, b, res)]
    folded = fold_layer_norm(lp[1], lp[2], 1e-5, lp[3], lp[4])
    assert_low_precision_close(layer_norm_linear(lp[0], folded),
                               ref.layer_norm_linear_ref(lp[0], *lp[1:3], 1e-5, *lp[3:5]),
                               ref.layer_norm_linear_ref(x, gamma, beta, 1e-5, w, b), name="folded norm bf16")
    w2 = torch.randn(n, n, device="cuda") * n ** -0.5
    o = torch.randn(rows, n, device="cuda")
    assert_low_precision_close(fused_linear(o.bfloat16(), w2.bfloat16(), lp[4], residual=lp[5]),
                               ref.linear_residual_ref(o.bfloat16(), w2.bfloat16(), lp[4], lp[5]),
                               ref.linear_residual_ref(o, w2, b, res), name="residual bf16")
