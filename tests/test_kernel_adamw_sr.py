"""AdamW with stochastic rounding for bf16 weights (kernels/adamw_sr.py, train/optim.py) against torch.optim.AdamW
and the reference (kernels/adamw_sr_ref.py), under the Triton interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from pdengine.kernels.adamw_sr import adamw_sr_step_, compile_specs, modeled_bytes
from pdengine.kernels.adamw_sr_ref import adamw_step_fp32, stochastic_round_bf16
from pdengine.train.optim import AdamWSR
from tests.kernel_utils import assert_close, assert_compiles_clean

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _tensors(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = (0.1 * torch.randn(n, generator=g)).to(dtype)
    m = (0.01 * torch.randn(n, generator=g)).to(dtype)
    v = (1e-4 * torch.rand(n, generator=g)).to(dtype)
    return p, grad, m, v


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values bracketing fp32 x (equal where x is a bf16 value)."""
    bits = x.float().contiguous().view(torch.int32)
    low = bits & -65536
    high = torch.where(bits == low, low, low + 65536)
    return low.view(torch.float32), high.view(torch.float32)


def test_fp32_step_equals_torch_adamw():
    """fp32 weights and moments (no rounding): three steps equal torch.optim.AdamW's, through the optimizer."""
    p = _tensors(1000, torch.float32)[0]
    ours, theirs = p.clone().requires_grad_(), p.clone().requires_grad_()
    opt = AdamWSR([ours], lr=1e-2, weight_decay=0.1, use_kernel=True)
    ref = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        grad = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert_close(ours.detach(), theirs.detach(), name="weights")
    for key in ("exp_avg", "exp_avg_sq"):
        assert_close(opt.state[ours][key], ref.state[theirs][key], name=key)
    assert int(opt.state[ours]["step"]) == 3


@pytest.mark.parametrize("n", [1, 1000, 2500])
def test_bf16_values_are_neighbours_of_the_fp32_step(n):
    """Each stored bf16 weight and moment is one of the two bf16 values around the fp32 result, and both
    occur (rounded stochastically, not to nearest): n not a multiple of the block, a single element."""
    p, g, m, v = _tensors(n, torch.bfloat16, seed=1)
    want = adamw_step_fp32(p, g, m, v, step=3, **HYPER)
    adamw_sr_step_(p, g, m, v, step=3, seed=7, **HYPER)
    for got, exact in zip((p, m, v), want):
        low, high = _neighbours(exact)
        got = got.float()
        assert ((got == low) | (got == high)).all()
    if n >= 1000:
        low, high = _neighbours(want[0])
        inexact = low != high
        assert (p.float()[inexact] == high[inexact]).any() and (p.float()[inexact] == low[inexact]).any()


@pytest.mark.parametrize("rounding", ["kernel", "reference"])
def test_rounding_is_unbiased(rounding):
    """E[round(x)] = x: 65,536 copies of a value a quarter of an ulp above a bf16 value round up a quarter of
    the time, in the kernel (Philox) and in the reference (torch's generator)."""
    base = 1.0 + 2**-7  # a bf16 value; the ulp there is 2^-7
    target = base + 2**-9  # a quarter of an ulp above it
    if rounding == "reference":
        y = stochastic_round_bf16(torch.full((1 << 16,), target), torch.Generator().manual_seed(0)).float()
    else:  # zero gradient and moments: the step is the weight decay alone, p * (1 - lr), with lr chosen so
        # that bf16 weights at base + 1 ulp land on the target
        p = torch.full((1 << 16,), base + 2**-7, dtype=torch.bfloat16)
        zeros = torch.zeros_like(p)
        adamw_sr_step_(p, zeros, zeros.clone(), zeros.clone(), lr=1.0 - target / (base + 2**-7), beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=1.0, step=1, seed=3)
        y = p.float()
    assert set(y.unique().tolist()) == {base, base + 2**-7}
    up = (y > base).float().mean().item()
    assert abs(up - 0.25) < 0.01  # 65,536 draws: the standard error is 0.0017
    assert abs(y.mean().item() - target) < 0.01 * 2**-7


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bf16_weights_follow_the_fp32_trajectory_at_fine_tuning_rates(path):
    """What the rounding is for: at lr 1e-4 (updates ~1e-4, under half a bf16 ulp of weights around 1) torch's
    AdamW on bf16 weights stores almost none of its updates, while AdamWSR's bf16 weights follow the fp32
    weights' path: after 100 steps their mean movement matches fp32's within a few percent."""
    n = 4096
    start = 1.0 + torch.rand(n, generator=torch.Generator().manual_seed(2))
    grad = torch.ones(n)  # Adam's update is then lr per step
    weights = {name: start.to(dtype).clone().requires_grad_() for name, dtype in
               (("fp32", torch.float32), ("sr", torch.bfloat16), ("nearest", torch.bfloat16))}
    opts = {"fp32": torch.optim.AdamW([weights["fp32"]], lr=1e-4, weight_decay=0.0),
            "sr": AdamWSR([weights["sr"]], lr=1e-4, weight_decay=0.0, seed=5, use_kernel=path == "kernel"),
            "nearest": torch.optim.AdamW([weights["nearest"]], lr=1e-4, weight_decay=0.0)}
    for _ in range(100):
        for name, w in weights.items():
            w.grad = grad.to(w.dtype)
            opts[name].step()
    moved = {name: (start.to(w.dtype).float() - w.detach().float()).mean().item() for name, w in weights.items()}
    assert abs(moved["fp32"] - 100 * 1e-4) < 1e-5  # lr per step (fp32 rounding of weights near 1-2 aside)
    assert abs(moved["sr"] - moved["fp32"]) < 0.05 * moved["fp32"]
    assert moved["nearest"] < 0.2 * moved["fp32"]  # rounded to nearest, the updates are lost


