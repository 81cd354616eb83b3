"""Fused temporal conv block (kernels/temporal_conv.py) against its PyTorch reference and diffusers'
TemporalConvLayer: forward fp32 / bf16, backward of every input, statistics on large-mean data, dropout
masks, the single-stage entry point, modeled bytes and the sm80/sm90 compile check.

CPU runs go through the Triton interpreter (conftest sets TRITON_INTERPRET=1): shapes are tiny and
awkward on purpose (F = 2, odd F, F > 16, H*W = 35, 3 channels per group, batch 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_utils import assert_close, assert_low_precision_close

from pdengine.kernels import temporal_conv as tc
from pdengine.kernels.compile_check import ARCHS
from pdengine.kernels.temporal_conv_ref import (
    temporal_conv1d_ref,
    temporal_conv_block_ref,
    video_group_norm_ref,
)

H, W = 5, 7

# Masked-out lanes (zero padding frames) can give sigmoid(-large) = 1 / (1 + inf) = 0 in the interpreter,
# exactly as on the GPU; numpy merely reports the overflow.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def make_inputs(b: int, f: int, c: int, seed: int = 0, dtype: torch.dtype = torch.float32, mean: float = 0.0):
    """x (B*F, C, H, W) and four stages of random parameters (stage 4's conv is random too: a zero conv
    would hide every bug behind the residual)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)

    x = rnd(b * f, c, H, W, shift=mean)
    norms = [(rnd(c, scale=0.2, shift=1.0), rnd(c, scale=0.2)) for _ in range(4)]
    convs = [(rnd(c, c, 3, 1, 1, scale=(3 * c) ** -0.5), rnd(c, scale=0.2)) for _ in range(4)]
    return x, norms, convs


def leaves(x, norms, convs):
    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    return leaf(x), [(leaf(g), leaf(b)) for g, b in norms], [(leaf(w), leaf(b)) for w, b in convs]


def named_grads(x, norms, convs) -> dict[str, torch.Tensor]:
    out = {"x": x.grad}
    for s in range(4):
        out |= {f"gamma{s + 1}": norms[s][0].grad, f"beta{s + 1}": norms[s][1].grad,
                f"weight{s + 1}": convs[s][0].grad, f"bias{s + 1}": convs[s][1].grad}
    return out


# ------------------------------------------------------------------------------------------------- forward

SHAPES = [  # (B, F, C, G): 3 channels per group everywhere
    pytest.param(1, 2, 6, 2, id="b1-f2-c6"),
    pytest.param(2, 3, 24, 8, id="b2-f3-c24"),
    pytest.param(1, 17, 9, 3, id="b1-f17-c9"),
]


@pytest.mark.parametrize("b, f, c, g", SHAPES)
def test_forward_fp32_matches_reference(b, f, c, g):
    x, norms, convs = make_inputs(b, f, c)
    out = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g), torch.float32, "block fp32")


def test_reference_and_kernel_match_diffusers():
    from diffusers.models.resnet import TemporalConvLayer

    b, f, c, g = 2, 3, 12, 4
    torch.manual_seed(0)
    layer = TemporalConvLayer(c, c, dropout=0.1, norm_num_groups=g).eval()
    with torch.no_grad():
        for p in layer.parameters():  # perturb everything, the zero-initialised conv4 included
            p.add_(torch.randn_like(p) * 0.1)
    stages = (layer.conv1, layer.conv2, layer.conv3, layer.conv4)
    norms = [(s[0].weight, s[0].bias) for s in stages]
    convs = [(s[-1].weight, s[-1].bias) for s in stages]
    x = torch.randn(b * f, c, H, W)
    with torch.no_grad():
        expected = layer(x, num_frames=f)
        ref = temporal_conv_block_ref(x, f, norms, convs, groups=g, eps=stages[0][0].eps)
        out = tc.temporal_conv_block(x, f, norms, convs, groups=g, eps=stages[0][0].eps)
    assert_close(ref, expected, torch.float32, "reference vs diffusers")
    assert_close(out, expected, torch.float32, "kernel vs diffusers")


