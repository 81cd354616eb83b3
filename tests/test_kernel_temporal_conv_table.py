"""The temporal conv's per-GPU launch table (kernels/temporal_conv_table.py): parsing and its errors, where a
table is found, that the block follows a table's choice per GEMM kind (cuBLAS or a Triton tile) and still
equals the reference forward and backward, the set_conv_gemm modes against a table, the table a timed sweep
makes, and `pdengine tune` without a GPU. CPU runs go through the Triton interpreter (conftest)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from test_kernel_temporal_conv import H, W, _check_backward, make_inputs

from pdengine.bench import conv_configs as CC
from pdengine.engine.cli import main
from pdengine.kernels import temporal_conv as tc
from pdengine.kernels import temporal_conv_table as ct
from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TILE = [16, 16, 16, 4, 2, False]  # a Triton tile no built-in rule picks at these shapes
WTILE = [16, 16, 16, 0, 4, 2]  # wgrad tile, split by the built-in rule


def entry(kind, best, triton=None, c=6, hw=H * W, dtype="fp32"):
    return {"kind": kind, "dtype": dtype, "c_out": c, "c_in": c, "hw": hw, "best": best, "triton": triton}


def table(*entries, device="Test GPU"):
    return ct.parse({"device": device, "meta": {"triton": "x"}, "entries": list(entries)}, "test")


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch, tmp_path):
    monkeypatch.setenv("PDENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ct.TABLE_ENV, raising=False)
    monkeypatch.setattr(tc, "_TABLES", {})


# -------------------------------------------------------------------------------------------- the file


def test_round_trip_and_lookup(tmp_path):
    t = table(entry("fwd", "cublas", TILE), entry("wgrad", WTILE, WTILE, c=320, hw=1024, dtype="bf16"))
    path = ct.write(t, tmp_path / "t.json", {("fwd", "fp32", 6, 6, H * W): {"best_ms": 0.5}})
    back = ct.read(path)
    assert back.device == "Test GPU" and back.entries == t.entries and back.source == str(path)
    assert back.lookup("fwd", "fp32", 6, 6, H * W) == ct.Entry("cublas", tuple(TILE))
    assert back.lookup("wgrad", "bf16", 320, 320, 1024).best == tuple(WTILE)
    assert back.lookup("fwd", "bf16", 6, 6, H * W) is None  # exact keys: dtype, channels, pixels
    assert json.loads(path.read_text())["entries"][0]["best_ms"] == 0.5
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed into place
    assert ct.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_a_tile_as_best_is_also_the_triton_tile_the_stage_runs():
    """An entry whose fastest candidate is a Triton tile and that names no separate `triton` tile (a
    hand-written table) runs that tile, not the built-in one."""
    t = table(entry("fwd", TILE, None))
    e = t.lookup("fwd", "fp32", 6, 6, H * W)
    assert e.best == e.triton == tuple(TILE)
    builtin = tc._GemmConfig(16, 16, 16, 1, 1, False)
    assert tc._gemm_launch("forward", e, builtin, 1, 3, 6, H * W) == tc._GemmConfig(*TILE)


def test_transformer_gemm_record_round_trip(tmp_path):
    """A table may record how the GPU runs the transformers' GEMMs; `describe` says so; a bad choice is an
    error naming the file."""
    t = table(entry("fwd", "cublas"))
    t.transformer_gemm = {"choice": "fused", "cublas_ms": 2.0, "fused_ms": 1.5}
    back = ct.read(ct.write(t, tmp_path / "t.json"))
    assert back.transformer_gemm == t.transformer_gemm
    assert "transformer GEMMs: fused" in back.describe()
    assert ct.read(ct.write(table(entry("fwd", "cublas")), tmp_path / "u.json")).transformer_gemm is None
    with pytest.raises(ValueError, match="test: transformer_gemm must be"):
        ct.parse({"device": "g", "entries": [], "transformer_gemm": {"choice": "cudnn"}}, "test")
    # Per transformer size: the levels that run fused are named; levels must say cublas or fused.
    t.transformer_gemm = {"choice": "per_level", "levels": {ct.gemm_level("spatial", 320, 320): "fused",
                                                            ct.gemm_level("temporal", 1280, 1280): "cublas"}}
    back = ct.read(ct.write(t, tmp_path / "p.json"))
    assert back.transformer_gemm == t.transformer_gemm
    assert "transformer GEMMs: per_level (fused at spatial:320:320)" in back.describe()
    for levels in (None, {"spatial:320:320": "cudnn"}):
        with pytest.raises(ValueError, match="test: a per_level transformer_gemm needs"):
            ct.parse({"device": "g", "entries": [], "transformer_gemm": {"choice": "per_level", "levels": levels}},
                     "test")


@pytest.mark.parametrize("bad,match", [
    ({"device": "g"}, "list of 'entries'"),
    ({"device": "g", "entries": [entry("conv", "cublas")]}, "kind must be one of"),
    ({"device": "g", "entries": [entry("fwd", "cublas", dtype="int8")]}, "dtype must be one of"),
    ({"device": "g", "entries": [entry("fwd", [48, 16, 16, 4, 2, False])]}, "block_m must be one of"),
    ({"device": "g", "entries": [entry("fwd", [16, 16, 16, 3, 2, False])]}, "num_warps"),
    ({"device": "g", "entries": [entry("fwd", [16, 16, 16, 4, 2])]}, "list of 6 values"),
    ({"device": "g", "entries": [entry("wgrad", [16, 16, 16, 99, 4, 2])]}, "split must be"),
    ({"device": "g", "entries": [{**entry("fwd", "cublas"), "hw": 0}]}, "hw must be a positive integer"),
    ({"device": "g", "entries": [entry("fwd", "cublas"), entry("fwd", TILE)]}, "a second entry"),
    ({"device": "g", "entries": [entry("wgrad", "cublas_im2col")]}, "not of the weight gradient"),
])
def test_malformed_tables_are_errors_naming_the_entry(bad, match):
    with pytest.raises(ValueError, match=match):
        ct.parse(bad, "t.json")


def test_where_a_table_is_found(tmp_path, monkeypatch):
    name = "Test GPU"
    assert ct.find(name) == (None, [])
    packaged = tmp_path / "packaged"
    monkeypatch.setattr(ct, "PACKAGED_DIR", packaged)
    ct.write(table(entry("fwd", "cublas"), device=name), packaged / f"{ct.slug(name)}.json")
    assert ct.find(name)[0].source == str(packaged / "test-gpu.json")
    # The user's cache comes first; a malformed file there is skipped with the reason.
    ct.user_path(name).parent.mkdir(parents=True)
    ct.user_path(name).write_text("{not json")
    found, problems = ct.find(name)
    assert found.source.startswith(str(packaged)) and "unreadable conv table" in problems[0]
    ct.write(table(entry("fwd", TILE, TILE), device=name), ct.user_path(name))
    assert ct.find(name)[0].source == str(ct.user_path(name))
    # $PDENGINE_CONV_TABLE beats both, for any device; a bad one is an error.
    env = ct.write(table(entry("dgrad", "cublas"), device="other"), tmp_path / "env.json")
    monkeypatch.setenv(ct.TABLE_ENV, str(env))
    assert ct.find(name)[0].source == str(env)
    monkeypatch.setenv(ct.TABLE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="missing.json"):
        ct.find(name)


def test_a_bad_table_in_the_environment_fails_the_import(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": "g", "entries": [entry("fwd", [48, 16, 16, 4, 2, False])]}))
    env = {**os.environ, ct.TABLE_ENV: str(bad)}
    run = subprocess.run([sys.executable, "-c", "import pdengine.kernels.temporal_conv"], env=env,
                         capture_output=True, text=True)
    assert run.returncode != 0 and f"{bad}: entry 0: block_m must be one of" in run.stderr


def test_a_cuda_device_finds_its_table_once_and_says_which(monkeypatch, caplog):
    """table_for on a CUDA device: looks the GPU's table up on first use (by name: faked here) and keeps it;
    a GPU without one gets one warning line."""
    names = {0: "Test GPU", 1: "Other GPU"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: names[d.index])
    ct.write(table(entry("fwd", "cublas")), ct.user_path("Test GPU"))
    with caplog.at_level(logging.INFO, logger="pdengine"):
        first = tc.table_for(torch.device("cuda", 0))
        assert tc.table_for(torch.device("cuda", 0)) is first and first.device == "Test GPU"
        assert tc.table_for(torch.device("cuda", 1)) is None
        assert tc.table_for(torch.device("cuda", 1)) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "launch table 1 entries tuned on Test GPU" in lines[0]
    assert "no launch table tuned for Other GPU" in lines[1] and caplog.records[1].levelno == logging.WARNING
    assert tc.table_for(torch.device("cpu")) is None


# ----------------------------------------------------------------------------------- the block follows it


def _spy(monkeypatch, name, calls):
    real = getattr(tc, name)

    def spy(*args, **kwargs):
        calls.append((name, args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(tc, name, spy)


def test_block_follows_the_table_per_gemm_kind_and_matches_the_reference(monkeypatch):
    """fwd on cuBLAS, dgrad on a table tile, wgrad on cuBLAS at this shape: each stage runs what the table
    says, and the block's output and every gradient still equal the reference (dropout included)."""
    calls = []
    for name in ("_stage_forward_cublas", "_stage_backward_cublas", "_stage_dgrad", "_stage_wgrad"):
        _spy(monkeypatch, name, calls)
    t = table(entry("fwd", "cublas", TILE), entry("dgrad", TILE, TILE), entry("wgrad", "cublas", WTILE))
    with tc.launch_table(t):
        _check_backward(2, 3, 6, 2, dropout_p=0.25, seed=42)
    names = [c[0] for c in calls]
    assert names.count("_stage_forward_cublas") == 4 and names.count("_stage_wgrad") == 0
    bwd = [c for c in calls if c[0] == "_stage_backward_cublas"]
    assert len(bwd) == 4 and all(c[1][-2:] == (True, False) for c in bwd)  # weight gradient only
    dgrads = [c for c in calls if c[0] == "_stage_dgrad"]
    assert len(dgrads) == 4 and all(c[2]["cfg"] == tc._GemmConfig(*TILE) for c in dgrads)


