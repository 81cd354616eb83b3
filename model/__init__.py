"""The PixelDance denoiser (`UNet3D`), its layers, configuration and presets."""

from .config import PRESETS, UNetLoadError, count_parameters, preset_config
from .unet3d import UNet3D

__all__ = ["PRESETS", "UNet3D", "UNetLoadError", "count_parameters", "preset_config"]