def test_model_layer_triton_backend_matches_torch_backend():
    from pdengine.model.layers import TemporalConvLayer

    f, c, g = 3, 12, 4
    torch.manual_seed(1)
    layer = TemporalConvLayer(c, g, backend="torch").eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2 * f, c, H, W)
    with torch.no_grad():
        expected = layer(x, f)
        layer.backend = "triton"
        out = layer(x, f)
    assert_close(out, expected, torch.float32, "model layer, triton backend")


def test_forward_bf16_within_twice_torch_error():
    b, f, c, g = 2, 3, 24, 8
    x, norms, convs = make_inputs(b, f, c, seed=2)
    lp = lambda t: t.to(torch.bfloat16)  # noqa: E731
    x16, norms16, convs16 = lp(x), [(lp(a), lp(z)) for a, z in norms], [(lp(a), lp(z)) for a, z in convs]
    out = tc.temporal_conv_block(x16, f, norms16, convs16, groups=g)
    assert out.dtype == torch.bfloat16
    ref16 = temporal_conv_block_ref(x16, f, norms16, convs16, groups=g)
    ref32 = temporal_conv_block_ref(x16, f, norms16, convs16, groups=g, upcast=True)
    assert_low_precision_close(out, ref16, ref32, "block bf16")


def test_stage_with_different_channel_counts_and_residual():
    b, f, c_in, c_out, g = 2, 3, 6, 10, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b * f, c_in, H, W, generator=gen)
    gamma, beta = torch.randn(c_in, generator=gen), torch.randn(c_in, generator=gen)
    weight, bias = torch.randn(c_out, c_in, 3, generator=gen), torch.randn(c_out, generator=gen)
    residual = torch.randn(b * f, c_out, H, W, generator=gen)
    out = tc.temporal_conv_stage(x, f, (gamma, beta), (weight, bias), groups=g, residual=residual)
    a = torch.nn.functional.silu(video_group_norm_ref(x, f, gamma, beta, g, 1e-5))
    assert_close(out, temporal_conv1d_ref(a, f, weight, bias) + residual, torch.float32, "stage C_in != C_out")


# ----------------------------------------------------------------------------------------------- statistics


def test_statistics_of_large_mean_activations():
    """x ~ 50 + N(0, 1): GroupNorm statistics from the per-tile partials keep fp32 accuracy (a plain
    E[x^2] - mean^2 would cancel ~2500 against ~2501); a conv bias of 50 gives stage 2 the same problem."""
    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=4, mean=50.0)
    convs[0] = (convs[0][0], convs[0][1] + 50.0)
    stats = tc.input_stats(x, f, norms[0][0], norms[0][1], g, 1e-5)
    x64 = x.double().reshape(b, f, g, c // g, H * W)
    var, mean = torch.var_mean(x64, dim=(1, 3, 4), unbiased=False)
    assert_close(stats.mean, mean.float(), torch.float32, "mean")
    assert_close(stats.rstd, torch.rsqrt(var + 1e-5).float(), torch.float32, "rstd")
    out = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    ref = temporal_conv_block_ref(x.double(), f, norms, convs, groups=g, upcast=False)
    # Storing ~50-valued stage outputs in fp32 alone costs ulp(50) * rstd ~ 5e-6 downstream (PyTorch's fp32
    # reference is that far from fp64 too): twice the fp32 tolerance.
    assert_close(out - x, (ref - x.double()).float(), torch.float32, "block output - x, large mean", scale=2.0)


# ------------------------------------------------------------------------------------------------- backward

BWD_SHAPES = [
    pytest.param(2, 3, 6, 2, id="b2-f3-c6"),
    pytest.param(1, 17, 9, 3, id="b1-f17-c9", marks=pytest.mark.slow),
    pytest.param(2, 2, 24, 8, id="b2-f2-c24", marks=pytest.mark.slow),
]


def _check_backward(b, f, c, g, dropout_p=0.0, seed=0):
    x, norms, convs = make_inputs(b, f, c, seed=5)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    masks = tc.dropout_masks(x.shape, seed=seed, dropout_p=dropout_p) if dropout_p > 0 else None
    xk, nk, ck = leaves(x, norms, convs)
    out = tc.temporal_conv_block(xk, f, nk, ck, groups=g, dropout_p=dropout_p, seed=seed, training=True)
    out.backward(dout)
    xr, nr, cr = leaves(x, norms, convs)
    temporal_conv_block_ref(xr, f, nr, cr, groups=g, dropout_masks=masks).backward(dout)
    got, expected = named_grads(xk, nk, ck), named_grads(xr, nr, cr)
    for name in expected:
        assert got[name] is not None and got[name].shape == expected[name].shape, name
        assert_close(got[name], expected[name], torch.float32, f"grad {name}")


@pytest.mark.parametrize("b, f, c, g", BWD_SHAPES)
def test_backward_matches_reference_autograd(b, f, c, g):
    _check_backward(b, f, c, g)


def test_backward_bf16_within_twice_torch_error():
    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=7)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))

    def grads(fn, dtype, **kw):
        xx, nn_, cc = leaves(x.to(dtype), [(a.to(dtype), z.to(dtype)) for a, z in norms],
                            [(a.to(dtype), z.to(dtype)) for a, z in convs])
        fn(xx, f, nn_, cc, groups=g, **kw).float().backward(dout)
        return named_grads(xx, nn_, cc)

    got = grads(tc.temporal_conv_block, torch.bfloat16)
    ref16 = grads(temporal_conv_block_ref, torch.bfloat16)
    ref32 = grads(temporal_conv_block_ref, torch.float32)
    for name in ref32:
        assert got[name].dtype == torch.bfloat16, name
        assert_low_precision_close(got[name], ref16[name], ref32[name], f"bf16 grad {name}")