def test_block_follows_im2col_entries(monkeypatch):
    """im2col for the forward and the transposed conv, the weight gradient on a Triton tile."""
    calls = []
    for name in ("_stage_forward_cublas", "_stage_backward_cublas", "_stage_wgrad"):
        _spy(monkeypatch, name, calls)
    t = table(entry("fwd", "cublas_im2col", TILE), entry("dgrad", "cublas_im2col", TILE), entry("wgrad", WTILE, WTILE))
    with tc.launch_table(t):
        _check_backward(2, 3, 6, 2, dropout_p=0.25, seed=42)
    fwd = [c for c in calls if c[0] == "_stage_forward_cublas"]
    bwd = [c for c in calls if c[0] == "_stage_backward_cublas"]
    assert len(fwd) == 4 and all(c[2]["im2col"] for c in fwd)
    assert len(bwd) == 4 and all(c[2]["im2col"] and c[1][-2:] == (False, True) for c in bwd)
    assert sum(c[0] == "_stage_wgrad" for c in calls) == 4


def test_table_wgrad_tile_with_the_rule_split_and_triton_forward_tile(monkeypatch):
    calls = []
    _spy(monkeypatch, "_stage_wgrad", calls)
    t = table(entry("fwd", TILE, TILE), entry("wgrad", WTILE, WTILE))
    with tc.launch_table(t):
        x = make_inputs(2, 3, 6)[0]
        assert tc._forward_launch(x, 6, 6, H * W, 3 * H * W) == tc._GemmConfig(*TILE)
        _check_backward(2, 3, 6, 2)
    split = tc._wgrad_split(6, 6, 2, 3 * H * W, 16, 16, 16)
    assert [c[2]["cfg"] for c in calls] == [tc._WgradConfig(16, 16, 16, split, 4, 2)] * 4


