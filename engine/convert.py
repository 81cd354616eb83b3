"""Model-folder conversion: a diffusers text-to-video (ModelScope) folder -> a PixelDance folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .pipeline import PARTS, ModelFolderError, check_model_folder

PIXELDANCE_INDEX = {
    "_class_name": "PixelDancePipeline",
    "unet": ["pdengine", "UNet3D"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def convert_model(src: str | Path, dst: str | Path, *, source: str = "modelscope",
                  overwrite: bool = False) -> Path:
    """Write a PixelDance folder at `dst` from `src`.

    modelscope: the UNet's conv_in gets `latent_channels` extra zero input channels (for c_image), so the
    converted model computes exactly what the original did while c_image is zero; the other parts are
    copied. pixeldance: the folder is checked, loaded and rewritten (normalised safetensors + index).
    The new folder is built beside `dst` and renamed into place at the end.
    """
    from importlib.metadata import version

    from pdengine.model import UNet3D

    src, dst = Path(src), Path(dst)
    if source not in ("modelscope", "pixeldance"):
        raise ValueError(f"source must be 'modelscope' or 'pixeldance', got {source!r}")
    index = check_model_folder(src)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise ValueError("--out must differ from the source folder")
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    latent = int(vae_cfg.get("latent_channels", 4))
    unet_cfg = json.loads((src / "unet" / "config.json").read_text())
    in_ch = int(unet_cfg.get("in_channels", 4))
    if source == "modelscope" and in_ch != latent:
        raise ModelFolderError(
            f"{src}: unet has {in_ch} input channels, a ModelScope (text-to-video) unet has {latent}; "
            "is it already a PixelDance folder? (use --from pixeldance)"
        )
    if source == "pixeldance" and in_ch != 2 * latent:
        raise ModelFolderError(f"{src}: unet has {in_ch} input channels, a PixelDance unet has {2 * latent}")

    tmp = dst.parent / f".{dst.name}.converting"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        unet = UNet3D.from_pretrained(src / "unet", in_channels=2 * latent)
        unet.save_pretrained(tmp / "unet")
        for part in PARTS:
            if part != "unet":
                shutil.copytree(src / part, tmp / part)
        new_index = {**PIXELDANCE_INDEX, "_pdengine_version": version("pixeldance-engine"),
                     "_converted_from": f"{source}:{index.get('_class_name', 'unknown')}"}
        if "scheduler" in index:
            new_index["scheduler"] = index["scheduler"]
        (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
