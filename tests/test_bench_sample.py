"""`pdengine bench sample` on the CPU: counted proxies (no timing)."""

import json

import torch
from click.testing import CliRunner
from diffusers import UNet3DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from pdengine.bench.sample import unet_flops
from pdengine.engine.cli import main
from pdengine.model import PRESETS


def test_unet_flops_equal_the_diffusers_model_count():
    # The pixeldance preset's count is checked against diffusers' model with the same config, on meta.
    cfg = {k: v for k, v in PRESETS["pixeldance"].items() if k != "sample_size"}
    with torch.device("meta"):
        ref = UNet3DConditionModel(**cfg)
        x = torch.empty(2, 8, 16, 32, 32)
        ctx = torch.empty(2, 77, 1024)
        t = torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref(x, t, encoder_hidden_states=ctx)
    assert unet_flops(2) == counter.get_total_flops()


def test_bench_sample_cpu_writes_rows(tmp_path):
    out = tmp_path / "sample.json"
    result = CliRunner().invoke(main, ["bench", "sample", "--device", "cpu", "--batch", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"pdengine_torch_backend", "diffusers"}
    for r in rows:
        assert r["status"] == "ok" and r["launches_per_step_eager"] > 100 and r["gb_per_step"] > 0
        assert r["unet_gflops_per_video"] > 0 and r["git_sha"] and r["torch"] == torch.__version__
    assert out.with_suffix(".csv").is_file()
