"""Channel-concat conditioning kernel (`kernels/concat_cond.py`) against its PyTorch reference, the engine's
`build_c_image`/`unet_input`, and the scheduler's `add_noise`; layout contract, `out=` reuse, compile check."""

from __future__ import annotations

import os

import pytest
import torch

from pdengine.engine.conditioning import build_c_image, unet_input
from pdengine.engine.schedulers import default_scheduler
from pdengine.kernels import concat_cond, concat_cond_ref
from tests.kernel_utils import assert_close, assert_low_precision_close, assert_streaming_compiles_clean

# (B, C, F, H, W): batch 1 with F = 2; odd F with H*W = 15 (no block multiple); F > 16.
SHAPES = [(1, 4, 2, 4, 4), (3, 3, 5, 3, 5), (2, 4, 17, 2, 3)]


def _inputs(shape, dtype=torch.float32, seed=0):
    b, c, f, h, w = shape
    g = torch.Generator().manual_seed(seed)
    # z_t as the permuted view of a (B, F, C, H, W) buffer, as the UNet's output-derived latents often are.
    z = torch.randn(b, f, c, h, w, generator=g).to(dtype).permute(0, 2, 1, 3, 4)
    first = torch.randn(b, c, h, w, generator=g).to(dtype)
    last = torch.randn(b, c, h, w, generator=g).to(dtype)
    keep = torch.tensor([True, False, True, False])[:b]  # mixed within the batch
    return z, first, last, keep


def _engine_input(z, first, last, keep):
    """The UNet input the reference pipeline builds (engine/conditioning.py), logical (B, 2C, F, H, W)."""
    b, c, f, h, w = z.shape
    zeros = torch.zeros(b, c, f, h, w, dtype=z.dtype)
    c_first = build_c_image(first, None, f) if first is not None else zeros
    c_last = build_c_image(None, last, f) if last is not None else zeros
    return unet_input(z, c_first, c_last, keep if keep is not None else torch.ones(b, dtype=torch.bool))


def _assert_layout(y, shape):
    """The layout contract: logical (N, 2C, F, H, W), memory (N, F, 2C, H, W); the UNet's rows are a view."""
    n, c2, f, h, w = shape
    assert tuple(y.shape) == shape
    assert y.permute(0, 2, 1, 3, 4).is_contiguous()
    rows = y.permute(0, 2, 1, 3, 4).reshape(n * f, c2, h, w)
    assert rows.data_ptr() == y.data_ptr() and rows._is_view()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_engine_conditioning(shape, dtype):
    z, first, last, keep = _inputs(shape, dtype)
    expected = _engine_input(z, first, last, keep)
    for keep_mask in (keep, keep.float()):  # bool (the tau rule) and float (a training mask)
        y = concat_cond.concat_condition(z, first, last, keep_mask)
        _assert_layout(y, tuple(expected.shape))
        # Pure copies (times an exact 0/1): bit-equal in every dtype.
        assert torch.equal(y, expected)
        assert torch.equal(concat_cond_ref.concat_condition_ref(z, first, last, keep_mask), expected)


@pytest.mark.parametrize("which", ["no_first", "no_last", "none", "keep_none", "keep_scalar"])
def test_missing_instructions_and_keep(which):
    z, first, last, keep = _inputs((2, 3, 3, 3, 5))
    if which in ("no_first", "none"):
        first = None
    if which in ("no_last", "none"):
        last = None
    if which == "keep_none":
        keep = None
    if which == "keep_scalar":
        keep = torch.tensor(False)  # one value for the whole batch
    expected = _engine_input(z, first, last, keep)
    assert torch.equal(concat_cond.concat_condition(z, first, last, keep), expected)
    assert torch.equal(concat_cond_ref.concat_condition_ref(z, first, last, keep), expected)


def test_strided_inputs():
    b, c, f, h, w = 2, 3, 4, 3, 5
    g = torch.Generator().manual_seed(1)
    # z_t with a non-flat (H, W) plane (every other column) and instructions that are views of a video.
    z = torch.randn(b, c, f, h, 2 * w, generator=g)[..., ::2]
    video = torch.randn(b, c, 6, h, w, generator=g)
    first = video[:, :, 0]
    last = torch.randn(b, c, w, h, generator=g).transpose(-1, -2)
    keep = torch.tensor([0.0, 1.0])
    expected = _engine_input(z, first, last, keep)
    assert torch.equal(concat_cond.concat_condition(z, first, last, keep), expected)


