"""Shared benchmark tools: environment stamp, measured GPU peaks, NVML snapshots, a CUDA-event timer and
an aten-level byte counter.

What `count_bytes` counts (the `bytes_reference` of `pdengine bench kernels --device cpu`): every aten op
that reaches the dispatcher below autograd is one op; it adds the bytes of each tensor it reads (its
tensor arguments) and each tensor it writes (its outputs). Rules, chosen so the count approximates HBM
traffic of one eager kernel per op:
- view/alias ops (`OpOverload.is_view`: view, permute, select, expand, detach, ...) and `_unsafe_view`
  move nothing: 0 bytes, not counted as ops;
- allocations (`empty`, `empty_strided`, ...) move nothing either;
- in-place ops (`add_`) count `self` once as read and once as written; `out=` arguments count only as
  written; ops that overwrite `self` without reading it (`copy_`, `fill_`, `zero_`, RNG fills) count the
  write only;
- `F.scaled_dot_product_attention` on meta tensors counts as CUDA's fused attention kernel (reads q, k, v,
  writes the output and its log-sum-exp), not as the unfused math path meta/CPU tensors would take;
- a tensor's bytes are its distinct elements times the element size: broadcast (stride-0) dimensions
  count once, since an eager kernel reads that memory once through the cache.
- an operator given a model in `ByteCounter(modeled=...)` (our fused kernels' registered operators, reached
  on meta tensors inside `pdengine.kernels.as_operators()`) counts that model's bytes instead of its inputs
  and outputs: a fused block that makes several passes over HBM inside one operator counts them all.
It counts what PyTorch asks for at the aten level; work a backend does inside one op (cuDNN workspace,
flash-attention tiling re-reads) is not visible, so the count is a lower bound of an eager run's traffic.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops whose output aliases an input but whose schema does not say so.
_NO_COPY_OPS = frozenset({"aten::_unsafe_view", "aten::lift_fresh", "aten::alias"})
# Ops that only allocate: their output is uninitialised memory, nothing is read or written.
_ALLOC_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::empty_permuted",
})
# In-place ops that overwrite `self` without reading it.
_WRITE_ONLY_SELF_OPS = frozenset({
    "aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::bernoulli_",
    "aten::random_", "aten::exponential_", "aten::set_",
})


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct bytes a tensor covers: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Adds up the bytes read and written by every aten op run under it (rules in the module docstring)."""

    def __init__(self, modeled: dict[str, Callable[..., int]] | None = None) -> None:
        super().__init__()
        # Operator name ("ns::op") -> function of the op's (args, kwargs) giving its modeled bytes.
        self.modeled = modeled or {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.ops = 0
        self.per_op: dict[str, int] = {}

    @property
    def total_bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in _NO_COPY_OPS or name in _ALLOC_OPS:
            return out
        if name in self.modeled:
            total = int(self.modeled[name](args, kwargs))
            self.bytes_read += total
            self.ops += 1
            key = str(func.overloadpacket)
            self.per_op[key] = self.per_op.get(key, 0) + total
            return out
        schema_args = func._schema.arguments
        # `out=` arguments are keyword-only in aten schemas; they are written, not read.
        out_ids = {id(kwargs[a.name]) for a in schema_args if a.is_out and isinstance(kwargs.get(a.name), torch.Tensor)}
        skip_self = name in _WRITE_ONLY_SELF_OPS and args and isinstance(args[0], torch.Tensor)
        read = 0
        inputs, _ = tree_flatten((args[1:] if skip_self else args, kwargs))
        for t in inputs:
            if isinstance(t, torch.Tensor) and id(t) not in out_ids:
                read += tensor_bytes(t)
        outputs, _ = tree_flatten(out)
        written = sum(tensor_bytes(t) for t in outputs if isinstance(t, torch.Tensor))
        self.bytes_read += read
        self.bytes_written += written
        self.ops += 1
        key = str(func.overloadpacket)
        self.per_op[key] = self.per_op.get(key, 0) + read + written
        return out


class FusedSDPAOnMeta(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` on `meta` tensors as CUDA does: one fused attention op
    (`_scaled_dot_product_efficient_attention`) and one fused backward op, instead of the unfused math
    decomposition (bmm, softmax, ...) that meta and CPU tensors would otherwise go through. Without it the
    reference's counted bytes would include an attention matrix that no CUDA run materialises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        params = {**dict(zip(names, args)), **kwargs}
        q, k, v = params["query"], params["key"], params["value"]
        if q.device.type != "meta":
            return func(*args, **kwargs)
        if params.get("enable_gqa"):
            raise NotImplementedError("counting SDPA with enable_gqa=True is not supported")
        mask = params.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            raise NotImplementedError("counting SDPA with a boolean mask is not supported")
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, needs_lse, params.get("dropout_p", 0.0), params.get("is_causal", False),
            scale=params.get("scale"))
        return out[0]


def count_bytes(fn: Callable[..., Any], *args: Any, modeled: dict[str, Callable[..., int]] | None = None,
                **kwargs: Any) -> tuple[int, int]:
    """Run `fn(*args, **kwargs)` and return (bytes read + written, number of aten ops) as counted by
    `ByteCounter` (with `modeled` operators counted by their models). Works on `meta` tensors (nothing is
    computed; SDPA counts as CUDA's fused kernel, see `FusedSDPAOnMeta`) as well as on real ones."""
    with FusedSDPAOnMeta(), ByteCounter(modeled) as counter:
        fn(*args, **kwargs)
    return counter.total_bytes, counter.ops


def git_sha(path: Path | None = None) -> str:
    """Short HEAD sha of the checkout that holds `path` (default: this package), or "unknown".

    $PDENGINE_GIT_SHA wins: a copy of the tree without its .git (a lent GPU machine) names its commit so."""
    if os.environ.get("PDENGINE_GIT_SHA"):
        return os.environ["PDENGINE_GIT_SHA"]
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def profile_fields(fn: Callable[[], Any], setup: Callable[[], Any] | None = None, *, reps: int = 3,
                   top: int = 8) -> dict[str, Any]:
    """Where one timed call spends its time: `host_issue_ms`, the median host time to issue one call (no
    sync; when it reaches the device time the row is launch-bound, not GPU-bound), and `top_kernels`, the
    `top` GPU kernels by device time per call under torch.profiler (on the CPU: the aten ops by self CPU
    time), each {name, calls, ms} per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    issue = []
    for _ in range(reps + 2):
        if setup is not None:
            setup()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            if setup is not None:
                setup()
            fn()
        if cuda:
            torch.cuda.synchronize()
    entries = []
    for e in prof.key_averages():
        if cuda:
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            entries.append({"name": e.key[:120], "calls": e.count / reps, "ms": us / 1e3 / reps})
    entries.sort(key=lambda d: -d["ms"])
    return {"host_issue_ms": statistics.median(issue[2:]), "top_kernels": entries[:top]}


# Layer kinds of a video UNet by class name, ours (model/layers.py) and diffusers' alike.
LAYER_KINDS = {
    "TemporalConvLayer": "temporal_conv",
    "TemporalTransformer": "temporal_attention", "TransformerTemporalModel": "temporal_attention",
    "ResnetBlock2D": "spatial_resnet",
    "SpatialTransformer": "spatial_attention", "Transformer2DModel": "spatial_attention",
    "Downsample2D": "resample", "Upsample2D": "resample",
}


@contextlib.contextmanager
def _layer_marks(model: torch.nn.Module, kinds: dict[str, str], stamp: Callable[[], Any],
                 label: Callable[[torch.nn.Module], str] | None = None) -> Iterator[list]:
    """Hooks on `model`'s layers of the kinds in `kinds` (by class name) that append (kind, stamp() at entry,
    stamp() at exit) to the yielded list for each outermost such layer a call runs (a counted layer inside
    another counts for the outer one); `label(module)` names the mark instead of its kind where given. Removed
    on exit."""
    marks: list[tuple[str, Any, Any]] = []
    open_marks: list[tuple[str, Any] | None] = []
    depth = [0]

    def pre(module, args):
        name = label(module) if label is not None else kinds[type(module).__name__]
        open_marks.append((name, stamp()) if depth[0] == 0 else None)
        depth[0] += 1

    def post(module, args, output):
        depth[0] -= 1
        opened = open_marks.pop()
        if opened is not None:
            marks.append((opened[0], opened[1], stamp()))

    handles = []
    for m in model.modules():
        if type(m).__name__ in kinds:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield marks
    finally:
        for h in handles:
            h.remove()


def layer_times(model: torch.nn.Module, fn: Callable[[], Any], *, reps: int = 3,
                kinds: dict[str, str] | None = None,
                label: Callable[[torch.nn.Module], str] | None = None) -> dict[str, float]:
    """Milliseconds per call of `fn` spent inside `model`'s layers of each kind (`LAYER_KINDS` by class
    name; a layer inside another counted layer counts for the outer one; `label(module)` groups them by its
    value instead), plus `total` (the whole call) and `other` (total minus the layers: conv_in/out,
    embeddings, the final norm, and gaps between layers). On CUDA the layers are bracketed by CUDA events on
    the current stream (asynchronous: the run is not serialised by the measurement), else by wall time.
    Median over `reps` calls after one warm-up."""
    kinds = LAYER_KINDS if kinds is None else kinds
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in model.parameters())

    def stamp() -> Any:
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(a: Any, b: Any) -> float:
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    per_call: list[dict[str, float]] = []
    with _layer_marks(model, kinds, stamp, label) as marks:
        for rep in range(reps + 1):
            marks.clear()
            start = stamp()
            fn()
            end = stamp()
            if cuda:
                torch.cuda.synchronize()
            if rep == 0:
                continue  # warm-up: Triton compiles, cuBLAS heuristics, allocator growth
            times: dict[str, float] = {}
            for kind, a, b in marks:
                times[kind] = times.get(kind, 0.0) + elapsed(a, b)
            times["total"] = elapsed(start, end)
            times["other"] = times["total"] - sum(v for k, v in times.items() if k != "total")
            per_call.append(times)
    keys = sorted({k for t in per_call for k in t})
    return {k: statistics.median(t.get(k, 0.0) for t in per_call) for k in keys}


def layer_flops(model: torch.nn.Module, fn: Callable[[], Any], *,
                kinds: dict[str, str] | None = None) -> dict[str, int]:
    """FLOPs of one call of `fn` inside `model`'s layers of each kind, split as `layer_times` splits time
    (`total`, and `other` for what runs outside the counted layers), counted by torch.utils.flop_counter
    (matrix products, convolutions, attention): runs on `meta` tensors, so without a GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    flops: dict[str, int] = {}
    with _layer_marks(model, LAYER_KINDS if kinds is None else kinds, counter.get_total_flops) as marks:
        with counter:
            fn()
    for kind, a, b in marks:
        flops[kind] = flops.get(kind, 0) + b - a
    flops["total"] = counter.get_total_flops()
    flops["other"] = flops["total"] - sum(v for k, v in flops.items() if k != "total")
    return flops


_ROW_CONTEXTS: list[tuple[dict[str, Any], Callable[[dict], None] | None]] = []


@contextlib.contextmanager
def collecting_rows(stamp: dict[str, Any], on_row: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Inside: every `emit`ted row carries `stamp` (GPU, versions, git sha, launch table) already in its ROW
    line, and `on_row` receives it (e.g. to rewrite the result files), so a run cut by a time limit keeps
    complete, labelled rows."""
    _ROW_CONTEXTS.append((stamp, on_row))
    try:
        yield
    finally:
        _ROW_CONTEXTS.pop()


def emit(row: dict) -> dict:
    """Print one finished row at once (`ROW {json}`), so a run stopped part way still leaves what it
    measured in its log; inside `collecting_rows` the row is stamped first and handed on."""
    on_row = None
    if _ROW_CONTEXTS:
        stamp, on_row = _ROW_CONTEXTS[-1]
        row = {**row, **stamp}
    print("ROW " + json.dumps(row, default=str), flush=True)
    if on_row is not None:
        on_row(row)
    return row


def save_rows(rows: list[dict[str, Any]], json_path: Path | None, csv_path: Path | None = None) -> None:
    """The rows as JSON and CSV (default: beside the JSON), replaced whole (written to a temporary file, then
    renamed: a run killed while writing leaves the previous version)."""
    import csv
    import io

    def replace(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    if json_path is not None:
        replace(Path(json_path), json.dumps(rows, indent=2, default=str) + "\n")
        csv_path = csv_path or Path(json_path).with_suffix(".csv")
    if csv_path is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
        replace(Path(csv_path), buf.getvalue())


def env_info(device: str = "cpu") -> dict[str, str]:
    """The stamp every row carries: gpu name (or "cpu"), torch/triton/diffusers versions, git sha, time."""
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) if device == "cuda" else "cpu"
    stamp = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda" and triton_version != "not installed":
        from pdengine.kernels import temporal_conv as tc
        from pdengine.kernels.fused_linear import transformer_gemm_for, transformer_gemm_mode

        # What the temporal conv runs unless a row forces a GEMM: the mode and this GPU's launch table.
        table = tc.table_for(torch.device("cuda", torch.cuda.current_device()))
        stamp["conv_gemm"] = f"{tc._CONV_GEMM['forward']}/{tc._CONV_GEMM['backward']}"
        stamp["conv_table"] = table.describe() if table is not None else "none (built-in tiles)"
        # The transformers' GEMMs at inference unless a row forces them: the setting and what it means here.
        stamp["transformer_gemm"] = (f"{transformer_gemm_for(torch.device('cuda', torch.cuda.current_device()))} "
                                     f"({transformer_gemm_mode()})")
    return stamp


def time_cuda(fn: Callable[[], Any], setup: Callable[[], Any] | None = None, *, warmup: int = 5,
              target_ms: float = 300.0, min_reps: int = 10, max_reps: int = 500, flush_l2: bool = True) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream, by CUDA events around each rep.

    `setup()` runs before every rep outside the timed region (reset gradients, restore an in-place
    input). The L2 cache is flushed before each rep (a 256 MiB write, untimed) so a small problem is
    not timed from cache. Reps are chosen to fill about `target_ms`.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device")
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda") if flush_l2 else None

    def one() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if setup is not None:
            setup()
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    for _ in range(warmup):
        one()
    torch.cuda.synchronize()
    probe = [one() for _ in range(3)]
    torch.cuda.synchronize()
    estimate = max(statistics.median(s.elapsed_time(e) for s, e in probe), 1e-3)
    reps = int(min(max(target_ms / estimate, min_reps), max_reps))
    events = [one() for _ in range(reps)]
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), flush_l2=False)


def _matmul_ms(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return time_cuda(lambda: a @ b, flush_l2=False)


def measure_peaks(device: str = "cuda", copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict[str, float]:
    """Peaks measured now on this GPU: device-to-device copy bandwidth (GB/s, read + write counted) of a
    `copy_bytes` buffer and bf16 matmul throughput (TFLOP/s) of an n x n x n product."""
    if device != "cuda":
        raise ValueError(f"measure_peaks needs device='cuda', got {device!r}")
    gbps = 2 * copy_bytes / (_copy_ms(copy_bytes) * 1e-3) / 1e9
    tflops = 2 * matmul_n**3 / (_matmul_ms(matmul_n) * 1e-3) / 1e12
    torch.cuda.empty_cache()
    return {"peak_gbps": gbps, "peak_tflops": tflops, "peak_copy_bytes": copy_bytes, "peak_matmul_n": matmul_n}


_NVML_STATE: dict[str, Any] = {}


def _nvml():
    """pynvml, initialised once; raises RuntimeError with the reason when NVML cannot be used."""
    if "error" in _NVML_STATE:
        raise RuntimeError(_NVML_STATE["error"])
    if "module" not in _NVML_STATE:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # ImportError, or pynvml's own NVMLError family (no driver library, ...)
            _NVML_STATE["error"] = f"{type(e).__name__}: {e}"
            raise RuntimeError(_NVML_STATE["error"]) from e
        _NVML_STATE["module"] = pynvml
    return _NVML_STATE["module"]


def nvml_index(torch_index: int = 0) -> int:
    """NVML's index of torch's CUDA device `torch_index` (they differ under CUDA_VISIBLE_DEVICES): matched
    by UUID."""
    nv = _nvml()
    uuid = str(torch.cuda.get_device_properties(torch_index).uuid)
    for i in range(nv.nvmlDeviceGetCount()):
        other = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
        other = other.decode() if isinstance(other, bytes) else other
        if other.lower().removeprefix("gpu-") == uuid.lower().removeprefix("gpu-"):
            return i
    raise RuntimeError(f"no NVML device has the UUID {uuid} of CUDA device {torch_index}")


def nvml_snapshot(index: int) -> dict[str, Any]:
    """SM and memory clocks (MHz), temperature (C) and power (W) of NVML device `index` right now; when
    NVML is unavailable, {"nvml": "unavailable: <reason>"}."""
    try:
        nv = _nvml()
        h = nv.nvmlDeviceGetHandleByIndex(index)
        return {
            "nvml": "ok",
            "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            "temp_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
        }
    except Exception as e:  # any NVML failure becomes an explicit field in the row, never a crash mid-run
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}


def nvml_fields(torch_index: int = 0) -> dict[str, Any]:
    """`nvml_snapshot` of torch's CUDA device `torch_index`; never raises (a row's finished timing must not
    become an error row because NVML could not be asked)."""
    try:
        return nvml_snapshot(nvml_index(torch_index))
    except Exception as e:
        return {"nvml": f"unavailable: {type(e).__name__}: {e}"}


def wall_seconds(fn: Callable[[], Any]) -> float:
    """Host wall time of one call (used for torch.compile's first call, reported apart from run time)."""
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0
