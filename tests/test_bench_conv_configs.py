"""The temporal conv launch-configuration sweep on the CPU (Triton interpreter): every candidate is a valid
launch that computes the reference's stage (forward, input and weight gradients), the table swap reaches the launcher and is undone, and a
candidate that computes something else is reported as wrong."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pdengine.bench import conv_configs as CC
from pdengine.engine.cli import main
from pdengine.kernels import temporal_conv as tc

SMALL = dict(levels=((32, 4),), videos=1, frames=4, groups=8, dtype=torch.float32, max_rel_err=1e-4)


def test_every_quick_candidate_matches_the_reference():
    rows = CC.sweep("cpu", quick=True, **SMALL)
    assert {r["kind"] for r in rows} == {"fwd", "dgrad", "wgrad"}
    for kind in ("fwd", "dgrad", "wgrad"):
        mine = [r for r in rows if r["kind"] == kind]
        assert sum(r["default"] for r in mine) == 1 and mine[0]["default"]
        assert len(mine) == 1 + len(CC.QUICK[kind])  # the default at this small shape is none of them
    assert any(r["prenorm"] for r in rows if r["kind"] == "fwd")
    assert [(r["kind"], r["config"]) for r in rows if r.get("cublas")] == [
        ("fwd", "cublas"), ("fwd", "cublas_im2col"), ("dgrad", "cublas"), ("dgrad", "cublas_im2col"),
        ("wgrad", "cublas")]
    assert all(r["split"] >= 1 for r in rows if r["kind"] == "wgrad" and not r.get("cublas"))
    bad = [(r["kind"], r["config"], r["status"]) for r in rows if r["status"] != "ok"]
    assert not bad
    assert all("median_ms" not in r for r in rows)  # no timing without a GPU


@pytest.mark.parametrize("kind,name,config", [("fwd", "_gemm_config", (16, 16, 16, 4, 2, True)),
                                               ("dgrad", "_dgrad_config", (16, 16, 16, 4, 2, False)),
                                               ("wgrad", "_wgrad_config", (16, 16, 16, 3, 4, 2))])
def test_table_swap_reaches_the_launcher_and_is_undone(kind, name, config):
    original = getattr(tc, name)
    with CC._table(kind, config):
        assert tuple(getattr(tc, name)(320, 320, 64, 1024))[:len(config)] == config
    assert getattr(tc, name) is original
    with pytest.raises(RuntimeError), CC._table(kind, config):
        raise RuntimeError("a failing candidate")
    assert getattr(tc, name) is original


def test_a_candidate_that_computes_something_else_is_reported(monkeypatch):
    real = CC._reference

    def off_by_one_percent(*args, **kwargs):
        return {kind: t * 1.01 for kind, t in real(*args, **kwargs).items()}

    monkeypatch.setattr(CC, "_reference", off_by_one_percent)
    rows = CC.sweep("cpu", quick=True, **SMALL)
    assert rows and all(r["status"].startswith("wrong") for r in rows)


def test_best_rows_pick_the_fastest_correct_candidate():
    rows = [{"kind": "fwd", "shape": "s", "config": "a", "default": True, "status": "ok", "median_ms": 2.0},
            {"kind": "fwd", "shape": "s", "config": "b", "default": False, "status": "ok", "median_ms": 1.0},
            {"kind": "fwd", "shape": "s", "config": "c", "default": False, "status": "wrong: x", "median_ms": 0.1}]
    (best,) = CC.best_rows(rows)
    assert best["best"] == "b" and best["speedup_vs_default"] == pytest.approx(2.0)


def test_cli_cpu_quick_writes_rows(tmp_path):
    out = tmp_path / "cc.json"
    res = CliRunner().invoke(main, ["bench", "conv-configs", "--device", "cpu", "--quick", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["status"] == "ok" for r in data["rows"]) and data["best"] == []
    assert "0 not ok" in res.output
