"""`pdengine bench sample` on the CPU: counted proxies (no timing)."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet3DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from pdengine.bench.sample import unet_flops
from pdengine.engine.cli import main
from pdengine.model import PRESETS


def _per_frame_text_projection_flops(model, videos: int, frames: int, text_len: int) -> int:
    """FLOPs diffusers' model spends projecting the text's cross-attention keys and values for every frame
    beyond the first of each video (its context is repeated per frame; ours projects it once per video)."""
    total = 0
    for m in model.modules():
        if getattr(m, "is_cross_attention", False):
            for proj in (m.to_k, m.to_v):
                total += 2 * videos * (frames - 1) * text_len * proj.in_features * proj.out_features
    return total


def test_unet_flops_are_the_diffusers_count_less_its_per_frame_text_projections():
    # The pixeldance preset's count is checked against diffusers' model with the same config, on meta: the same
    # math, except that diffusers projects the text's keys and values once per frame.
    cfg = {k: v for k, v in PRESETS["pixeldance"].items() if k != "sample_size"}
    with torch.device("meta"):
        ref = UNet3DConditionModel(**cfg)
        x = torch.empty(2, 8, 16, 32, 32)
        ctx = torch.empty(2, 77, 1024)
        t = torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref(x, t, encoder_hidden_states=ctx)
    theirs = counter.get_total_flops()
    saved = _per_frame_text_projection_flops(ref, 2, 16, 77)
    assert 0 < saved < 0.02 * theirs
    assert unet_flops(2) == theirs - saved
    assert unet_flops(2, model="diffusers") == theirs


def test_bench_sample_cpu_writes_rows(tmp_path):
    out = tmp_path / "sample.json"
    result = CliRunner().invoke(main, ["bench", "sample", "--device", "cpu", "--batch", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    sample = [r for r in rows if r["bench"] == "sample"]
    assert {r["provider"] for r in sample} == {"pdengine_torch_backend", "pdengine_triton_backend",
                                               "pdengine_triton_backend_fused_gemm", "diffusers"}
    kinds = ("temporal_conv", "temporal_attention", "spatial_resnet", "spatial_attention", "resample", "other")
    for r in sample:
        assert r["status"] == "ok" and r["launches_per_step_eager"] > 100 and r["gb_per_step"] > 0
        assert r["unet_gflops_per_video"] > 0 and r["git_sha"] and r["torch"] == torch.__version__
        assert sum(r[f"gb_{k}"] for k in kinds) == pytest.approx(r["gb_per_step"], abs=0.05)
    by = {r["provider"]: r for r in sample}
    # The Triton backend's step: each fused kernel one operator counted by its model; every layer kind with
    # a kernel (the spatial ResNets' GroupNorm + SiLU too) moves fewer bytes than the torch backend's and
    # diffusers' (the design's point).
    triton_row = by["pdengine_triton_backend"]
    for other in ("pdengine_torch_backend", "diffusers"):
        for k in ("temporal_conv", "temporal_attention", "spatial_attention", "spatial_resnet"):
            assert triton_row[f"gb_{k}"] < by[other][f"gb_{k}"], (k, other)
    # The fused transformer GEMMs never write the LayerNorms' outputs, the projections before the residual adds
    # or the feed-forward's projection: fewer bytes in both transformer kinds, and fewer ops.
    fused = by["pdengine_triton_backend_fused_gemm"]
    for k in ("temporal_attention", "spatial_attention"):
        assert fused[f"gb_{k}"] < triton_row[f"gb_{k}"], k
    assert fused["launches_per_step_eager"] < triton_row["launches_per_step_eager"]
    (split,) = [r for r in rows if r["bench"] == "sample_breakdown"]
    assert sum(split[f"share_{k}"] for k in kinds) == pytest.approx(1.0, abs=1e-3)
    assert sum(split[f"gflop_{k}"] for k in kinds) == pytest.approx(split["unet_call_gflop"], rel=1e-3)
    assert split["unet_call_gflop"] == pytest.approx(unet_flops(2) / 1e9, rel=1e-3)
    # The VAE decode's FLOPs beside the 50 steps' (the overlap decision): the SD VAE decoder, counted.
    from pdengine.bench.sample import vae_decode_flops

    decode = vae_decode_flops()
    assert split["decode_gflop_per_video"] == pytest.approx(decode / 1e9, abs=0.1)
    assert split["decode_share_of_video"] == pytest.approx(decode / (decode + 50 * unet_flops(2)), abs=1e-4)
    assert out.with_suffix(".csv").is_file()


def test_breakdown_rows_run_on_tiny_models_and_leave_the_models_as_they_were():
    """The GPU breakdown's code path on the CPU (wall-time layer marks, tiny UNets): every UNet row is ok, the
    decode row says it needs CUDA, and the channels_last row works on a copy (diffusers' model keeps its
    contiguous weights, which compiled code and captured graphs point at)."""
    from pdengine.bench.sample import _breakdown_rows
    from pdengine.model import UNet3D

    cfg = dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
               up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], norm_num_groups=8, attention_head_dim=8,
               cross_attention_dim=16, in_channels=8, out_channels=4)
    ours, ref = UNet3D(cfg).eval(), UNet3DConditionModel(**cfg).eval()
    before = {n: (p.data_ptr(), p.stride()) for n, p in ref.named_parameters()}
    x, text = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 5, 16)
    rows = _breakdown_rows(1, ours, ref, x, torch.randn_like(x), text, torch.randn_like(text))
    by = {r["provider"]: r for r in rows}
    for name in ("pdengine_eager", "pdengine_eager_cublas_conv", "pdengine_eager_fused_gemm", "diffusers_eager",
                 "diffusers_eager_channels_last"):
        assert by[name]["status"] == "ok" and by[name]["unet_call_ms"] > 0, by[name]["status"]
    assert "CUDA" in by["vae_decode"]["status"]
    assert {n: (p.data_ptr(), p.stride()) for n, p in ref.named_parameters()} == before


def test_layer_flops_split_a_unet_call_like_diffusers():
    """Per layer kind, our UNet's FLOPs equal diffusers' model with the same config (the same math) but for the
    spatial attention, where diffusers projects the text's keys and values once per frame; the kinds and
    `other` add up to the whole call's count."""
    from pdengine.bench.common import layer_flops
    from pdengine.model import UNet3D

    cfg = dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
               up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], norm_num_groups=8, attention_head_dim=8,
               cross_attention_dim=16, in_channels=8, out_channels=4)
    x, ctx = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 5, 16)
    ours, ref = UNet3D(cfg).eval(), UNet3DConditionModel(**cfg).eval()
    with torch.no_grad():
        mine = layer_flops(ours, lambda: ours(x, 10, ctx))
        theirs = layer_flops(ref, lambda: ref(x, 10, encoder_hidden_states=ctx))
        with FlopCounterMode(display=False) as counter:
            ref(x, 10, encoder_hidden_states=ctx)
    saved = _per_frame_text_projection_flops(ref, 1, 3, 5)
    assert saved > 0 and theirs["total"] == counter.get_total_flops()
    assert mine == {**theirs, "spatial_attention": theirs["spatial_attention"] - saved, "total": theirs["total"] - saved}
    assert all(mine[k] > 0 for k in ("temporal_conv", "temporal_attention", "spatial_resnet", "spatial_attention"))
    assert sum(v for k, v in mine.items() if k != "total") == mine["total"]


