"""AdamW for bf16 weights, with stochastic rounding: one elementwise pass per parameter tensor.

Why stochastic rounding: see `adamw_sr_ref.py` (at fine-tuning learning rates a bf16 weight rounded to nearest
keeps almost none of its updates). The pass reads the weight, its gradient and both moments once, does the
AdamW step in fp32 (torch.optim.AdamW's formula: decoupled weight decay, bias-corrected moments) and writes
the weight and moments once, each bf16 one stochastically rounded with its own random stream: Philox
(`tl.randint4x`) keyed by `seed` and the element's index, so a step is reproducible from (seed, step) and a
resumed run repeats an uninterrupted one. fp32 moments or weights are stored as computed. 8 bf16 elements per
thread (16-byte vectors).

Used by `pdengine.train.optim.AdamWSR` (`pdengine train --pure-bf16`) for CUDA parameters; CPU parameters
take the reference (`adamw_sr_ref.adamw_sr_step_ref_`, the same math with torch's generator).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .compile_check import CompileSpec, jit_function

__all__ = ["adamw_sr_step_", "modeled_bytes", "compile_specs"]

_BLOCK = 1024
_WARPS = 4


@triton.jit
def _round_store(ptr, x, offs, mask, r):
    """Store fp32 x at ptr: stochastically rounded with the random 32-bit integers r when ptr is bf16."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (r & 0xFFFF)) & 0xFFFF0000  # exact in bf16 now: the cast below does not round
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_sr_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr,  # weight, gradient, first and second moments: n elements each, contiguous
    n, lr, beta1, beta2, eps, decay,  # decay = 1 - lr * weight_decay
    step_size,  # lr / (1 - beta1^step)
    inv_sqrt_bc2,  # 1 / sqrt(1 - beta2^step)
    seed,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * decay - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    r0, r1, r2, _ = tl.randint4x(seed, offs)
    _round_store(p_ptr, p, offs, mask, r0)
    _round_store(m_ptr, m, offs, mask, r1)
    _round_store(v_ptr, v, offs, mask, r2)


def adamw_sr_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, step: int, seed: int) -> None:
    """One AdamW step in place on a CUDA parameter (or any, under TRITON_INTERPRET=1): p, m, v updated, each
    bf16 one stochastically rounded. All four contiguous, same shape and device; `step` counted from 1; `seed`
    a non-negative int below 2^31 (a new one per step and tensor)."""
    tensors = (p, g, m, v)
    if any(t.shape != p.shape or t.device != p.device or not t.is_contiguous() for t in tensors):
        raise ValueError("weight, gradient and moments must be contiguous tensors of one shape on one device")
    if any(t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        raise ValueError(f"dtypes must be fp32 or bf16, got {[t.dtype for t in tensors]}")
    if step < 1 or not 0 <= seed < 2**31:
        raise ValueError(f"step must be >= 1 and seed in [0, 2^31), got {step}, {seed}")
    n = p.numel()
    if n:
        _adamw_sr_kernel[(triton.cdiv(n, _BLOCK),)](
            p, g, m, v, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
            1.0 / math.sqrt(1.0 - beta2 ** step), seed, BLOCK=_BLOCK, num_warps=_WARPS)


def modeled_bytes(n: int, param_dtype: torch.dtype = torch.bfloat16, state_dtype: torch.dtype = torch.bfloat16) -> int:
    """HBM bytes of one step over n elements: weight, gradient and moments read once, weight and moments
    written once."""
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    return n * (2 * p + p + 4 * s)


def compile_specs() -> list[CompileSpec]:
    """The pure-bf16 launch (weights, gradients, moments in bf16)."""
    return [CompileSpec(
        name="adamw_sr_bf16", fn=jit_function(_adamw_sr_kernel),
        signature={"p_ptr": "*bf16", "g_ptr": "*bf16", "m_ptr": "*bf16", "v_ptr": "*bf16", "n": "i32",
                   "lr": "fp32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32", "decay": "fp32",
                   "step_size": "fp32", "inv_sqrt_bc2": "fp32", "seed": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": _BLOCK}, num_warps=_WARPS, num_stages=1, divisible=("n",),
        max_narrow_global=0,
    )]
