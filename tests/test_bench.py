"""Kernel benchmark harness on the CPU: the byte counter, CPU mode's files and rows, error rows, the
timed-mode bookkeeping (with a stand-in timer) and the SVG chart."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pdengine.bench import kernels as K
from pdengine.bench.common import count_bytes, tensor_bytes
from pdengine.bench.plot import write_plot
from tests.kernel_utils import assert_close

FAMILIES = ("temporal_conv", "temporal_attention", "concat_cond", "latent_update", "geglu", "fused_linear",
            "group_norm_silu", "add_layer_norm", "adamw_sr")
ROW_KEYS = {"kernel", "provider", "device", "shape", "dtype", "direction", "status", "gpu", "torch", "triton",
            "diffusers", "git_sha", "timestamp"}


# ------------------------------------------------------------------------------------------- byte counter


def test_count_bytes_binary_op_reads_two_writes_one():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    nbytes, ops = count_bytes(torch.add, a, b)
    assert (nbytes, ops) == (3 * a.nbytes, 1)


def test_count_bytes_broadcast_operand_counts_its_own_size():
    a, bias = torch.randn(4, 8), torch.randn(8)
    assert count_bytes(lambda: a + bias) == (2 * a.nbytes + bias.nbytes, 1)
    # An explicit expand is a view (free); the add then reads the 8 distinct elements once.
    assert count_bytes(lambda: a + bias.expand(4, 8)) == (2 * a.nbytes + bias.nbytes, 1)


@pytest.mark.parametrize("view", [lambda t: t.view(8, 4), lambda t: t.t(), lambda t: t[1:], lambda t: t.permute(1, 0),
                                  lambda t: t.unsqueeze(0).expand(3, 4, 8), lambda t: t.detach()])
def test_count_bytes_views_are_free(view):
    assert count_bytes(view, torch.randn(4, 8)) == (0, 0)


def test_count_bytes_modeled_operator_counts_its_model():
    """An operator given a model counts the model's bytes (once, as one op) instead of its inputs and outputs;
    others keep the default rule."""
    from pdengine.kernels import as_operators
    from pdengine.kernels.temporal_conv import modeled_bytes
    from pdengine.model.layers import TemporalConvLayer

    layer = TemporalConvLayer(64, 8, backend="triton").to("meta").eval()
    x = torch.empty(2 * 4, 64, 8, 8, device="meta")
    model = {"pdengine::temporal_conv_block": lambda args, kwargs: 12345}
    with as_operators(), torch.no_grad():
        assert count_bytes(layer, x, 4, modeled=model) == (12345, 1)
        plain, ops = count_bytes(layer, x, 4)
    assert ops == 1 and plain == 2 * x.nbytes + sum(p.nbytes for p in layer.parameters())
    assert modeled_bytes(2, 4, 64, 8, 8, torch.float32) > plain  # four stages' passes, not one read and write


def test_count_bytes_copies_count_read_and_write():
    a = torch.randn(4, 8)
    assert count_bytes(lambda: a.t().contiguous()) == (2 * a.nbytes, 1)
    dst = torch.empty(4, 8)
    assert count_bytes(dst.copy_, a) == (2 * a.nbytes, 1)  # copy_ does not read what it overwrites
    assert count_bytes(torch.zeros, 4, 8) == (a.nbytes, 1)  # empty (free) + zero_ (write only)


def test_count_bytes_inplace_and_out_variants():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert count_bytes(a.add_, b) == (3 * a.nbytes, 1)  # reads a and b, writes a
    out = torch.empty(4, 8)
    assert count_bytes(lambda: torch.mul(a, b, out=out)) == (3 * a.nbytes, 1)  # out is written, not read


def test_count_bytes_backward_and_meta():
    a = torch.randn(16, 32, device="meta", requires_grad=True)
    w = torch.randn(32, 8, device="meta", requires_grad=True)
    y = a @ w
    g = torch.empty_like(y)
    nbytes, ops = count_bytes(torch.autograd.grad, y, [a, w], g)
    # grad_a = g @ w^T (reads g, w; writes a-sized), grad_w = a^T @ g (reads a, g; writes w-sized).
    assert (nbytes, ops) == (2 * (g.nbytes + w.nbytes + a.nbytes), 2)


def test_count_bytes_meta_sdpa_is_one_fused_op():
    q = torch.empty(6, 2, 16, 64, device="meta", dtype=torch.bfloat16)
    nbytes, ops = count_bytes(F.scaled_dot_product_attention, q, q, q)
    assert ops == 1
    assert 4 * q.nbytes <= nbytes <= 4 * q.nbytes + 64  # q, k, v read, o written (+ RNG state scalars)


def test_tensor_bytes_of_broadcast():
    t = torch.randn(5, 1).expand(5, 7)
    assert tensor_bytes(t) == 5 * t.element_size()


# ------------------------------------------------------------------------------------------- CPU mode


class _FakeCompile:
    """Stand-in for compile_check.compile_spec: the real compiler takes minutes for every spec of the
    four families (the kernel tests compile them for real)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, spec, arch, use_cache=True):
        from pdengine.kernels.compile_check import CompileReport

        self.calls.append((spec.name, arch))
        return CompileReport(name=spec.name, arch=arch, registers=40, stack_bytes=0, local_bytes=0, shared_bytes=0,
                             mma_instructions=2 if spec.expects_mma else 0, expects_mma=spec.expects_mma)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels.json"
    fake = _FakeCompile()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pdengine.kernels.compile_check.compile_spec", fake)
        rows = K.run_kernel_bench("cpu", out, None, None, quick=True)
    return rows, out, fake


