"""The kernel families at the pixeldance preset's full shapes in bf16 on a GPU (compiled kernels), against
the PyTorch references: the kernel's error vs the fp32 reference may be at most ~2x PyTorch's own bf16
error. Skipped without a GPU or under the Triton interpreter (run: TRITON_INTERPRET=0 pytest -m gpu)."""

import pytest
import torch

from tests.kernel_utils import assert_low_precision_close

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16


def _temporal_conv_params(c: int, dev, seed: int = 0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    norms = [(1 + 0.1 * torch.randn(c, device=dev, generator=gen), 0.1 * torch.randn(c, device=dev, generator=gen))
             for _ in range(4)]
    convs = [(torch.randn(c, c, 3, 1, 1, device=dev, generator=gen) / (3 * c) ** 0.5,
              0.1 * torch.randn(c, device=dev, generator=gen)) for _ in range(4)]
    return norms, convs


@pytest.mark.parametrize("gemm", ["triton", "cublas", "cublas_im2col"])
@pytest.mark.parametrize("c,hw", [(320, 32), (640, 16), (1280, 8), (1280, 4)])
def test_temporal_conv_full_shapes_bf16(gpu, c, hw, gemm):
    from pdengine.kernels.temporal_conv import conv_gemm
    from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

    def temporal_conv_block(*args, **kwargs):
        from pdengine.kernels.temporal_conv import temporal_conv_block as block

        with conv_gemm(gemm):  # forward here, and the backward this forward records
            out = block(*args, **kwargs)
        return out

    b, f = 2, 16
    norms, convs = _temporal_conv_params(c, gpu)
    x32 = torch.randn(b * f, c, hw, hw, device=gpu)
    kw = dict(groups=32, eps=1e-5)
    ref32 = temporal_conv_block_ref(x32, f, norms, convs, **kw)
    lp = lambda pairs: [(w.to(BF16), bb.to(BF16)) for w, bb in pairs]  # noqa: E731
    ref16 = temporal_conv_block_ref(x32.to(BF16), f, lp(norms), lp(convs), **kw)
    x = x32.to(BF16).requires_grad_()
    out = temporal_conv_block(x, f, lp(norms), lp(convs), **kw)
    assert_low_precision_close(out, ref16, ref32, name=f"temporal conv fwd C{c} {hw}x{hw}")
    # Backward: input gradient against fp32 autograd through the reference.
    g = torch.randn_like(ref32)
    xr = x32.clone().requires_grad_()
    temporal_conv_block_ref(xr, f, norms, convs, **kw).backward(g)
    xr16 = x32.to(BF16).requires_grad_()
    temporal_conv_block_ref(xr16, f, lp(norms), lp(convs), **kw).backward(g.to(BF16))
    with conv_gemm(gemm):
        out.backward(g.to(BF16))
    assert_low_precision_close(x.grad, xr16.grad, xr.grad, name=f"temporal conv dgrad C{c} {hw}x{hw} {gemm}")


@pytest.mark.parametrize("c,hw", [(320, 32), (1280, 8)])
def test_temporal_conv_mixed_launch_table_bf16(gpu, c, hw):
    """A launch table that mixes the variants per GEMM kind (what `pdengine tune` may write): the forward on a
    prenorm Triton tile, the transposed conv on cuBLAS, the weight gradient on a Triton tile with the rule's
    split; output, input and weight gradients within 2x PyTorch's bf16 error."""
    from pdengine.kernels import temporal_conv as tc
    from pdengine.kernels import temporal_conv_table as ct
    from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

    key = {"dtype": "bf16", "c_out": c, "c_in": c, "hw": hw * hw}
    table = ct.parse({"device": "test", "entries": [
        {"kind": "fwd", "best": [128, 128, 64, 8, 3, True], **key},
        {"kind": "dgrad", "best": "cublas", **key},
        {"kind": "wgrad", "best": [64, 64, 32, 0, 8, 2], "triton": [64, 64, 32, 0, 8, 2], **key}]}, "test")
    b, f = 2, 16
    norms, convs = _temporal_conv_params(c, gpu, seed=1)
    kw = dict(groups=32, eps=1e-5)
    x32 = torch.randn(b * f, c, hw, hw, device=gpu)
    g = torch.randn_like(x32)
    lp = lambda pairs: [(w.to(BF16).requires_grad_(), bb.to(BF16)) for w, bb in pairs]  # noqa: E731
    fp = lambda pairs: [(w.clone().requires_grad_(), bb) for w, bb in pairs]  # noqa: E731
    results = {}
    for name, dtype, params, fn in (("ref32", torch.float32, fp(convs), temporal_conv_block_ref),
                                    ("ref16", BF16, lp(convs), temporal_conv_block_ref),
                                    ("table", BF16, lp(convs), tc.temporal_conv_block)):
        x = x32.to(dtype).requires_grad_()
        nrm = norms if dtype == torch.float32 else [(a.to(dtype), z.to(dtype)) for a, z in norms]
        with tc.launch_table(table):
            out = fn(x, f, nrm, params, **kw)
            out.backward(g.to(dtype))
        results[name] = (out, x.grad, params[1][0].grad)
    for i, what in enumerate(("fwd", "dgrad", "wgrad")):
        assert_low_precision_close(results["table"][i], results["ref16"][i], results["ref32"][i],
                                   name=f"temporal conv {what} C{c} {hw}x{hw}, mixed table")


def test_tune_sweep_makes_a_table_the_block_follows(gpu):
    """`pdengine tune`'s path at one small level: the timed quick sweep, the table it makes (every kind has an
    entry, times are positive), and the block run under that table against the reference."""
    from pdengine.bench import conv_configs as CC
    from pdengine.kernels import temporal_conv as tc
    from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

    c, side = 320, 8
    rows = CC.sweep("cuda", levels=((c, side),), quick=True)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), [r["status"] for r in rows]
    table, extra = CC.table_from_rows(rows, torch.cuda.get_device_name())
    assert {k[0] for k in table.entries} == {"fwd", "dgrad", "wgrad"}
    norms, convs = _temporal_conv_params(c, gpu, seed=2)
    x32 = torch.randn(2 * 16, c, side, side, device=gpu)
    lp = lambda pairs: [(w.to(BF16), bb.to(BF16)) for w, bb in pairs]  # noqa: E731
    with tc.launch_table(table):
        out = tc.temporal_conv_block(x32.to(BF16), 16, lp(norms), lp(convs), groups=32)
    ref16 = temporal_conv_block_ref(x32.to(BF16), 16, lp(norms), lp(convs), groups=32)
    ref32 = temporal_conv_block_ref(x32, 16, norms, convs, groups=32)
    assert_low_precision_close(out, ref16, ref32, name="temporal conv under a tuned table")


