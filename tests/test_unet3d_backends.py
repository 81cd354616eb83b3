"""UNet3D with backend="triton" (kernels through the Triton interpreter on CPU) equals backend="torch",
forward and backward, and still equals diffusers' UNet3DConditionModel."""

import pytest
import torch

from pdengine.model import UNet3D
from tests.kernel_utils import assert_close
from tests.test_unet3d import reference_pair

# Channels per group 3 and head dim 12 (neither a power of two) on purpose.
CFG = dict(
    block_out_channels=[24, 48], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
    norm_num_groups=8, attention_head_dim=12, cross_attention_dim=16, in_channels=8, out_channels=4,
)


def _inputs(b=2, f=3, h=4, w=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 8, f, h, w, generator=gen), torch.tensor([20, 700])[:b], torch.randn(b, 5, 16, generator=gen)


@pytest.mark.parametrize("transformer", ["cublas", "fused"])
def test_triton_backend_forward_matches_torch_and_diffusers(transformer):
    """Also with `transformer_gemm("fused")` (every transformer block's LayerNorms folded into its projections,
    residual adds in the output projections, the feed-forward's projection + gate in one GEMM)."""
    from pdengine.kernels.fused_linear import transformer_gemm

    ref, ours = reference_pair(CFG)
    x, t, ctx = _inputs()
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        torch_out = ours(x, t, ctx)
        ours.backend = "triton"
        with transformer_gemm(transformer):
            triton_out = ours(x, t, ctx)
    assert_close(triton_out, torch_out, name=f"triton ({transformer}) vs torch backend")
    assert_close(triton_out, expected, name=f"triton ({transformer}) backend vs diffusers")


