"""UNet3D against diffusers' UNet3DConditionModel with the same weights (fp32, rel. error <= 1e-4)."""

import json

import pytest
import torch
from diffusers import UNet3DConditionModel

from pdengine.model import PRESETS, UNet3D, UNetLoadError, count_parameters

TINY = dict(
    block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock3D", "DownBlock3D"], up_block_types=["UpBlock3D", "CrossAttnUpBlock3D"],
    norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32, in_channels=8, out_channels=4,
)
THREE_LEVEL = dict(
    block_out_channels=[16, 32, 32], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    up_block_types=["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    norm_num_groups=4, attention_head_dim=8, cross_attention_dim=24, in_channels=4, out_channels=4,
)


def reference_pair(cfg: dict, seed: int = 0) -> tuple[UNet3DConditionModel, UNet3D]:
    """A diffusers model with seeded random weights (zero-initialised layers perturbed, so a bug cannot
    hide behind zeros) and our model holding the same state dict."""
    torch.manual_seed(seed)
    ref = UNet3DConditionModel(**cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ours = UNet3D(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "cfg,shape,timestep",
    [
        (TINY, (2, 8, 5, 8, 8), torch.tensor([10, 700])),  # odd frame count, batch 2, per-sample t
        (TINY, (1, 8, 2, 8, 12), 999),  # F = 2, non-square latents, scalar t
        (TINY, (1, 8, 3, 6, 10), torch.tensor(250)),  # H, W not a multiple of 2**levels
        (THREE_LEVEL, (2, 4, 4, 8, 8), torch.tensor([1, 400])),  # 3 levels, 2 layers per block
        (THREE_LEVEL, (1, 4, 17, 4, 4), 37.5),  # F > 16, float timestep
    ],
)
def test_forward_matches_diffusers(cfg, shape, timestep):
    ref, ours = reference_pair(cfg)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    ctx = torch.randn(shape[0], 7, cfg["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        expected = ref(x, timestep, encoder_hidden_states=ctx).sample
        got = ours(x, timestep, ctx)
    assert got.shape == expected.shape == (shape[0], cfg["out_channels"], *shape[2:])
    assert rel_err(got, expected) <= 1e-4


def test_backward_matches_diffusers():
    ref, ours = reference_pair(TINY)
    ref.train()
    ours.train()
    # Dropout in the temporal convs would make the two runs draw differently: switch it off.
    for m in list(ref.modules()) + list(ours.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 3, 8, 8, generator=gen)
    ctx = torch.randn(2, 5, 32, generator=gen)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref, torch.tensor([3, 900]), encoder_hidden_states=ctx).sample.square().mean().backward()
    ours(x_ours, torch.tensor([3, 900]), ctx).square().mean().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-4
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert rel_err(p.grad, g_ref) <= 1e-3 or (p.grad - g_ref).abs().max() <= 1e-7, name


def test_images_bypass_temporal_layers():
    """F = 1: our model skips every temporal layer; diffusers still runs them (not the identity)."""
    ref, ours = reference_pair(TINY)
    x = torch.randn(2, 8, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    ctx = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = ref(x, 50, encoder_hidden_states=ctx).sample
        # Reference for the bypass: the same diffusers model with its temporal layers made identities.
        for m in ref.modules():
            if type(m).__name__ in ("TemporalConvLayer", "TransformerTemporalModel"):
                if type(m).__name__ == "TemporalConvLayer":
                    m.forward = lambda h, num_frames=1: h
                else:
                    m.forward = lambda h, num_frames=1, **kw: (h,)
        bypassed = ref(x, 50, encoder_hidden_states=ctx).sample
        got = ours(x, 50, ctx)
    assert rel_err(got, bypassed) <= 1e-4
    assert rel_err(got, full) > 1e-3  # the documented difference is real


def test_save_and_load_roundtrip_through_diffusers(tmp_path):
    ref, ours = reference_pair(THREE_LEVEL)
    ref.save_pretrained(tmp_path / "ref", safe_serialization=True)
    loaded = UNet3D.from_pretrained(tmp_path / "ref")
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    loaded.save_pretrained(tmp_path / "ours")
    back = UNet3DConditionModel.from_pretrained(tmp_path / "ours")
    assert back.config.block_out_channels == tuple(THREE_LEVEL["block_out_channels"]) or list(
        back.config.block_out_channels) == THREE_LEVEL["block_out_channels"]
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_conv_in_expansion_keeps_the_function(tmp_path):
    """A 4-channel (ModelScope) checkpoint loaded with in_channels=8: zero c_image computes the same."""
    cfg = {**TINY, "in_channels": 4}
    ref, _ = reference_pair(cfg)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = UNet3D.from_pretrained(tmp_path, in_channels=8)
    assert model.config["in_channels"] == 8
    assert model.conv_in.weight.shape[1] == 8 and not model.conv_in.weight[:, 4:].any()
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 3, 8, 8, generator=gen)
    ctx = torch.randn(1, 6, 32, generator=gen)
    with torch.no_grad():
        expected = ref(z, 300, encoder_hidden_states=ctx).sample
        got = model(torch.cat([z, torch.zeros_like(z)], dim=1), 300, ctx)
    assert rel_err(got, expected) <= 1e-4
    with pytest.raises(UNetLoadError, match="in_channels=2"):
        UNet3D.from_pretrained(tmp_path, in_channels=2)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(UNetLoadError, match="no config.json"):
        UNet3D.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UNetLoadError, match="not valid JSON"):
        UNet3D.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UNetLoadError, match="pickle"):
        UNet3D.from_pretrained(tmp_path)
    UNet3D(TINY).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["cross_attention_dim"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UNetLoadError, match="attn2.to_k.weight has shape"):
        UNet3D.from_pretrained(tmp_path / "m")
    cfg["block_out_channels"] = [32, 32]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UNetLoadError, match="unexpected"):
        UNet3D.from_pretrained(tmp_path / "m")
    cfg["down_block_types"] = ["Nope", "DownBlock3D"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UNetLoadError, match="Nope"):
        UNet3D.from_pretrained(tmp_path / "m")