def test_window_gemm_reads_the_overlapping_windows_in_place(gpu):
    """The cuBLAS variant's batched GEMM over overlapping three-frame windows: right values, and no copy of
    the windows (a copy would allocate 3x the output on top of it)."""
    from pdengine.kernels.temporal_conv import _window_gemm

    c, hw, n = 320, 1024, 34
    gen = torch.Generator(device=gpu).manual_seed(0)
    padded = torch.randn(n + 2, c, hw, device=gpu, generator=gen).to(BF16)
    matrix = (torch.randn(c, 3 * c, device=gpu, generator=gen) / (3 * c) ** 0.5).to(BF16)
    _window_gemm(matrix, padded, n)  # warm-up: cuBLAS handle and workspace
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _window_gemm(matrix, padded, n)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.5 * out.numel() * out.element_size(), f"{extra / 2**20:.1f} MiB for a {out.numel() * 2 / 2**20:.1f} MiB output"
    ref = torch.stack([matrix.float() @ padded[j:j + 3].reshape(3 * c, hw).float() for j in range(n)])
    lp = torch.stack([matrix @ padded[j:j + 3].reshape(3 * c, hw) for j in range(n)])
    assert_low_precision_close(out, lp, ref, name="window GEMM")


@pytest.mark.parametrize("heads,p", [(5, 1024), (10, 256), (20, 64), (8, 1024)])
def test_temporal_attention_full_shapes_bf16(gpu, heads, p):
    from pdengine.kernels.temporal_attention import temporal_attention
    from pdengine.kernels.temporal_attention_ref import temporal_attention_ref

    b, f, d = 2, 16, 64
    n = b * f * p
    q32, k32, v32 = (torch.randn(n, heads * d, device=gpu) for _ in range(3))
    ref32 = temporal_attention_ref(q32, k32, v32, f, heads, pixels=p)
    ref16 = temporal_attention_ref(q32.to(BF16), k32.to(BF16), v32.to(BF16), f, heads, pixels=p, upcast=False)
    q, k, v = (t.to(BF16).requires_grad_() for t in (q32, k32, v32))
    out = temporal_attention(q, k, v, f, heads, pixels=p)
    assert_low_precision_close(out, ref16, ref32, name=f"attention fwd h{heads} P{p}")
    g = torch.randn_like(ref32)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q32, k32, v32))
    temporal_attention_ref(qr, kr, vr, f, heads, pixels=p).backward(g)
    q16, k16, v16 = (t.to(BF16).requires_grad_() for t in (q32, k32, v32))
    temporal_attention_ref(q16, k16, v16, f, heads, pixels=p, upcast=False).backward(g.to(BF16))
    out.backward(g.to(BF16))
    for name, got, lp16, fp32 in (("dq", q.grad, q16.grad, qr.grad), ("dk", k.grad, k16.grad, kr.grad),
                                  ("dv", v.grad, v16.grad, vr.grad)):
        assert_low_precision_close(got, lp16, fp32, name=f"attention {name} h{heads} P{p}")


@pytest.mark.parametrize("transformer", ["cublas", "fused"])
def test_unet3d_triton_backend_matches_torch_bf16(gpu, transformer):
    """The small preset on the GPU in bf16: kernels vs the PyTorch reference path, with the transformers'
    GEMMs on cuBLAS and fused (`PDENGINE_TRANSFORMER_GEMM`)."""
    from pdengine.kernels.fused_linear import transformer_gemm
    from pdengine.model import UNet3D

    torch.manual_seed(0)
    model = UNet3D.from_preset("small").to(gpu).eval()
    x = torch.randn(2, 8, 16, 32, 32, device=gpu)
    t = torch.tensor([10, 900], device=gpu)
    ctx = torch.randn(2, 77, 512, device=gpu)
    with torch.no_grad():
        ref32 = model(x, t, ctx)
        m16 = model.to(BF16)
        ref16 = m16(x.to(BF16), t, ctx.to(BF16))
        m16.backend = "triton"
        with transformer_gemm(transformer):
            out = m16(x.to(BF16), t, ctx.to(BF16))
    assert_low_precision_close(out, ref16, ref32, name=f"UNet3D small bf16 triton ({transformer}) vs torch")