def test_layer_flops_count_a_known_layer():
    from pdengine.bench.common import layer_flops

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 8)

        def forward(self, x):
            return self.proj(x)

    model = torch.nn.Sequential(Outer(), torch.nn.Linear(8, 3))
    flops = layer_flops(model, lambda: model(torch.zeros(5, 4)), kinds={"Outer": "outer"})
    assert flops == {"outer": 2 * 5 * 4 * 8, "other": 2 * 5 * 8 * 3, "total": 2 * 5 * (4 * 8 + 8 * 3)}


def test_bench_train_cpu_counts_saved_activations(tmp_path):
    """Checkpointing policies save monotonically less; the reference row is diffusers' model."""
    from pdengine.bench.train import run_train_bench, state_bytes

    rows = run_train_bench("cpu", tmp_path / "train.json", preset="tiny")
    by = {(r["provider"], r["checkpointing"]): r for r in rows}
    none = by[("pdengine_torch_backend", "none")]["saved_activation_gib_per_sample"]
    attention = by[("pdengine_torch_backend", "attention")]["saved_activation_gib_per_sample"]
    full = by[("pdengine_torch_backend", "full")]["saved_activation_gib_per_sample"]
    assert none > attention > full > 0
    # The Triton backend's operators on meta tensors: its backward passes keep less than the reference layers'
    # autograd graph under every policy.
    for policy in ("none", "attention", "full"):
        triton_saved = by[("pdengine_triton_backend", policy)]["saved_activation_gib_per_sample"]
        assert 0 < triton_saved < by[("pdengine_torch_backend", policy)]["saved_activation_gib_per_sample"], policy
    ref = next(r for r in rows if r["provider"] == "diffusers_reference")
    assert ref["saved_activation_gib_per_sample"] > 0 and ref["parameters"] > 1_000_000
    assert state_bytes(10, "fp32_master") == {"param_bytes": 40, "grad_bytes": 40, "optimizer_bytes": 80}
    assert (tmp_path / "train.csv").is_file()


