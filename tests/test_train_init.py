"""Model initialisation for training: SD inflation computes the 2D model frame by frame; ModelScope
conv_in expansion; presets."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from pdengine.engine.tiny import write_tiny_sd_pipeline
from pdengine.train.init import init_unet, unet3d_config_from_sd
from tests.kernel_utils import assert_close


def _sd_unet(tmp_path, **overrides):
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               norm_num_groups=8, attention_head_dim=4, cross_attention_dim=24)
    cfg.update(overrides)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    return unet


@pytest.mark.parametrize("linear_projection", [False, True])
def test_inflated_sd_unet_computes_the_2d_model_per_frame(tmp_path, linear_projection):
    """SD 1.x style (conv proj_in, 4 heads on every level -> head dims 8/16) and SD 2 style (linear)."""
    sd = _sd_unet(tmp_path, use_linear_projection=linear_projection)
    model = init_unet("sd", tmp_path, in_channels=8).eval()
    assert model.config["attention_head_dim"] == [8, 16]
    gen = torch.Generator().manual_seed(2)
    b, f = 2, 3
    z = torch.randn(b, 4, f, 8, 8, generator=gen)
    ctx = torch.randn(b, 5, 24, generator=gen)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        got = model(torch.cat([z, torch.zeros_like(z)], 1), t, ctx)
        frames = z.permute(0, 2, 1, 3, 4).reshape(b * f, 4, 8, 8)
        ref = sd(frames, t.repeat_interleave(f), encoder_hidden_states=ctx.repeat_interleave(f, 0)).sample
    ref = ref.reshape(b, f, 4, 8, 8).permute(0, 2, 1, 3, 4)
    assert_close(got, ref, name="inflated")
    # The temporal layers are identities now but are real, trainable layers.
    assert any("temp_attentions" in n for n, _ in model.named_parameters())


def test_inflate_the_tiny_sd_folder(tmp_path):
    write_tiny_sd_pipeline(tmp_path / "sd")
    model = init_unet("sd", tmp_path / "sd")
    assert model.config["in_channels"] == 8 and not model.conv_in.weight[:, 4:].any()


def test_inflation_rejects_what_it_cannot_represent():
    base = dict(down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                block_out_channels=[32])
    with pytest.raises(ValueError, match="class_embed_type"):
        unet3d_config_from_sd({**base, "class_embed_type": "timestep"}, 8)
    with pytest.raises(ValueError, match="transformer_layers_per_block"):
        unet3d_config_from_sd({**base, "transformer_layers_per_block": 2}, 8)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        unet3d_config_from_sd({**base, "_class_name": "UNet3DConditionModel"}, 8)


def test_init_from_modelscope_and_preset(tiny_modelscope_dir, tiny_pipeline_dir):
    m = init_unet("modelscope", tiny_modelscope_dir)
    assert m.config["in_channels"] == 8 and not m.conv_in.weight[:, 4:].any()
    with pytest.raises(ValueError, match="--init-from-modelscope"):
        init_unet("model", tiny_modelscope_dir)
    assert init_unet("model", tiny_pipeline_dir).config["in_channels"] == 8
    assert init_unet("preset", "tiny").config["block_out_channels"] == [32, 64]
    with pytest.raises(ValueError, match="init kind"):
        init_unet("nope", "x")
