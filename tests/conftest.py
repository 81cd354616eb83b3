"""Shared pytest setup: CPU-safe environment, tiny model folders, GPU skipping."""

import os

# Before anything else: Triton decides interpreter vs compiled at decoration time, so this must be set
# before any kernel module is imported. On a GPU machine run with TRITON_INTERPRET=0 to compile kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: every model is built locally by pdengine.engine.tiny.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _cuda_available() -> bool:
    # Imported here, not at module level: collection must not import torch or query a device.
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `@pytest.mark.gpu` when there is no CUDA device, or when the Triton interpreter
    is on (GPU tests exercise compiled kernels: on a GPU machine run `TRITON_INTERPRET=0 pytest -m gpu`,
    and the CPU suite with the default interpreter setting)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if not _cuda_available():
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "needs compiled kernels: run with TRITON_INTERPRET=0"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def gpu():
    """The CUDA device; skips the test cleanly when there is none."""
    if not _cuda_available():
        pytest.skip("needs a CUDA GPU")
    import torch

    return torch.device("cuda")


@pytest.fixture(scope="session", autouse=True)
def _isolated_pdengine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $PDENGINE_CACHE at a temp folder so no test writes the user's ~/.cache/pdengine.

    Set in os.environ (not per test) so subprocesses started by CLI tests see it too.
    """
    cache = tmp_path_factory.mktemp("pdengine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDENGINE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random PixelDance folder (seed 0): UNet in_channels 8 = noisy latent + image instructions."""
    from pdengine.engine.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pixeldance", seed=0, unet_in_channels=8)


@pytest.fixture(scope="session")
def tiny_modelscope_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random ModelScope-layout folder (seed 0, in_channels 4) for diffusers' TextToVideoSDPipeline."""
    from pdengine.engine.tiny import write_tiny_pipeline

    return write_tiny_pipeline(
        tmp_path_factory.mktemp("tiny") / "modelscope", seed=0, unet_in_channels=4, layout="modelscope"
    )
