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


def _checkpoint_dtype(unet_dir: Path):
    """The floating dtype the checkpoint stores (so conversion does not upcast fp16/bf16 weights)."""
    from safetensors import safe_open

    files = sorted(unet_dir.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as fh:
        for key in fh.keys():
            t = fh.get_slice(key)
            dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(t.get_dtype())
            if dtype is not None:
                import torch

                return getattr(torch, dtype)
    return None


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
    s_res, d_res = src.resolve(), dst.resolve()
    if s_res == d_res or s_res in d_res.parents or d_res in s_res.parents:
        raise ValueError("--out must be outside the source folder and must not contain it")
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
        unet = UNet3D.from_pretrained(src / "unet", in_channels=2 * latent, dtype=_checkpoint_dtype(src / "unet"))
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