def test_cpu_mode_writes_json_csv_svg(cpu_run):
    rows, out, _ = cpu_run
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows, default=str))
    with out.with_suffix(".csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    ET.parse(out.with_suffix(".svg"))  # well-formed XML


def test_cpu_mode_rows_cover_all_kernels_with_required_keys(cpu_run):
    rows, _, _ = cpu_run
    assert {r["kernel"] for r in rows} == set(FAMILIES)
    for r in rows:
        assert ROW_KEYS <= r.keys(), sorted(ROW_KEYS - r.keys())
        assert r["device"] == "cpu" and r["gpu"] == "cpu"
        assert "median_ms" not in r  # CPU mode never times
    byte_rows = [r for r in rows if r["direction"] != "compile"]
    assert all(r["status"] == "ok" for r in byte_rows), [r["status"] for r in byte_rows if r["status"] != "ok"]
    for kernel in FAMILIES:
        fused = [r for r in byte_rows if r["kernel"] == kernel and r["bytes_fused"] is not None]
        assert {r["provider"] for r in fused} >= {"torch_ref"}
        for r in fused:
            assert r["bytes_ratio"] == pytest.approx(r["bytes_reference"] / r["bytes_fused"])
            assert r["aten_ops"] > 0
            if r["direction"] == "fwd":
                assert r["bytes_fused"] < r["bytes_reference"], (kernel, r["provider"], r["shape"])
    directions = {r["direction"] for r in byte_rows if r["kernel"] == "temporal_conv"}
    assert directions == {"fwd", "bwd", "fwd+bwd"}


def test_cpu_mode_reference_bytes_match_a_direct_count(cpu_run):
    """The concat_cond torch_ref row equals counting the reference call directly on meta tensors."""
    from pdengine.kernels.concat_cond_ref import concat_condition_ref

    rows, _, _ = cpu_run
    (row,) = [r for r in rows if r["kernel"] == "concat_cond" and r["provider"] == "torch_ref"]
    c, f, s = K.LATENT_CHANNELS, K.FRAMES, K.LATENT_SIZE
    z = torch.empty(K.VIDEOS, c, f, s, s, device="meta", dtype=torch.bfloat16)
    first = torch.empty(K.VIDEOS, c, s, s, device="meta", dtype=torch.bfloat16)
    keep = torch.ones(K.VIDEOS, device="meta", dtype=torch.bool)
    assert (row["bytes_reference"], row["aten_ops"]) == count_bytes(concat_condition_ref, z, first, first, keep,
                                                                   repeat=2)


def test_cpu_mode_compile_rows(cpu_run):
    import importlib

    rows, _, fake = cpu_run
    compile_rows = [r for r in rows if r["direction"] == "compile"]
    for kernel in FAMILIES:
        specs = importlib.import_module(f"pdengine.kernels.{kernel}").compile_specs()
        mine = [r for r in compile_rows if r["kernel"] == kernel]
        assert sorted((r["shape"], r["arch"]) for r in mine) == sorted((s.name, a) for s in specs for a in (80, 90))
        assert all(r["provider"] == "triton" and r["status"] == "ok" for r in mine)
        assert all({"registers", "spills", "shared_bytes", "mma_instructions"} <= r.keys() for r in mine)
    assert len(fake.calls) == len(compile_rows)


def test_compile_rows_real_compiler(monkeypatch):
    """One spec through the real compiler (sm80 and sm90): the row carries what cuobjdump reported."""
    from pdengine.kernels import latent_update
    from pdengine.kernels.compile_check import compile_spec

    spec = latent_update.compile_specs()[0]
    monkeypatch.setattr(latent_update, "compile_specs", lambda: [spec])
    rows = K.compile_rows(["latent_update"], {})
    assert [r["arch"] for r in rows] == [80, 90]
    for r in rows:
        rep = compile_spec(spec, r["arch"])  # cached by now: the same report
        assert r["status"] == "ok"
        assert (r["registers"], r["spills"], r["shared_bytes"]) == (rep.registers, rep.spills, rep.shared_bytes)
        assert r["registers"] > 0


def test_error_in_one_provider_is_an_explicit_row(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("provider exploded")

    monkeypatch.setattr("pdengine.kernels.temporal_conv_ref.temporal_conv_block_ref", boom)
    cases = K.build_cases(["temporal_conv"], quick=True, levels=[(8, 64)])
    rows = K.run_cpu(cases, [], with_compile=False)
    bad = [r for r in rows if r["provider"] == "torch_ref"]
    assert len(bad) == 3 and all(r["status"] == "error: RuntimeError: provider exploded" for r in bad)
    good = [r for r in rows if r["provider"] == "diffusers"]
    assert len(good) == 3 and all(r["status"] == "ok" and r["bytes_reference"] > 0 for r in good)
    K.write_rows(rows, tmp_path / "r.json", None)
    assert "provider exploded" in (tmp_path / "r.svg").read_text()


def test_outputs_are_fresh_files(tmp_path):
    rows = [{"kernel": "k", "provider": "torch_ref", "shape": "s", "direction": "fwd", "status": "ok",
             "bytes_ratio": 2.0}]
    for _ in range(2):
        K.write_rows(rows, None, tmp_path / "x.csv")
    assert len((tmp_path / "x.csv").read_text().strip().splitlines()) == 2  # header + one row: not appended
    assert (tmp_path / "x.svg").is_file()


def test_rows_are_stamped_and_saved_as_they_finish(tmp_path, capsys):
    """Inside `collecting_rows` each emitted row carries the stamp in its ROW line and reaches the sink, which
    rewrites the files: a run cut after the first row leaves that row, labelled, in JSON and CSV."""
    from pdengine.bench.common import collecting_rows, emit, save_rows

    done: list[dict] = []

    def keep(row):
        done.append(row)
        save_rows(done, tmp_path / "r.json")

    with collecting_rows({"gpu": "g", "git_sha": "abc"}, keep):
        emit({"provider": "a", "seconds": 1.0})
        assert json.loads((tmp_path / "r.json").read_text()) == [{"provider": "a", "seconds": 1.0, "gpu": "g",
                                                                   "git_sha": "abc"}]
        emit({"provider": "b", "status": "error: x"})
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("ROW ") and json.loads(line[4:])["git_sha"] == "abc"
    with (tmp_path / "r.csv").open() as fh:
        assert [r["provider"] for r in csv.DictReader(fh)] == ["a", "b"]
    assert not list(tmp_path.glob("*.tmp"))
    assert emit({"provider": "c"}) == {"provider": "c"}  # outside: printed as it is, no sink


def test_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        K.run_kernel_bench("tpu", None, None, None, True)
    with pytest.raises(ValueError, match="unknown kernel families"):
        K.run_kernel_bench("cpu", None, None, ["nope"], True)


def test_env_stamp_and_nvml_snapshot():
    import subprocess

    from pdengine.bench.common import env_info, nvml_snapshot

    env = env_info("cpu")
    repo = Path(K.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert env["git_sha"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__
    snap = nvml_snapshot(0)  # never raises: clocks where NVML works, the reason where it does not
    if snap["nvml"] == "ok":
        assert {"sm_clock_mhz", "mem_clock_mhz", "temp_c", "power_w"} <= snap.keys()
    else:
        assert snap["nvml"].startswith("unavailable: ") and len(snap) == 1


# ------------------------------------------------------------------------------------------- timed mode


def test_timed_bookkeeping_with_stand_in_timer():
    """The GPU path's row building, FLOP counting, speedups and error rows, run on CPU tensors with a timer
    that calls each timed function once (torch_ref 2 ms, diffusers 4 ms, anything else 1 ms)."""
    calls: list[str] = []

    def timer(fn, setup=None):
        if setup is not None:
            setup()
        fn()
        return {"torch_ref": 2.0, "diffusers": 4.0}.get(calls[-1], 1.0)

    def tag(provider, build):
        def wrapped(state):
            wl = build(state)
            inner = wl.fwd

            def fwd():
                calls.append(provider)
                return inner()
            wl.fwd = fwd
            return wl
        return wrapped

    def broken(state):
        raise RuntimeError("no kernel here")

    (case,) = K.build_cases(["temporal_conv"], quick=True, levels=[(4, 64)], frames=3)
    case.providers = {"torch_ref": tag("torch_ref", case.providers["torch_ref"]),
                      "diffusers": tag("diffusers", case.providers["diffusers"]), "triton": broken}
    case.modeled = lambda dtype: {"fwd": 1000, "bwd": 3000}
    rows = K.run_gpu([case], device="cpu", dtype=torch.float32, timer=timer,
                     peaks={"peak_gbps": 100.0, "peak_tflops": 10.0}, snapshot=lambda: {"nvml": "unavailable: test"})
    by = {(r["provider"], r["direction"]): r for r in rows}
    assert len(rows) == 9
    for d in ("fwd", "bwd", "fwd+bwd"):
        assert by[("triton", d)]["status"] == "error: RuntimeError: no kernel here"
        ref, dif = by[("torch_ref", d)], by[("diffusers", d)]
        assert ref["status"] == dif["status"] == "ok"
        assert ref["speedup_vs_torch_ref"] == 1.0 and ref["speedup_vs_diffusers"] == 2.0
        assert dif["speedup_vs_torch_ref"] == 0.5 and dif["speedup_vs_diffusers"] == 1.0
        assert ref["nvml"] == "unavailable: test"
        assert ref["tflops"] == pytest.approx(ref["flops"] / 2e-3 / 1e12)
        assert ref["pct_peak_bw"] == pytest.approx(100 * ref["gbps"] / 100.0)
    assert by[("torch_ref", "fwd")]["bytes_modeled"] == 1000
    assert by[("torch_ref", "fwd+bwd")]["bytes_modeled"] == 4000
    assert by[("diffusers", "fwd")]["max_abs_diff_vs_torch_ref"] < 1e-4  # same weights, same layer
    # FLOPs of the 4 temporal convs: 2 * C_out * C_in * 3 taps per output element.
    bf, c, hw = 2 * 3, 64, 16
    assert by[("torch_ref", "fwd")]["flops"] == 4 * 2 * c * c * 3 * bf * hw


def test_latent_update_has_a_bandwidth_sized_case():
    """Beside the preset batch (launch-bound), one case whose modeled bytes (>= 100 MB) make the kernel's time
    a reading of HBM bandwidth (the issue's 85% target)."""
    cases = K.build_cases(["latent_update"], quick=True)
    assert [c.shape.split()[0] for c in cases] == [f"B{K.VIDEOS}", f"B{K.BANDWIDTH_VIDEOS}"]
    small, big = (c.modeled(torch.bfloat16) for c in cases)
    assert big >= 100e6 and big == small * K.BANDWIDTH_VIDEOS // K.VIDEOS * (K.BANDWIDTH_LATENT // K.LATENT_SIZE) ** 2


def test_timed_latent_update_providers_agree():
    """Timed mode runs the in-place kernel (Triton interpreter here), the reference and the diffusers-style
    CFG + DDIMScheduler.step on the same tensors; x is restored before each call, so all three agree."""
    case = K.build_cases(["latent_update"], quick=True, frames=2)[0]  # the preset batch
    del case.providers["torch_compile"]
    rows = K.run_gpu([case], device="cpu", dtype=torch.float32, timer=lambda fn, setup=None: (setup(), fn(), 1.0)[2],
                     peaks={"peak_gbps": 1.0, "peak_tflops": 1.0}, snapshot=dict)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"triton", "torch_ref", "diffusers"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert by["triton"]["max_abs_diff_vs_torch_ref"] < 1e-5
    assert by["diffusers"]["max_abs_diff_vs_torch_ref"] < 1e-4
    assert by["triton"]["bytes_modeled"] > 0 and "gbps" in by["triton"]


def test_profiler_fields_join_timed_rows_and_a_failing_profile_keeps_the_timing():
    case = K.build_cases(["latent_update"], quick=True, frames=2)[0]  # the preset batch
    del case.providers["torch_compile"]
    calls = []

    def profiler(fn, setup=None):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("profiler unavailable")
        return {"host_issue_ms": 0.25, "top_kernels": [{"name": "k", "calls": 1.0, "ms": 0.1}]}

    rows = K.run_gpu([case], device="cpu", dtype=torch.float32, timer=lambda fn, setup=None: (setup(), fn(), 1.0)[2],
                     peaks={"peak_gbps": 1.0, "peak_tflops": 1.0}, snapshot=dict, profiler=profiler)
    assert len(calls) == len(rows) == 3 and all(r["status"] == "ok" and r["median_ms"] == 1.0 for r in rows)
    assert [("host_issue_ms" in r, "profile_status" in r) for r in rows] == [(True, False), (False, True),
                                                                            (True, False)]
    assert rows[1]["profile_status"] == "error: RuntimeError: profiler unavailable"


def test_profile_fields_on_cpu_name_the_ops_that_take_the_time():
    from pdengine.bench.common import profile_fields

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    setups = []
    fields = profile_fields(lambda: a @ b, setup=lambda: setups.append(1), reps=2)
    assert fields["host_issue_ms"] > 0 and len(setups) == 2 + 4
    names = [k["name"] for k in fields["top_kernels"]]
    assert any("mm" in n for n in names), names
    assert all(k["calls"] > 0 and k["ms"] > 0 for k in fields["top_kernels"])


# ------------------------------------------------------------------------------------------- plot


def test_plot_is_well_formed_and_labelled(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "git_sha": "abc1234", "torch": "2.x", "triton": "3.x",
           "diffusers": "0.42", "timestamp": "now"}
    rows = [
        {"kernel": "temporal_conv", "provider": "triton", "shape": "B2xF16 C320 32x32", "direction": "fwd",
         "status": "ok", "median_ms": 0.5, "speedup_vs_torch_ref": 3.25, **env},
        {"kernel": "temporal_conv", "provider": "torch_ref", "shape": "B2xF16 C320 32x32", "direction": "fwd",
         "status": "ok", "median_ms": 1.6, "speedup_vs_torch_ref": 1.0, **env},
        {"kernel": "latent_update", "provider": "triton", "shape": "B1 <&> odd", "direction": "fwd",
         "status": "error: ValueError: bad <shape> & more", **env},
    ]
    path = write_plot(rows, tmp_path / "p.svg")
    root = ET.parse(path).getroot()
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert any("NVIDIA H100" in t and "abc1234" in t for t in texts)
    assert "3.25x" in texts
    assert any("bad <shape> & more" in t for t in texts)
    assert not any("torch_ref" in t and "B2xF16" in t for t in texts)  # the baseline itself is not a bar


def test_temporal_transformer_triton_provider_runs_the_engines_kernel_path():
    """The layer-scope `triton` provider runs the layer with backend "triton" (attention, layout and GEGLU
    kernels: interpreter here), equals the torch_ref provider on the same layer, and leaves the shared layer
    on "torch" for that provider."""
    import pdengine.kernels.geglu as geglu_module

    cases = K.build_cases(["temporal_attention"], quick=True, frames=2, levels=[(2, 64)])
    (case,) = [c for c in cases if c.scope == "temporal transformer"]
    state = case.make_inputs("cpu", torch.float32)
    calls = []
    real = geglu_module.geglu
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(geglu_module, "geglu", lambda p: calls.append(p.shape) or real(p))
        with torch.no_grad():
            got = case.providers["triton"](state).fwd()
            assert calls, "the triton provider did not run the GEGLU kernel"
            n = len(calls)
            want = case.providers["torch_ref"](state).fwd()
            assert len(calls) == n and state["ours"].backend == "torch"
    assert_close(got, want, name="temporal transformer, triton vs torch provider", scale=3.0)