def test_bad_inputs_and_backend():
    model = UNet3D(TINY)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 2, 8, 8), 1, torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        model(torch.randn(8, 8, 8, 8), 1, torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="backend"):
        UNet3D(TINY, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown UNet3D config field"):
        UNet3D({**TINY, "num_layers": 3})


def test_presets_parameter_counts_match_diffusers():
    """Preset sizes equal the diffusers model built from the same config (counted on meta)."""
    for name in PRESETS:
        cfg = {k: v for k, v in PRESETS[name].items() if k != "sample_size"}
        with torch.device("meta"):
            ref = UNet3DConditionModel(**cfg)
        assert count_parameters(name) == sum(p.numel() for p in ref.parameters()), name
    assert round(count_parameters("pixeldance") / 1e9, 2) == 1.41


def test_packed_qkv_weight_is_kept_per_weight_version_and_fresh_under_autograd():
    """Inference reuses one [W_q; W_k; W_v] per weight version (no concatenation per call); an in-place weight
    update makes a new one; with gradients it is a fresh concatenation that autograd flows through."""
    from pdengine.model.layers import Attention

    attn = Attention(8, 2, 4)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        packed = attn.packed_qkv_weight(x)
        assert attn.packed_qkv_weight(x) is packed
        torch.testing.assert_close(packed, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        attn.to_k.weight.add_(1.0)
        fresh = attn.packed_qkv_weight(x)
        assert fresh is not packed
        torch.testing.assert_close(fresh[8:16], attn.to_k.weight)
    w = attn.packed_qkv_weight(x)
    assert w.requires_grad and w is not fresh
    w.sum().backward()
    assert attn.to_v.weight.grad is not None and torch.equal(attn.to_v.weight.grad, torch.ones(8, 8))