# -------------------------------------------------------------------------------------------------- dropout


def test_dropout_zero_is_exactly_eval():
    b, f, c, g = 1, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=9)
    train = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.0, seed=3, training=True)
    ignored = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.5, seed=3, training=False)
    eval_ = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    assert torch.equal(train, eval_) and torch.equal(ignored, eval_)


def test_dropout_forward_matches_reference_with_kernel_masks():
    b, f, c, g, p = 2, 3, 6, 2, 0.3
    x, norms, convs = make_inputs(b, f, c, seed=10)
    out = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=p, seed=1234, training=True)
    masks = tc.dropout_masks(x.shape, seed=1234, dropout_p=p)
    assert masks[0] is None
    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g, dropout_masks=masks), torch.float32,
                 "dropout forward")
    no_drop = temporal_conv_block_ref(x, f, norms, convs, groups=g)
    assert (out - no_drop).abs().max() > 1e-2, "dropout changed nothing"
    again = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=p, seed=1234, training=True)
    assert torch.equal(out, again)
    other = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=p, seed=1235, training=True)
    assert not torch.equal(out, other)


def test_dropout_mask_keep_rate_and_independence():
    p, shape = 0.1, (4, 16, 32, 32)  # 65536 elements: binomial std of the keep rate ~ 0.0012
    masks = tc.dropout_masks(shape, seed=77, dropout_p=p)
    for m in masks[1:]:
        kept = m[m > 0]
        assert torch.all((m == 0) | (m > 0)) and torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
        assert abs((m > 0).float().mean().item() - (1 - p)) < 0.01
    drop = [(m == 0) for m in masks[1:]]
    overlap = (drop[0] & drop[1]).float().mean().item()
    assert abs(overlap - p * p) < 0.005, "stage masks are not independent"


def test_dropout_backward_matches_reference_with_kernel_masks():
    _check_backward(2, 3, 6, 2, dropout_p=0.25, seed=42)


# ------------------------------------------------------------------------------------- prenorm variant


def _use_prenorm(monkeypatch):
    table = tc._gemm_config
    monkeypatch.setattr(tc, "_gemm_config", lambda *args: table(*args)._replace(prenorm=True))