def test_repeat_and_out_reuse():
    shape = (3, 3, 5, 3, 5)
    b, c, f, h, w = shape
    z, first, last, keep = _inputs(shape)
    out = concat_cond.alloc_unet_input(2 * b, c, f, h, w, dtype=z.dtype, device=z.device)
    out.fill_(float("nan"))
    y = concat_cond.concat_condition(z, first, last, keep, repeat=2, out=out)
    assert y.data_ptr() == out.data_ptr()
    _assert_layout(y, (2 * b, 2 * c, f, h, w))
    expected = _engine_input(z, first, last, keep)
    assert torch.equal(y, torch.cat([expected, expected]))  # the pipeline's CFG batch [x; x]
    # A later step (the tau rule flips every keep to 0) refills the same buffer.
    keep_after = torch.zeros(b, dtype=torch.bool)
    y2 = concat_cond.concat_condition(z, first, last, keep_after, repeat=2, out=out)
    assert y2.data_ptr() == out.data_ptr()
    expected = _engine_input(z, first, last, keep_after)
    assert torch.equal(out, torch.cat([expected, expected]))
    ref_out = concat_cond.alloc_unet_input(2 * b, c, f, h, w, dtype=z.dtype, device=z.device)
    ref = concat_cond_ref.concat_condition_ref(z, first, last, keep_after, repeat=2, out=ref_out)
    assert ref.data_ptr() == ref_out.data_ptr() and torch.equal(ref, out)


def _train_inputs(shape, dtype, perturb_first, perturb_last, seed=2, non_flat=False):
    b, c, f, h, w = shape
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, f, c, h, w, generator=g).to(dtype).permute(0, 2, 1, 3, 4)
    noise = torch.randn(b, c, f, h, w, generator=g).to(dtype)
    first = torch.randn(b, c, h, w, generator=g).to(dtype)
    last = torch.randn(b, c, h, w, generator=g).to(dtype)
    eps_first = torch.randn(b, c, h, w, generator=g).to(dtype) if perturb_first else None
    eps_last = torch.randn(b, c, h, w, generator=g).to(dtype) if perturb_last else None
    if non_flat:  # transposed (H, W) planes: the strided path of every training input
        noise = torch.randn(b, c, f, w, h, generator=g).to(dtype).transpose(-1, -2)
        eps_last = torch.randn(b, c, w, h, generator=g).to(dtype).transpose(-1, -2)
    timesteps = torch.tensor([999, 0, 437])[:b]
    keep = torch.tensor([1.0, 0.0, 1.0])[:b]  # the eta drop, mixed within the batch
    return z0, noise, timesteps, first, last, keep, eps_first, eps_last


@pytest.mark.parametrize("perturb_first,perturb_last", [(False, False), (True, False), (False, True), (True, True)])
def test_train_reference_matches_add_noise_and_kernel(perturb_first, perturb_last):
    shape = (3, 3, 5, 3, 5)
    b, c, f, h, w = shape
    sched = default_scheduler("ddpm")
    abar = sched.alphas_cumprod
    z0, noise, t, first, last, keep, e_first, e_last = _train_inputs(
        shape, torch.float32, perturb_first, perturb_last, non_flat=perturb_first and perturb_last)
    kwargs = dict(cond_noise_first=e_first, cond_noise_last=e_last, cond_timestep=100)
    ref = concat_cond_ref.concat_condition_train_ref(z0, noise, t, abar, first, last, keep, **kwargs)
    _assert_layout(ref, (b, 2 * c, f, h, w))
    # The reference against the scheduler's forward process and the engine's conditioning.
    t100 = torch.full((b,), 100)
    slot_first = sched.add_noise(first, e_first, t100) if perturb_first else first
    slot_last = sched.add_noise(last, e_last, t100) if perturb_last else last
    expected = _engine_input(sched.add_noise(z0, noise, t), slot_first, slot_last, keep)
    assert torch.equal(ref, expected)
    y = concat_cond.concat_condition_train(z0, noise, t, abar, first, last, keep, **kwargs)
    _assert_layout(y, (b, 2 * c, f, h, w))
    assert_close(y, ref, torch.float32, "concat_condition_train")


