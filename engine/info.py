"""Environment report for `pdengine info`: versions, CUDA/NVML devices, attention backends, presets.

Everything is gathered when `collect_info()` is called, never at import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import platform
import sys
from typing import Any

# Distribution names (as pip knows them), in report order.
_DISTRIBUTIONS = (
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "safetensors",
    "numpy",
    "av",
    "pixeldance-engine",
)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml_devices() -> tuple[list[dict[str, Any]], str | None]:
    """Devices seen by the NVIDIA driver, and the reason when NVML cannot be used (else None)."""
    try:
        import pynvml
    except ImportError as e:
        return [], f"nvidia-ml-py not installed ({e})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver / no libnvidia-ml: the reason is reported, not hidden
        return [], str(e)
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            devices.append(
                {
                    "index": i,
                    # older nvidia-ml-py releases return bytes
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_gib": pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30,
                    "driver": driver.decode() if isinstance(driver, bytes) else driver,
                }
            )
    finally:
        pynvml.nvmlShutdown()
    return devices, None


def _backends(cuda_available: bool) -> dict[str, Any]:
    import torch

    try:
        import triton  # noqa: F401

        triton_state = {"importable": True, "cuda_device": cuda_available, "error": None}
    except ImportError as e:
        triton_state = {"importable": False, "cuda_device": cuda_available, "error": str(e)}

    if importlib.util.find_spec("flash_attn") is None:
        flash = "not installed"
    else:
        # Installed but broken (e.g. built for another torch/CUDA): say why rather than "missing".
        try:
            flash = importlib.import_module("flash_attn").__version__
        except ImportError as e:
            flash = f"import failed: {e}"
    return {
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "triton": triton_state,
        "flash_attn": flash,
        "temporal_conv_gemm": _conv_gemm(),
        "temporal_conv_table": _conv_table(),
        "transformer_gemm": _transformer_gemm(),
    }


def _conv_gemm() -> str:
    """The temporal conv's GEMMs as this environment sets them (PDENGINE_CONV_GEMM), or why that fails."""
    try:
        from pdengine.kernels import temporal_conv
    except Exception as e:  # a bad PDENGINE_CONV_GEMM or a broken triton: said, not hidden
        return f"unavailable: {type(e).__name__}: {e}"
    choice = temporal_conv._CONV_GEMM
    return f"forward {choice['forward']}, backward {choice['backward']} (PDENGINE_CONV_GEMM)"


def _transformer_gemm() -> str:
    """How inference runs the transformers' GEMMs (PDENGINE_TRANSFORMER_GEMM), or why that fails."""
    try:
        from pdengine.kernels import fused_linear
    except Exception as e:  # a bad PDENGINE_TRANSFORMER_GEMM or a broken triton: said, not hidden
        return f"unavailable: {type(e).__name__}: {e}"
    mode = fused_linear.transformer_gemm_mode()
    if mode == "auto":
        return ("auto (PDENGINE_TRANSFORMER_GEMM): per GPU and transformer size, fused where `pdengine tune` "
                "found the fused GEMMs faster (its launch table records it), else cublas")
    return f"{mode} (PDENGINE_TRANSFORMER_GEMM)"


def _conv_table() -> str:
    """The temporal conv's launch table on this machine's first GPU (`pdengine tune`), or why there is none."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (the CPU runs the built-in tiles)"
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    try:
        from pdengine.kernels.temporal_conv_table import find, user_path

        table, problems = find(name)  # where the engine looks, without its log lines
    except Exception as e:  # a bad PDENGINE_CONV_TABLE: said, not hidden
        return f"unavailable: {type(e).__name__}: {e}"
    skipped = "".join(f"; {p}" for p in problems)
    if table is None:
        return f"none for {name}: built-in tiles (`pdengine tune` writes {user_path(name)}){skipped}"
    return table.describe() + skipped


def _presets() -> dict[str, int | str] | str:
    """Parameter count per preset; a string with the reason when the model package is unusable."""
    try:
        from pdengine.model import PRESETS, count_parameters
    except ImportError as e:
        return f"unavailable: {e}"
    counts: dict[str, int | str] = {}
    for name in PRESETS:
        try:
            counts[name] = count_parameters(name)
        except Exception as e:  # one broken preset should not hide the rest; the error is shown
            counts[name] = f"error: {type(e).__name__}: {e}"
    return counts


def collect_info() -> dict[str, Any]:
    """Gather the environment report as a plain (JSON-serialisable) dict."""
    import torch

    cuda_available = torch.cuda.is_available()
    devices, nvml_reason = _nvml_devices()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "versions": {name: _dist_version(name) for name in _DISTRIBUTIONS},
        "cuda": {"available": cuda_available, "torch_cuda": torch.version.cuda},
        "devices": devices,
        "nvml": nvml_reason,
        "backends": _backends(cuda_available),
        "presets": _presets(),
    }


def format_count(n: int) -> str:
    """Human parameter count with three significant digits: 1.41 B, 45.2 M, 8.19 K, 512."""
    rounded = float(f"{n:.3g}")  # round first, so 999_960_000 reads "1.00 B", not "1000 M"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(rounded) >= scale:
            value = rounded / scale
            digits = max(0, 2 - math.floor(math.log10(abs(value))))
            return f"{value:.{digits}f} {unit}"
    return str(n)


def format_info(info: dict[str, Any]) -> str:
    """Render `collect_info()`'s dict as a sectioned report of aligned `key: value` lines."""
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        (
            "pdengine environment",
            [("python", info["python"]), ("executable", info["executable"]), ("platform", info["platform"])],
        ),
        ("versions", [(k, v if v is not None else "not installed") for k, v in info["versions"].items()]),
    ]
    cuda = info["cuda"]
    sections.append(
        (
            "cuda",
            [
                ("available", "yes" if cuda["available"] else "no"),
                ("torch.version.cuda", str(cuda["torch_cuda"])),
            ],
        )
    )
    if info["devices"]:
        rows = [
            (f"[{d['index']}]", f"{d['name']}, {d['memory_gib']:.1f} GiB, driver {d['driver']}")
            for d in info["devices"]
        ]
    else:
        rows = [("none", f"NVML: {info['nvml']}" if info["nvml"] else "no NVIDIA device")]
    sections.append(("devices (NVML)", rows))

    b = info["backends"]
    tri = b["triton"]
    if tri["importable"]:
        tri_text = "importable, " + (
            "CUDA device present" if tri["cuda_device"] else "no CUDA device to run on"
        )
    else:
        tri_text = f"not importable ({tri['error']})"
    sections.append(
        (
            "attention backends",
            [("sdpa", "yes" if b["sdpa"] else "no"), ("triton", tri_text), ("flash_attn", b["flash_attn"]),
             ("temporal conv GEMM", b["temporal_conv_gemm"]), ("temporal conv table", b["temporal_conv_table"]),
             ("transformer GEMMs", b["transformer_gemm"])],
        )
    )
    presets = info["presets"]
    if isinstance(presets, str):
        rows = [("presets", presets)]
    else:
        rows = [(name, format_count(n) if isinstance(n, int) else n) for name, n in presets.items()]
    sections.append(("presets (parameters)", rows))

    width = max(len(k) for _, rows in sections for k, _ in rows) + 1  # +1 for the colon
    out = []
    for title, rows in sections:
        out.append(title)
        out += [f"  {k + ':':<{width}} {v}" for k, v in rows]
    return "\n".join(out)