def test_modes_against_a_table():
    """auto follows the table; "triton" takes its fastest Triton tile even where cuBLAS won; "cublas" runs
    cuBLAS whatever it says; a dtype or shape it lacks runs the built-in choice."""
    x = make_inputs(1, 2, 6)[0]
    args = (6, 6, H * W, 2 * H * W)
    builtin = tc._gemm_config(*args)
    with tc.launch_table(table(entry("fwd", "cublas", TILE))):
        assert tc._forward_launch(x, *args).cublas
        with tc.conv_gemm("triton", "forward"):
            assert tc._forward_launch(x, *args) == tc._GemmConfig(*TILE)
        assert tc._forward_launch(x.bfloat16(), *args) == builtin
        assert tc._forward_launch(x, 6, 6, 64, 128) == tc._gemm_config(6, 6, 64, 128)
    with tc.launch_table(table(entry("fwd", TILE, TILE))), tc.conv_gemm("cublas", "forward"):
        assert tc._forward_launch(x, *args).cublas
    with tc.launch_table(None):
        assert tc._forward_launch(x, *args) == builtin


def test_block_output_with_a_table_equals_without(monkeypatch):
    b, f, c, g = 2, 3, 6, 2
    x, norms, convs = make_inputs(b, f, c, seed=3)
    with tc.launch_table(table(entry("fwd", TILE, TILE))):
        out = tc.temporal_conv_block(x, f, norms, convs, groups=g)
    from kernel_utils import assert_close

    assert_close(out, temporal_conv_block_ref(x, f, norms, convs, groups=g), torch.float32, "table tile")