def test_train_bf16():
    shape = (2, 4, 4, 3, 5)
    sched = default_scheduler("ddpm")
    inputs = _train_inputs(shape, torch.bfloat16, True, True)
    z0, noise, t, first, last, keep, e_first, e_last = inputs
    kwargs = dict(cond_noise_first=e_first, cond_noise_last=e_last)
    y = concat_cond.concat_condition_train(z0, noise, t, sched.alphas_cumprod, first, last, keep, **kwargs)
    ref_lp = concat_cond_ref.concat_condition_train_ref(z0, noise, t, sched.alphas_cumprod, first, last, keep,
                                                        **kwargs)
    up = [x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    z0, noise, t, first, last, keep, e_first, e_last = up
    ref32 = concat_cond_ref.concat_condition_train_ref(z0, noise, t, sched.alphas_cumprod, first, last, keep,
                                                       cond_noise_first=e_first, cond_noise_last=e_last)
    assert y.dtype == torch.bfloat16
    assert_low_precision_close(y, ref_lp, ref32, "concat_condition_train bf16")


def _bad(case):
    z, first, last, keep = _inputs((2, 3, 3, 3, 5))
    args = dict(z_t=z, f_first=first, f_last=last, keep_last=keep)
    if case == "one_frame":
        args["z_t"] = torch.randn(2, 3, 1, 3, 5)
    elif case == "slot_shape":
        args["f_last"] = torch.randn(2, 3, 5, 3)
    elif case == "slot_dtype":
        args["f_first"] = first.double()
    elif case == "keep_shape":
        args["keep_last"] = torch.ones(3, dtype=torch.bool)
    elif case == "keep_dtype":
        args["keep_last"] = torch.ones(2, dtype=torch.int64)
    elif case == "repeat":
        args["repeat"] = 0
    elif case == "out_layout":
        args["out"] = torch.empty(2, 6, 3, 3, 5)  # contiguous (B, 2C, F, H, W): not the contract
    elif case == "out_shape":
        args["out"] = concat_cond.alloc_unet_input(4, 3, 3, 3, 5, dtype=z.dtype, device=z.device)
    return args


@pytest.mark.parametrize("case, match", [
    ("one_frame", "at least 2 frames"), ("slot_shape", "f_last has shape"), ("slot_dtype", "f_first is"),
    ("keep_shape", "keep_last must be"), ("keep_dtype", "bool or floating"), ("repeat", "repeat must be"),
    ("out_layout", "contiguous .B, F, 2C, H, W. buffer"), ("out_shape", "out has shape"),
])
def test_input_errors(case, match):
    args = _bad(case)
    for fn in (concat_cond.concat_condition, concat_cond_ref.concat_condition_ref):
        kwargs = dict(args)
        z, first, last, keep = (kwargs.pop(k) for k in ("z_t", "f_first", "f_last", "keep_last"))
        with pytest.raises(ValueError, match=match):
            fn(z, first, last, keep, **kwargs)


def test_train_input_errors():
    z0, noise, t, first, last, keep, e_first, e_last = _train_inputs((2, 3, 3, 3, 5), torch.float32, True, True)
    abar = default_scheduler("ddpm").alphas_cumprod
    fn = concat_cond.concat_condition_train
    with pytest.raises(ValueError, match="cond_noise_first is given but f_first is None"):
        fn(z0, noise, t, abar, None, last, keep, cond_noise_first=e_first)
    with pytest.raises(ValueError, match="cond_timestep 1000 is outside"):
        fn(z0, noise, t, abar, first, last, keep, cond_timestep=1000)
    with pytest.raises(ValueError, match="timesteps must be"):
        fn(z0, noise, t.float(), abar, first, last, keep)
    with pytest.raises(ValueError, match="alphas_cumprod must be"):
        fn(z0, noise, t, abar.double(), first, last, keep)
    with pytest.raises(ValueError, match="noise is"):
        fn(z0, noise[:, :, :2], t, abar, first, last, keep)


def test_modeled_bytes_counts_every_tensor_once():
    shape = (2, 4, 16, 8, 8)
    z, first, last, keep = _inputs(shape, torch.bfloat16)
    y = concat_cond_ref.concat_condition_ref(z, first, last, keep, repeat=2)
    nbytes = sum(t.numel() * t.element_size() for t in (z, first, last, y))
    assert concat_cond.modeled_bytes(shape, torch.bfloat16, repeat=2) == nbytes
    z0, noise, t, first, last, keep, e_first, e_last = _train_inputs(shape, torch.float32, False, True)
    y = concat_cond_ref.concat_condition_train_ref(z0, noise, t, default_scheduler().alphas_cumprod, first, last,
                                                   keep, cond_noise_last=e_last)
    nbytes = sum(x.numel() * x.element_size() for x in (z0, noise, first, last, e_last, y))
    assert concat_cond.modeled_bytes(shape, torch.float32, training=True, perturb_last=True) == nbytes


def test_compile_specs_no_spills():
    assert_streaming_compiles_clean(concat_cond.compile_specs())


@pytest.mark.gpu
def test_cuda_graph_replay(gpu):
    """Captured once with `out=`, replayed after the latent and the keep mask change in their buffers."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled kernels: run with TRITON_INTERPRET=0")
    b, c, f, h, w = 2, 4, 16, 32, 32  # the pixeldance latent
    z = torch.randn(b, c, f, h, w, device=gpu, dtype=torch.bfloat16)
    first = torch.randn(b, c, h, w, device=gpu, dtype=torch.bfloat16)
    last = torch.randn(b, c, h, w, device=gpu, dtype=torch.bfloat16)
    keep = torch.ones(b, device=gpu, dtype=torch.bool)
    out = concat_cond.alloc_unet_input(2 * b, c, f, h, w, dtype=z.dtype, device=gpu)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles the kernel
        concat_cond.concat_condition(z, first, last, keep, repeat=2, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        concat_cond.concat_condition(z, first, last, keep, repeat=2, out=out)
    for keep_values in ([True, False], [False, False]):
        z.copy_(torch.randn_like(z))
        keep.copy_(torch.tensor(keep_values, device=gpu))
        graph.replay()
        expected = concat_cond_ref.concat_condition_ref(z, first, last, keep, repeat=2)
        assert torch.equal(out, expected)
