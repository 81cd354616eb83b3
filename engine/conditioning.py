"""Image instructions: `c_image = [f_first, 0, ..., 0, f_last]` over F frames, and the UNet input.

Reference (pure PyTorch) versions; the fused Triton kernel builds the same UNet input without
materialising c_image.
"""

from __future__ import annotations

import torch


def build_c_image(
    f_first: torch.Tensor | None,
    f_last: torch.Tensor | None,
    num_frames: int,
    *,
    shape: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Lay the instruction latents (B, C, h, w) out over frames -> (B, C, F, h, w).

    Slot 0 holds f_first, slot F-1 holds f_last, everything else is zero (the paper's PAD). A missing
    instruction is zeros; `shape` (B, C, h, w) is needed when both are missing.
    """
    if num_frames < 2:
        raise ValueError(f"c_image needs at least 2 frames, got {num_frames}")
    ref = f_first if f_first is not None else f_last
    if ref is None:
        if shape is None:
            raise ValueError("build_c_image: give `shape` when there is no instruction at all")
        return torch.zeros(shape[0], shape[1], num_frames, shape[2], shape[3])
    if f_first is not None and f_last is not None and f_first.shape != f_last.shape:
        raise ValueError(f"f_first {tuple(f_first.shape)} and f_last {tuple(f_last.shape)} differ in shape")
    b, c, h, w = ref.shape
    c_image = ref.new_zeros(b, c, num_frames, h, w)
    if f_first is not None:
        c_image[:, :, 0] = f_first
    if f_last is not None:
        c_image[:, :, -1] = f_last
    return c_image


def unet_input(z_t: torch.Tensor, c_first: torch.Tensor, c_last: torch.Tensor,
               keep_last: torch.Tensor) -> torch.Tensor:
    """`[z_t ; c_image]` on channels, with the last-frame instruction scaled by a per-sample keep mask.

    z_t, c_first, c_last: (B, C, F, h, w) — c_first holds only the first-frame slot, c_last only the
    last-frame slot. keep_last: (B,) or scalar tensor of 0/1 (the tau rule at inference, the eta drop in
    training). Device-side select: no host sync, so a CUDA graph can capture it.
    """
    keep = keep_last.to(z_t.dtype).reshape(-1, 1, 1, 1, 1)
    return torch.cat([z_t, c_first + keep * c_last], dim=1)
