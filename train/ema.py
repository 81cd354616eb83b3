"""Exponential moving average of a model's weights (`pdengine train --ema DECAY [--ema-device gpu|cpu]`).

After every optimizer step, ema <- decay * ema + (1 - decay) * weights, in fp32. Three layouts:

- beside the weights (the default): a few multi-tensor launches per step;
- in host memory while the weights are on a GPU (`--ema-device cpu`, which frees the average's GPU memory):
  the weights are copied into pinned host buffers on a side CUDA stream and a background thread averages
  them, so the copy and the CPU work overlap the next step's forward and backward; the next optimizer step
  waits for the copy (`before_weights_change`), and reading the average waits for the thread (`wait`);
- under FSDP2 (`fully_shard`) every rank keeps the average of its own shard of each parameter (no rank holds
  the whole model), and `full_state` gathers it, a collective that every rank calls.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; a plain tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that this rank holds of the DTensor `ref` (FSDP2 shards dim 0 in
    `torch.chunk` pieces, the last ranks' possibly empty); `full` itself when `ref` is a plain tensor."""
    if not _is_dtensor(ref):
        return full
    if tuple(full.shape) != tuple(ref.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be sharded like one of {tuple(ref.shape)}")
    mesh, local = ref.device_mesh, full
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not in the tensor's device mesh")
    for axis, placement in enumerate(ref.placements):
        if placement.is_shard():
            dim = placement.dim
            chunks = torch.chunk(local, mesh.size(axis), dim=dim)
            index = coordinate[axis]
            local = chunks[index] if index < len(chunks) else local.narrow(dim, 0, 0)
        elif not placement.is_replicate():
            raise ValueError(f"cannot shard an average like a tensor placed as {placement}")
    if local.shape != ref.to_local().shape:
        raise ValueError(f"this rank's piece has shape {tuple(local.shape)}, its shard {tuple(ref.to_local().shape)}")
    return local


class EMA:
    """The moving average of `model`'s state (parameters and buffers), fp32 on `device`, started from `state`
    (the whole tensors, e.g. an `ema/` folder being resumed) or from the model's current weights.

    `asynchronous` (default: when the average is in host memory and some weight is on a GPU) copies the
    weights to host buffers and averages them in a background thread; with weights on the CPU it still runs
    the same staging and thread (used by the tests)."""

    def __init__(self, model: nn.Module, decay: float, device: torch.device,
                 state: dict[str, torch.Tensor] | None = None, asynchronous: bool | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.device = decay, torch.device(device)
        own = model.state_dict()
        source = state if state is not None else own
        if set(source) != set(own):
            raise ValueError("EMA state does not match the model's parameters")
        self.sharded = any(_is_dtensor(v) for v in own.values())
        with torch.no_grad():
            self.shadow = {
                k: _local(shard_like(source[k], own[k]) if state is not None else own[k]).detach()
                .to(device=self.device, dtype=torch.float32).clone()
                for k in own
            }
        if asynchronous is None:
            asynchronous = self.device.type == "cpu" and any(_local(v).is_cuda for v in own.values())
        self.asynchronous = asynchronous
        self._staging: dict[str, torch.Tensor] | None = None
        self._stream = None
        self._copied = None  # CUDA event: the weights' copy into the staging buffers is done
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weights = {k: _local(v).detach() for k, v in model.state_dict().items()}
        if self.asynchronous:
            self._update_async(weights)
            return
        names = [k for k, v in weights.items() if v.device == self.device]
        if names:  # on the weights' device: a few multi-tensor launches instead of one or two per tensor
            torch._foreach_lerp_([self.shadow[k] for k in names],
                                 [weights[k].to(torch.float32) for k in names], 1.0 - self.decay)
        for k, v in weights.items():
            if v.device != self.device:  # elsewhere and synchronous: copied over per tensor
                self.shadow[k].lerp_(v.to(device=self.device, dtype=torch.float32), 1.0 - self.decay)

    def _update_async(self, weights: dict[str, torch.Tensor]) -> None:
        self.wait()  # the previous average has finished reading the staging buffers
        if self._staging is None:
            self._staging = self._allocate_staging(weights)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdengine-ema")
        gpu = next((v.device for v in weights.values() if v.is_cuda), None)
        if gpu is not None:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=gpu)
            # Copy once the step that wrote the weights is done, on a side stream: the next forward and
            # backward (which only read the weights) run meanwhile.
            self._stream.wait_stream(torch.cuda.current_stream(gpu))
            with torch.cuda.stream(self._stream):
                for k, v in weights.items():
                    self._staging[k].copy_(v, non_blocking=True)
                self._copied = torch.cuda.Event()
                self._copied.record(self._stream)
        else:
            for k, v in weights.items():
                self._staging[k].copy_(v)
            self._copied = None
        self._pending = self._executor.submit(self._average, self._copied)

    def _allocate_staging(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pin = any(v.is_cuda for v in weights.values())
        try:
            return {k: torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=pin) for k, v in weights.items()}
        except RuntimeError as e:  # pinned memory refused (locked-memory limits): still correct, not overlapped
            warnings.warn(f"EMA: pinned host memory unavailable ({e}); the copies to the host block each step",
                          stacklevel=3)
            return {k: torch.empty(v.shape, dtype=v.dtype, device="cpu") for k, v in weights.items()}

    def _average(self, copied) -> None:
        if copied is not None:
            copied.synchronize()
        for k, avg in self.shadow.items():  # per tensor: widening bf16 weights needs one tensor's fp32 copy
            avg.lerp_(self._staging[k].to(torch.float32), 1.0 - self.decay)

    def before_weights_change(self) -> None:
        """Call before an optimizer step: the GPU waits for the last update's copy of the weights (no host
        sync; nothing to do unless an asynchronous copy is in flight)."""
        if self._copied is not None and self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._copied)

    def wait(self) -> None:
        """Block until the last asynchronous update has been averaged (re-raises its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # ------------------------------------------------------------------ reading the average
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's average (its shards under FSDP2)."""
        self.wait()
        return self.shadow

    def full_state(self, model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """The whole average on the CPU. Under FSDP2 a collective (every rank calls it, in the same order);
        ranks with `keep` False return None."""
        self.wait()
        if not self.sharded:
            return {k: v.cpu() for k, v in self.shadow.items()} if keep else None
        from torch.distributed.tensor import DTensor

        out: dict[str, torch.Tensor] = {}
        for k, ref in model.state_dict().items():
            v = self.shadow[k]
            if _is_dtensor(ref):
                v = DTensor.from_local(v.to(ref.device), ref.device_mesh, ref.placements, run_check=False,
                                       shape=ref.shape, stride=ref.stride()).full_tensor()
            if keep:
                out[k] = v.cpu()
        return out if keep else None


def save_ema_folder(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write an average (whole tensors) as a UNet folder (config.json + safetensors)."""
    from pdengine.model import UNet3D

    with torch.device("meta"):
        shell = UNet3D(config)
    shell.load_state_dict({k: v.cpu() for k, v in state.items()}, assign=True)
    shell.save_pretrained(directory)