# --------------------------------------------------------------------------------------- making a table


def _row(kind, config, ms, status="ok", default=False, c=320, hw=1024):
    return {"kind": kind, "dtype": "bfloat16", "shape": f"C{c} {hw}", "channels": c, "hw": hw,
            "config": str(config), "table_entry": config, "status": status, "median_ms": ms, "default": default}


def test_table_from_timed_rows_takes_the_fastest_correct_candidates():
    rows = [_row("fwd", [128, 64, 32, 8, 3, False], 2.0, default=True),
            _row("fwd", [64, 64, 32, 4, 3, False], 1.5),
            _row("fwd", "cublas", 1.0),
            _row("fwd", [256, 64, 32, 8, 3, False], 0.1, status="wrong: relative error 0.5 > 0.02"),
            _row("dgrad", "cublas", 3.0),
            _row("dgrad", [128, 64, 32, 8, 3, False], 2.5, default=True),
            _row("wgrad", "cublas", 1.0, c=1280, hw=64),
            {**_row("wgrad", [64, 64, 32, 0, 8, 2], None, c=1280, hw=64), "status": "error: OutOfResources"}]
    t, extra = CC.table_from_rows(rows, "Test GPU", {"triton": "3.6.0"})
    fwd = t.lookup("fwd", "bf16", 320, 320, 1024)
    assert fwd.best == "cublas" and fwd.triton == (64, 64, 32, 4, 3, False)
    assert t.lookup("dgrad", "bf16", 320, 320, 1024) == ct.Entry((128, 64, 32, 8, 3, False),
                                                                 (128, 64, 32, 8, 3, False))
    assert t.lookup("wgrad", "bf16", 1280, 1280, 64) == ct.Entry("cublas", None)
    assert extra[("fwd", "bf16", 320, 320, 1024)]["builtin_ms"] == 2.0
    assert ct.parse(ct.to_json(t, extra), "again").entries == t.entries  # what tune writes reads back


def test_cpu_sweep_rows_carry_table_entries():
    """The interpreter sweep's rows name what a table would store: the candidate before normalisation (a wgrad
    split of 0 stays 0), the channels and pixels; with times attached they make a valid table."""
    rows = CC.sweep("cpu", quick=True, kinds=("wgrad",), levels=((32, 4),), videos=1, frames=4, groups=8,
                    dtype=torch.float32, max_rel_err=1e-4)
    assert all(r["status"] == "ok" and r["channels"] == 32 and r["hw"] == 16 for r in rows)
    entries = [r["table_entry"] for r in rows]
    assert entries[0][3] == 0 and "cublas" in entries  # the built-in default: the rule's split
    assert [64, 64, 32, 1, 8, 2] in entries  # an explicit split is kept
    timed = [{**r, "median_ms": float(i + 1)} for i, r in enumerate(rows)]
    t, _ = CC.table_from_rows(timed, "cpu-test")
    assert t.lookup("wgrad", "fp32", 32, 32, 16).best == tuple(entries[0])