def test_prenorm_variant_equals_the_fused_prologue(monkeypatch):
    """The activation written by its own pass (same arithmetic, same dropout mask) gives the same block."""
    b, f, c, g, p = 2, 3, 6, 2, 0.3
    x, norms, convs = make_inputs(b, f, c, seed=12)
    fused = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=p, seed=99, training=True)
    fused_eval = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    _use_prenorm(monkeypatch)
    assert tc._gemm_config(c, c, H * W, f * H * W).prenorm
    out = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=p, seed=99, training=True)
    masks = tc.dropout_masks(x.shape, seed=99, dropout_p=p)
    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g, dropout_masks=masks), torch.float32,
                 "prenorm forward with dropout")
    assert_close(out, fused, torch.float32, "prenorm vs fused")
    assert_close(tc.temporal_conv_block(x, f, norms, convs, groups=g), fused_eval, torch.float32, "prenorm eval")


def test_prenorm_variant_backward_matches_reference(monkeypatch):
    _use_prenorm(monkeypatch)
    _check_backward(2, 3, 6, 2, dropout_p=0.25, seed=42)


# ------------------------------------------------------------------------------------- cuBLAS variant


@pytest.fixture(params=["cublas", "cublas_im2col"])
def cublas_forward(request):
    with tc.conv_gemm(request.param, "forward"):
        yield


@pytest.mark.parametrize("variant", ["cublas", "cublas_im2col"])
@pytest.mark.parametrize("b,f,c,g", [(2, 3, 6, 2), (1, 2, 6, 3), (3, 5, 4, 2)])
def test_cublas_forward_equals_the_fused_kernel(b, f, c, g, variant):
    """Padded activation + batched GEMM over overlapping frame windows (or one GEMM over their im2col
    matrix) + epilogue pass: the same block as the fused kernel and the reference (with dropout: the same
    masks), including the windows that straddle two videos (b > 1) and the shortest clip (F = 2)."""
    x, norms, convs = make_inputs(b, f, c, seed=13)
    fused = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.3, seed=7, training=True)
    fused_eval = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    with tc.conv_gemm(variant, "forward"):
        launch = tc._forward_launch(x, c, c, H * W, f * H * W)
        assert launch.cublas and launch.im2col == (variant == "cublas_im2col")
        out = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.3, seed=7, training=True)
        out_eval = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    assert not tc._forward_launch(x, c, c, H * W, f * H * W).cublas  # the with-block restored the choice
    masks = tc.dropout_masks(x.shape, seed=7, dropout_p=0.3)
    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g, dropout_masks=masks), torch.float32,
                 "cublas forward with dropout")
    assert_close(out, fused, torch.float32, "cublas vs fused")
    assert_close(out_eval, temporal_conv_block_ref(x, f, norms, convs, groups=g), torch.float32, "cublas eval")
    assert_close(out_eval, fused_eval, torch.float32, "cublas vs fused, eval")


def test_cublas_forward_stage_with_other_channel_counts(cublas_forward):
    x, norms, convs = make_inputs(2, 3, 6, seed=14)
    weight = torch.randn(10, 6, 3) / 4
    bias = torch.randn(10)
    res = torch.randn(6, 10, H, W)
    out = tc.temporal_conv_stage(x, 3, norms[0], (weight, bias), groups=2, residual=res)
    ref = temporal_conv1d_ref(torch.nn.functional.silu(video_group_norm_ref(x, 3, *norms[0], 2, 1e-5)), 3, weight,
                              bias) + res
    assert_close(out, ref, torch.float32, "cublas stage 6 -> 10 channels")


@pytest.mark.parametrize("variant", ["cublas", "cublas_im2col"])
@pytest.mark.parametrize("direction", ["forward", "backward", "both"])
def test_cublas_backward_matches_reference(direction, variant):
    # Both directions read and save the same tensors, so each GEMM choice pairs with the other; the
    # backward's transposed conv (windowed, or one GEMM over g's im2col matrix) and three weight-gradient
    # GEMMs run on padded g (b > 1: windows straddle two videos).
    with tc.conv_gemm(variant, direction):
        _check_backward(2, 3, 6, 2, dropout_p=0.25, seed=42)


@pytest.mark.parametrize("variant", ["cublas", "cublas_im2col"])
@pytest.mark.parametrize("b,f,c", [(1, 2, 9), (3, 5, 6)])
def test_cublas_backward_awkward_shapes(b, f, c, variant):
    with tc.conv_gemm(variant):
        _check_backward(b, f, c, 3)