def test_triton_backend_backward_matches_torch():
    _, model = reference_pair(CFG)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    x, t, ctx = _inputs(b=1, f=2, h=4, w=4)
    grads = {}
    for backend in ("torch", "triton"):
        model.backend = backend
        model.zero_grad()
        xi = x.clone().requires_grad_()
        model(xi, t, ctx).square().mean().backward()
        grads[backend] = {"x": xi.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    for name, g in grads["torch"].items():
        assert_close(grads["triton"][name], g, name=f"grad {name}", scale=5.0)


def test_auto_backend_uses_the_reference_on_cpu_and_says_so(caplog):
    _, model = reference_pair(CFG)
    model.backend = "auto"
    x, t, ctx = _inputs()
    with caplog.at_level("WARNING", logger="pdengine"), torch.no_grad():
        out = model(x, t, ctx)
        model(x, t, ctx)
    lines = [r.getMessage() for r in caplog.records if "backend=auto" in r.getMessage()]
    assert len(lines) == 1 and "PyTorch reference" in lines[0]
    model.backend = "torch"
    with torch.no_grad():
        assert torch.equal(out, model(x, t, ctx))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = UNet3D(CFG, backend="triton")
    x, t, ctx = _inputs()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        model(x, t, ctx)


def test_from_pretrained_takes_the_backend(tmp_path):
    UNet3D(CFG).save_pretrained(tmp_path)
    assert UNet3D.from_pretrained(tmp_path, backend="triton").backend == "triton"
    for m in UNet3D.from_pretrained(tmp_path, backend="auto").modules():
        if hasattr(m, "backend") and not isinstance(m, UNet3D):
            assert m.backend == "auto"


def test_attention_outside_the_kernel_range_falls_back_and_says_so(caplog):
    """Head dims above 128 (SD 1.x inflations) run the PyTorch path for that layer's attention, with one
    warning (its feed-forward keeps the GEGLU kernel: equal to fp32 tolerance, not bitwise)."""
    from pdengine.model.layers import TemporalTransformer

    torch.manual_seed(0)
    layer = TemporalTransformer(160, 1, 160, 8, backend="triton")
    ref = TemporalTransformer(160, 1, 160, 8, backend="torch")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2 * 2, 160, 2, 2)
    with caplog.at_level("WARNING", logger="pdengine"), torch.no_grad():
        out = layer(x, 2)
        layer(x, 2)
    assert sum("outside the Triton kernel's range" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        assert_close(out, ref(x, 2), name="fallback layer")


def test_triton_backend_compiles_as_one_graph():
    """Under torch.compile the kernels are opaque operators (pdengine::*): the whole UNet traces as one graph
    (fullgraph=True raises on any break) holding those operators, and gives the eager result."""
    import torch._dynamo

    _, model = reference_pair(CFG)
    model.backend = "triton"
    x, t, ctx = _inputs(b=1, f=2, h=4, w=4)  # small: the interpreter runs every kernel twice (eager, compiled)
    targets: list[str] = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        expected = model(x, t, ctx)
        got = compiled(x, t, ctx)
    torch._dynamo.reset()
    assert_close(got, expected, name="compiled vs eager, triton backend")
    ops = {name for name in targets if name.startswith("pdengine.")}
    assert ops == {"pdengine.temporal_conv_block.default", "pdengine.temporal_attention_qkv.default",
                   "pdengine.video_group_norm_to_tokens.default", "pdengine.tokens_to_video_residual.default",
                   "pdengine.geglu.default", "pdengine.group_norm_silu.default"}


def test_triton_backend_trains_under_compile_as_one_graph():
    """Training under torch.compile: each kernel's forward and backward are operators (fullgraph=True: no
    break), and the loss gradients equal the eager run's."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    _, model = reference_pair(CFG)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.backend = "triton"
    model.train()
    x, t, ctx = _inputs(b=1, f=2, h=4, w=4)
    targets: list[str] = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    grads = {}
    for mode in ("eager", "compiled"):
        model.zero_grad()
        torch._dynamo.reset()
        fn = model if mode == "eager" else torch.compile(model, backend=aot_autograd(fw_compiler=record,
                                                                                       bw_compiler=record),
                                                         fullgraph=True, dynamic=False)
        xi = x.clone().requires_grad_()
        fn(xi, t, ctx).square().mean().backward()
        grads[mode] = {"x": xi.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
    torch._dynamo.reset()
    ops = {name for name in targets if name.startswith("pdengine.")}
    assert {"pdengine.temporal_conv_block_train.default", "pdengine.temporal_conv_block_train_backward.default",
            "pdengine.temporal_attention_qkv.default", "pdengine.temporal_attention_qkv_backward.default",
            "pdengine.video_group_norm_to_tokens.default", "pdengine.video_group_norm_to_tokens_backward.default",
            "pdengine.tokens_to_video_residual.default", "pdengine.video_to_tokens.default",
            "pdengine.geglu.default", "pdengine.geglu_backward.default", "pdengine.group_norm_silu_train.default",
            "pdengine.group_norm_silu_backward.default"} <= ops
    for name, want in grads["eager"].items():
        assert_close(grads["compiled"][name], want, name=f"compiled grad {name}", scale=3.0)


def test_gpus_older_than_the_kernels_support_use_the_reference_or_say_why(monkeypatch):
    """On a GPU below compute capability 8.0 (where Triton generates no code, and bf16 tensor cores and
    asynchronous copies are missing) backend="auto" keeps the PyTorch reference and "triton" is a clear
    error; on Ampere and newer both run the kernels. (A stand-in for a CUDA tensor: only its device is read.)"""
    from types import SimpleNamespace

    from pdengine.model import layers
    from pdengine.model.layers import kernel_problem, use_kernels

    monkeypatch.setattr(layers, "_GPU_PROBLEMS", {})
    x = SimpleNamespace(is_cuda=True, is_meta=False, device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert "Tesla T4 is compute capability 7.5" in kernel_problem(x)
    assert not use_kernels("auto", x) and not use_kernels("torch", x)
    with pytest.raises(RuntimeError, match=r"backend='triton': Tesla T4 is compute capability 7\.5; the Triton "
                                           r"kernels need 8\.0 or newer"):
        use_kernels("triton", x)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert "7.5" in kernel_problem(x)  # asked once per device
    monkeypatch.setattr(layers, "_GPU_PROBLEMS", {})
    assert kernel_problem(x) == "" and use_kernels("auto", x) and use_kernels("triton", x)
    assert kernel_problem(torch.zeros(1)) == ""  # CPU tensors: the interpreter's business, not a GPU's