def test_tune_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(main, ["tune", "--quick"])
    assert res.exit_code != 0 and "torch sees no CUDA device" in res.output


def test_tune_writes_the_table_level_by_level(monkeypatch, tmp_path):
    """`tune` on a (faked) GPU: the table goes to the user's cache, where the engine looks, after every level,
    so a run cut short keeps the levels it finished; the CLI lists the choices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(CC, "env_info", lambda device: {"torch": "t", "triton": "3.6.0", "git_sha": "abc",
                                                        "timestamp": "now", "gpu": "Fake GPU"})
    def fake_sweep(device, levels, quick, kinds, videos):
        ((c, side),) = levels
        assert videos == CC.TUNE_VIDEOS[kinds[0]]  # the forward at the sampler's batch, the backward at training's
        if (c, side) == CC.LEVELS[2]:
            raise KeyboardInterrupt  # the run is cut during the third level
        return [_row(k, "cublas", 1.0, c=c, hw=side * side) for k in kinds] + \
            [_row("fwd", TILE, 2.0, default=True, c=c, hw=side * side) for k in kinds if k == "fwd"]

    monkeypatch.setattr(CC, "sweep", fake_sweep)
    record = {"choice": "fused", "cublas_ms": 3.0, "fused_ms": 2.0, "rel_diff": 1e-3, "videos": 1}
    monkeypatch.setattr(CC, "measure_transformer_gemm", lambda device: record)
    with pytest.raises(KeyboardInterrupt):
        CC.tune(quick=True)
    saved = ct.read(ct.user_path("Fake GPU"))
    assert saved.device == "Fake GPU" and saved.meta["triton"] == "3.6.0"
    assert saved.transformer_gemm == record  # measured first, kept with every level's write
    assert {k[2:] for k in saved.entries} == {(320, 320, 1024), (640, 640, 256)}
    monkeypatch.setattr(CC, "sweep", lambda device, levels, quick, kinds, videos: [
        _row(k, "cublas", 1.0, c=levels[0][0], hw=levels[0][1] ** 2) for k in kinds])
    out = tmp_path / "t.json"
    res = CliRunner().invoke(main, ["tune", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(ct.read(out).entries) == 3 * len(CC.LEVELS)
    assert "fwd   C320 1024: cublas 1.0000 ms" in res.output and f"written to {out}" in res.output
    assert "transformer GEMMs: fused (one UNet call: cuBLAS 3.00 ms, fused 2.00 ms" in res.output

    def broken(device):
        raise RuntimeError("no memory")

    monkeypatch.setattr(CC, "measure_transformer_gemm", broken)
    res = CliRunner().invoke(main, ["tune", "--quick", "--out", str(out)])
    assert res.exit_code == 0 and "transformer GEMMs: not measured (RuntimeError: no memory): cublas" in res.output
    assert ct.read(out).transformer_gemm["choice"] == "cublas"

    # Cut during the first level of the sweep: the transformer record is kept where the caller asked (the
    # table given by --out, and the rows file); the user's own table is left as it was.
    def cut(device, levels, quick, kinds, videos):
        raise KeyboardInterrupt

    monkeypatch.setattr(CC, "measure_transformer_gemm", lambda device: record)
    monkeypatch.setattr(CC, "sweep", cut)
    before = ct.read(ct.user_path("Fake GPU"))
    out, rows = tmp_path / "cut.json", tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        CC.tune(True, out, rows)
    assert ct.read(out).transformer_gemm == record and not ct.read(out).entries
    assert json.loads(rows.read_text())["transformer_gemm"] == record
    with pytest.raises(KeyboardInterrupt):
        CC.tune(True)
    assert ct.read(ct.user_path("Fake GPU")).entries == before.entries