def test_a_resumed_optimizer_rounds_as_an_uninterrupted_one():
    """The random streams depend on (seed, step, parameter) only: state_dict -> a new AdamWSR continues
    bit for bit; another seed rounds differently."""
    def run(steps, opt=None, w=None, seed=0):
        if w is None:
            w = _tensors(3000, torch.bfloat16, seed=4)[0].requires_grad_()
            opt = AdamWSR([w], lr=1e-3, seed=seed, use_kernel=True)
        for step in steps:
            w.grad = torch.randn(3000, generator=torch.Generator().manual_seed(step)).bfloat16()
            opt.step()
        return w, opt

    straight, _ = run(range(4))
    w, opt = run(range(2))
    resumed_w = w.detach().clone().requires_grad_()
    resumed = AdamWSR([resumed_w], lr=1e-3, use_kernel=True)
    resumed.load_state_dict(opt.state_dict())
    run(range(2, 4), resumed, resumed_w)
    assert torch.equal(resumed_w, straight)
    assert not torch.equal(run(range(4), seed=1)[0], straight)


def test_inputs_and_bytes():
    p, g, m, v = _tensors(10, torch.bfloat16)
    with pytest.raises(ValueError, match="one shape"):
        adamw_sr_step_(p, g[:5], m, v, step=1, seed=0, **HYPER)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        adamw_sr_step_(p, g.half(), m, v, step=1, seed=0, **HYPER)
    with pytest.raises(ValueError, match="step must be"):
        adamw_sr_step_(p, g, m, v, step=0, seed=0, **HYPER)
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamWSR([p.requires_grad_()], lr=-1.0)
    # bf16: weight, gradient and moments read (8 bytes per element), weight and moments written (6)
    assert modeled_bytes(100) == 100 * (4 * 2 + 3 * 2)


def test_compile_specs_no_spills():
    assert_compiles_clean(compile_specs(), 1)


@pytest.mark.gpu
def test_gpu_step_at_a_weight_of_the_preset(gpu):
    """A q/k/v-sized weight (1280 x 3840) in bf16 on the GPU: every stored value a neighbour of the fp32 step,
    and no bias in the rounding (the mean error far under the ulp)."""
    p, g, m, v = (t.to(gpu) for t in _tensors(1280 * 3840, torch.bfloat16, seed=9))
    want = adamw_step_fp32(p, g, m, v, step=10, **HYPER)
    adamw_sr_step_(p, g, m, v, step=10, seed=11, **HYPER)
    for got, exact in zip((p, m, v), want):
        low, high = _neighbours(exact)
        assert ((got.float() == low) | (got.float() == high)).all()
    err = (p.float() - want[0]) / (_neighbours(want[0])[1] - _neighbours(want[0])[0]).clamp_min(1e-30)
    assert abs(err[want[0] != _neighbours(want[0])[0]].mean().item()) < 0.01


def test_fsdp2_sharded_parameters_step_their_shards(tmp_path):
    """Under FSDP2 (`pdengine train --fsdp --pure-bf16`) parameters and moments are DTensors: each rank steps
    its local shard. One gloo process: the sharded step equals the unsharded one (same seed, rank 0)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(16, 8).bfloat16()
        sharded = torch.nn.Linear(16, 8).bfloat16()
        sharded.load_state_dict(plain.state_dict())
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))  # the default mesh would be a GPU's, if any
        opts = [AdamWSR(m.parameters(), lr=1e-2, seed=3) for m in (plain, sharded)]
        x = torch.randn(4, 16).bfloat16()
        for model, opt in zip((plain, sharded), opts):
            model(x).float().square().mean().backward()
            opt.step()
        assert type(sharded.weight).__name__ == "DTensor"
        for a, b in zip(plain.parameters(), sharded.parameters()):
            assert torch.equal(a.detach(), b.detach().full_tensor())
    finally:
        dist.destroy_process_group()