def test_bench_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for bench in ("sample", "train"):
        res = CliRunner().invoke(main, ["bench", bench, "--device", "cuda", "--batch", "1"])
        assert res.exit_code != 0
        assert "torch sees no CUDA device" in str(res.exception), (bench, res.exception)


def test_bench_unknown_provider_is_a_clear_error():
    res = CliRunner().invoke(main, ["bench", "sample", "--device", "cpu", "--providers", "pdengine_graph,nope"])
    assert res.exit_code != 0 and "unknown sample providers ['nope']" in res.output
    res = CliRunner().invoke(main, ["bench", "train", "--device", "cpu", "--providers", "pdengine_compile,x"])
    assert res.exit_code != 0 and "unknown train providers ['x']" in res.output


def test_layer_times_split_a_unet_call_by_layer_kind():
    """Every kind of layer is found (ours and diffusers' by class name), the kinds and `other` add up to the
    whole call, and a layer inside a counted layer counts only for the outer one."""
    from diffusers import UNet3DConditionModel

    from pdengine.bench.common import layer_times
    from pdengine.model import UNet3D

    cfg = dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"],
               up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"], norm_num_groups=8, attention_head_dim=8,
               cross_attention_dim=16, in_channels=8, out_channels=4)
    x, ctx = torch.randn(1, 8, 3, 8, 8), torch.randn(1, 5, 16)
    kinds = {"temporal_conv", "temporal_attention", "spatial_resnet", "spatial_attention", "resample"}
    for model, call in ((ours := UNet3D(cfg).eval(), lambda: ours(x, 10, ctx)),
                        (ref := UNet3DConditionModel(**cfg).eval(), lambda: ref(x, 10, encoder_hidden_states=ctx))):
        with torch.no_grad():
            ms = layer_times(model, call, reps=2)
        assert set(ms) == kinds | {"total", "other"}
        assert all(ms[k] > 0 for k in kinds)
        assert sum(ms[k] for k in kinds | {"other"}) == pytest.approx(ms["total"])
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_layer_times_count_a_nested_layer_for_the_outer_one():
    import time

    from pdengine.bench.common import layer_times

    class Inner(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(self.inner(x))

    model = torch.nn.Sequential(Outer(), Inner())
    ms = layer_times(model, lambda: model(torch.zeros(1)), reps=1, kinds={"Outer": "outer", "Inner": "inner"})
    assert ms["outer"] >= 40 and 20 <= ms["inner"] < 0.75 * ms["outer"]  # the outer layer's inner calls are its own
    assert ms["total"] >= ms["outer"] + ms["inner"]
