"""`pdengine info`: environment collection and the text report."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from types import SimpleNamespace

import pynvml
import pytest
import torch

from pdengine.engine import info as info_mod
from pdengine.engine.info import collect_info, format_count, format_info


@pytest.fixture(scope="module")
def report() -> dict:
    return collect_info()


def test_collect_info_on_this_machine(report):
    assert report["python"] == platform.python_version()
    versions = report["versions"]
    assert versions["torch"] == importlib.metadata.version("torch")
    assert versions["pixeldance-engine"] == importlib.metadata.version("pixeldance-engine")
    for name in ("diffusers", "transformers", "safetensors", "numpy", "av"):
        assert versions[name] == importlib.metadata.version(name)
    assert report["cuda"] == {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    assert report["backends"]["sdpa"] is True
    assert report["backends"]["triton"]["importable"] == (importlib.util.find_spec("triton") is not None)
    if importlib.util.find_spec("flash_attn") is None:
        assert report["backends"]["flash_attn"] == "not installed"
    assert report["backends"]["temporal_conv_gemm"] == "forward auto, backward auto (PDENGINE_CONV_GEMM)"
    assert report["backends"]["transformer_gemm"].startswith("auto (PDENGINE_TRANSFORMER_GEMM): per GPU")
    if not torch.cuda.is_available():
        assert report["backends"]["temporal_conv_table"] == "no CUDA device (the CPU runs the built-in tiles)"
    json.dumps(report)  # plain data, e.g. for `pdengine info --json`


@pytest.mark.parametrize("variable, key, message", [
    ("PDENGINE_CONV_GEMM", "temporal_conv_gemm", "conv GEMM must be one of"),
    ("PDENGINE_TRANSFORMER_GEMM", "transformer_gemm", "PDENGINE_TRANSFORMER_GEMM must be one of"),
])
def test_info_says_why_a_gemm_setting_is_unusable(variable, key, message):
    env = {**os.environ, variable: "cudnn"}
    run = subprocess.run([sys.executable, "-c", "from pdengine.engine.info import collect_info as c; "
                          f"print(c()['backends'][{key!r}])"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"unavailable: ValueError: {message}")


def test_nvml_reason_is_reported_without_a_driver(report):
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        assert report["devices"] == [] and report["nvml"] == str(e)
    else:
        pynvml.nvmlShutdown()
        assert report["nvml"] is None and len(report["devices"]) >= 1


def test_nvml_failure_is_not_silent(monkeypatch):
    def fail():
        raise pynvml.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    devices, reason = info_mod._nvml_devices()
    assert devices == [] and reason == str(pynvml.NVMLError_DriverNotLoaded())


def test_nvml_devices_listed(monkeypatch):
    total = 80 * 2**30
    fake = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H200",
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=total),
    }
    for name, fn in fake.items():
        monkeypatch.setattr(pynvml, name, fn)
    devices, reason = info_mod._nvml_devices()
    assert reason is None
    assert devices == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0, "driver": "550.54.15"},
        {"index": 1, "name": "NVIDIA H200", "memory_gib": 80.0, "driver": "550.54.15"},
    ]
    text = format_info({**collect_info(), "devices": devices, "nvml": None})
    assert "[0]:" in text and "NVIDIA H100 80GB HBM3, 80.0 GiB, driver 550.54.15" in text


def test_presets_parameter_counts(report):
    try:
        import pdengine.model as model
    except ImportError as e:
        pytest.skip(f"pdengine.model is not importable yet ({e})")
    if not hasattr(model, "PRESETS"):
        pytest.skip("pdengine.model has no PRESETS yet")
    assert report["presets"] == {name: model.count_parameters(name) for name in model.PRESETS}
    text = format_info(report)
    for name, n in report["presets"].items():
        assert f"{name}:" in text and format_count(n) in text


def test_presets_unavailable_is_reported(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_model(name, *args, **kwargs):
        if name == "pdengine.model":
            raise ImportError("model package broken")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model)
    assert info_mod._presets() == "unavailable: model package broken"


@pytest.mark.parametrize(
    "n, text",
    [
        (1_410_000_000, "1.41 B"),
        (1_411_245_380, "1.41 B"),
        (45_200_000, "45.2 M"),
        (999_960_000, "1.00 B"),  # rounding carries into the next unit
        (123_456_789, "123 M"),
        (8_192, "8.19 K"),
        (999, "999"),
        (0, "0"),
    ],
)
def test_format_count(n, text):
    assert format_count(n) == text


def test_format_info_report(report):
    text = format_info(report)
    lines = text.splitlines()
    assert any(line.split() == ["torch:", torch.__version__] for line in lines)
    assert "python:" in text and report["platform"] in text
    # every `key: value` line starts its value in the same column
    columns = {re.match(r"  \S.*?:\s+", line).end() for line in lines if line.startswith("  ")}
    assert len(columns) == 1
    if not report["devices"]:
        assert f"NVML: {report['nvml']}" in text
    if report["backends"]["flash_attn"] == "not installed":
        assert "flash_attn:" in text and "not installed" in text