def test_cublas_backward_frozen_parts():
    """Frozen convs skip the weight-gradient GEMMs; an input without grad and frozen stage-1 norm skip the
    last transposed conv; what is computed still matches the reference."""
    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=8)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    _, nk, ck = leaves(x, norms, convs)
    _, nr, cr = leaves(x, norms, convs)
    for convs_ in (ck, cr):
        for w, bias in convs_:
            w.requires_grad_(False)
            bias.requires_grad_(False)
    for n in (nk[0], nr[0]):
        n[0].requires_grad_(False)
        n[1].requires_grad_(False)
    with tc.conv_gemm("cublas"):
        tc.temporal_conv_block(x, f, nk, ck, groups=g).backward(dout)
    temporal_conv_block_ref(x, f, nr, cr, groups=g).backward(dout)
    for s in (1, 2, 3):
        assert_close(nk[s][0].grad, nr[s][0].grad, torch.float32, f"gamma{s + 1}")
        assert_close(nk[s][1].grad, nr[s][1].grad, torch.float32, f"beta{s + 1}")
    assert nk[0][0].grad is None and all(w.grad is None for w, _ in ck)


@pytest.mark.parametrize("variant", ["cublas", "cublas_im2col"])
def test_cublas_bf16_forward_and_backward(variant):
    b, f, c, g = 2, 3, 8, 2
    x, norms, convs = make_inputs(b, f, c, seed=15)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(16))
    xr, nr, cr = leaves(x, norms, convs)
    ref = temporal_conv_block_ref(xr, f, nr, cr, groups=g)
    ref.backward(dout)
    lp = make_inputs(b, f, c, seed=15, dtype=torch.bfloat16)
    xl, nl, cl = leaves(*lp)
    ref_lp = temporal_conv_block_ref(xl, f, nl, cl, groups=g)
    ref_lp.backward(dout.bfloat16())
    xk, nk, ck = leaves(*lp)
    with tc.conv_gemm(variant):
        out = tc.temporal_conv_block(xk, f, nk, ck, groups=g)
        out.backward(dout.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_low_precision_close(out, ref_lp, ref, "cublas bf16 forward")
    got, lp_grads, expected = named_grads(xk, nk, ck), named_grads(xl, nl, cl), named_grads(xr, nr, cr)
    for name in ("x", "weight1", "weight4", "gamma2", "bias3"):
        assert_low_precision_close(got[name], lp_grads[name], expected[name], f"cublas bf16 grad {name}")


def test_set_conv_gemm_rejects_unknown_names():
    with pytest.raises(ValueError, match="conv GEMM"):
        tc.set_conv_gemm("cudnn")
    with pytest.raises(ValueError, match="direction"):
        tc.set_conv_gemm("cublas", "sideways")
    env = {**os.environ, "PDENGINE_CONV_GEMM": "nope"}
    run = subprocess.run([sys.executable, "-c", "import pdengine.kernels.temporal_conv"], env=env,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "conv GEMM" in run.stderr


def test_block_trains_under_torch_compile_as_operators():
    """Under torch.compile the trainable block is an operator pair (pdengine::temporal_conv_block_train and its
    backward): one graph (fullgraph=True), and output and every gradient equal the eager autograd path, with
    dropout from the same seed. A frozen conv gets no gradient there either."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=17)
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(18))
    targets: list[str] = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def block(x, norms, convs):
        return tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.3, seed=11, training=True)

    results = {}
    for mode in ("eager", "compiled"):
        xk, nk, ck = leaves(x, norms, convs)
        ck[1][0].requires_grad_(False)
        torch._dynamo.reset()
        fn = block if mode == "eager" else torch.compile(block, backend=aot_autograd(fw_compiler=record,
                                                                                       bw_compiler=record),
                                                         fullgraph=True)
        out = fn(xk, nk, ck)
        out.backward(dout)
        results[mode] = (out.detach(), named_grads(xk, nk, ck))
    torch._dynamo.reset()
    assert {"pdengine.temporal_conv_block_train.default",
            "pdengine.temporal_conv_block_train_backward.default"} <= set(targets)
    assert_close(results["compiled"][0], results["eager"][0], torch.float32, "compiled forward")
    for name, want in results["eager"][1].items():
        got = results["compiled"][1][name]
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, torch.float32, f"compiled grad {name}")
    assert results["compiled"][1]["weight2"] is None


def test_dropout_seed_none_uses_torch_generator():
    b, f, c, g = 1, 2, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=11)
    torch.manual_seed(5)
    first = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.5, training=True)
    torch.manual_seed(5)
    second = tc.temporal_conv_block(x, f, norms, convs, groups=g, dropout_p=0.5, training=True)
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------- validation


def test_bad_inputs_raise():
    x, norms, convs = make_inputs(1, 2, 6)
    with pytest.raises(ValueError, match="multiple of num_frames"):
        tc.temporal_conv_block(x, 3, norms, convs, groups=2)
    with pytest.raises(ValueError, match="groups"):
        tc.temporal_conv_block(x, 2, norms, convs, groups=4)
    with pytest.raises(ValueError, match="4 norms"):
        tc.temporal_conv_block(x, 2, norms[:3], convs, groups=2)
    with pytest.raises(ValueError, match="dropout_p"):
        tc.temporal_conv_block(x, 2, norms, convs, groups=2, dropout_p=1.0, training=True)
    bad = [*convs[:3], (torch.zeros(6, 6, 3, 3, 1), convs[3][1])]
    with pytest.raises(ValueError, match="weight"):
        tc.temporal_conv_block(x, 2, norms, bad, groups=2)


# ---------------------------------------------------------------------------------------------- modeled bytes


def _reference_bytes(b: int, f: int, c: int, h: int, w: int, dtype: torch.dtype, backward: bool) -> int:
    """Bytes the eager reference's aten ops read and write (inputs + outputs of every op that is not a view),
    counted on meta tensors so the pixeldance shape costs nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
                flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
                Count.total += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            return out

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=backward)

    x = meta(b * f, c, h, w)
    norms = [(meta(c), meta(c)) for _ in range(4)]
    convs = [(meta(c, c, 3, 1, 1), meta(c)) for _ in range(4)]
    with Count():
        out = temporal_conv_block_ref(x, f, norms, convs, groups=32)
    fwd = Count.total
    if not backward:
        return fwd
    with Count():
        out.backward(torch.empty_like(out))
    return Count.total - fwd


def test_modeled_bytes_below_reference():
    shape = (2, 16, 320, 32, 32)
    act = 2 * 16 * 320 * 32 * 32 * 2
    fwd = tc.modeled_bytes(*shape, torch.bfloat16)
    bwd = tc.modeled_bytes(*shape, torch.bfloat16, backward=True)
    assert 10 * act <= fwd < 11 * act  # stats read + 4 x (read, write) + residual, plus small terms
    assert bwd > fwd
    assert fwd < _reference_bytes(*shape, torch.bfloat16, backward=False)
    assert bwd < _reference_bytes(*shape, torch.bfloat16, backward=True)


# -------------------------------------------------------------------------------------------- compile check

_COMPILE_SCRIPT = """
import json, sys
from pdengine.kernels.compile_check import compile_spec
from pdengine.kernels.temporal_conv import compile_specs
arch = int(sys.argv[1])
rows = []
for spec in compile_specs():
    r = compile_spec(spec, arch)
    rows.append(dict(name=spec.name, registers=r.registers, spills=r.spills, mma=r.mma_instructions,
                     expects_mma=spec.expects_mma))
print(json.dumps(rows))
"""


def test_compile_specs_are_distinct_and_cover_the_gemms():
    specs = tc.compile_specs()
    keys = [(s.fn, tuple(sorted(s.constexprs.items())), s.num_warps, s.num_stages) for s in specs]
    assert len(set(keys)) == len(keys), "compile_specs lists a configuration twice"
    mma = {s.name.split("[")[0] for s in specs if s.expects_mma}
    assert mma == {"stage_fwd", "stage_fwd_prenorm", "stage_dgrad", "stage_wgrad"}
    names = {s.name.split("[")[0] for s in specs}
    assert {"pad", "gemm_epilogue", "act_bwd"} <= names


def test_compile_specs_carry_the_launchers_divisibility_specialization():
    from dataclasses import replace

    from pdengine.kernels.compile_check import _divisibility_attrs

    spec = next(s for s in tc.compile_specs() if s.name.startswith("stage_fwd["))
    assert {"C_in", "C_out", "F", "HW", "stride_w_o", "stride_w_k"} <= set(spec.divisible)
    names = list(spec.fn.arg_names)
    attrs = _divisibility_attrs(spec)
    marked = {names[i] for (i,) in attrs}
    assert marked == {n for n, kind in spec.signature.items() if kind.startswith("*")} | set(spec.divisible)
    assert "seed" not in marked and "NT" not in marked
    with pytest.raises(ValueError, match="unknown arguments"):
        _divisibility_attrs(replace(spec, divisible=("no_such_arg",)))
    # Every constexpr has a value: one left out (PRENORM has a default) would compile as a runtime argument,
    # a variant no launch runs.
    assert spec.constexprs["PRENORM"] is False
    without = {k: v for k, v in spec.constexprs.items() if k != "PRENORM"}
    with pytest.raises(ValueError, match=r"constexpr arguments \['PRENORM'\]"):
        _divisibility_attrs(replace(spec, constexprs=without))


def test_compile_sm80_sm90_no_spills_and_mma():
    # A fresh process without TRITON_INTERPRET (there @triton.jit gives compilable JITFunctions; here
    # tl.rand and tl.sigmoid are interpreter functions); one process per arch, in parallel.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in ARCHS}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compile for sm{arch} failed:\n{err[-3000:]}"
        rows = json.loads(out.strip().splitlines()[-1])
        assert rows, "no specs"
        for row in rows:
            assert row["spills"] == 0, f"sm{arch} {row['name']}: {row['spills']} bytes spilled"
            if row["expects_mma"]:
                assert row["mma"] > 0, f"sm{arch} {row['name']}: no tensor-core instructions"


def test_batches_past_the_int32_limit_run_in_video_chunks(monkeypatch):
    """A launch indexes with int32; larger batches are split over whole videos, which is exact (statistics
    and convolutions never cross videos). The limit is lowered here so the split happens at test size."""
    import pdengine.kernels.temporal_conv as tc
    from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

    gen = torch.Generator().manual_seed(0)
    c, f = 6, 3
    norms = [(1 + 0.1 * torch.randn(c, generator=gen), 0.1 * torch.randn(c, generator=gen)) for _ in range(4)]
    convs = [(torch.randn(c, c, 3, 1, 1, generator=gen) * 0.3, 0.1 * torch.randn(c, generator=gen)) for _ in range(4)]
    x = torch.randn(3 * f, c, 2, 3, generator=gen)
    expected = temporal_conv_block_ref(x, f, norms, convs, groups=2, eps=1e-5)
    # Two videos per launch, counted with two padding frames each (the cuBLAS variant's layout).
    monkeypatch.setattr(tc, "_MAX_LAUNCH_ELEMENTS", 2 * (f + 2) * c * 2 * 3)
    calls = []
    original = tc._block_forward
    monkeypatch.setattr(tc, "_block_forward", lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k))
    got = tc.temporal_conv_block(x, f, norms, convs, groups=2, eps=1e-5)
    assert calls == [2 * f, f]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_im2col_past_int32_runs_the_windowed_gemm(monkeypatch, caplog):
    """An im2col matrix (three copies of the padded activation) past int32 indexing, where the padded layout
    still fits: those stages run the windowed cuBLAS variant, said once, and the block is unchanged."""
    import logging

    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=21)
    padded = b * (f + 2) * c * H * W
    monkeypatch.setattr(tc, "_MAX_LAUNCH_ELEMENTS", 2 * padded)  # fits the padded layout, not 3x it
    monkeypatch.setattr(tc, "_WARNED_IM2COL", [False])
    calls = []
    real = tc._stage_forward_cublas
    monkeypatch.setattr(tc, "_stage_forward_cublas", lambda *a, **k: calls.append(k["im2col"]) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="pdengine"), tc.conv_gemm("cublas_im2col"):
        out = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    assert calls == [False] * 4
    assert sum("passes int32 indexing" in r.getMessage() for r in caplog.records) == 1
    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g), torch.float32, "windowed fallback")
