"""Compile Triton kernels for real NVIDIA targets without a GPU, and read what the compiler made.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline down to a
cubin on any machine; the `cuobjdump` bundled with Triton then reports registers, stack and local
memory (spills) and disassembles SASS, where tensor-core instructions show up as HMMA (sm80) or
HGMMA/HMMA (sm90). Each kernel module lists the launches it makes at the `pixeldance` shapes with
`compile_specs()`; tests and `pdengine bench kernels --device cpu` compile those.

Results are cached on disk (keyed by the kernel source, signature, constants, target and Triton
version) so the check stays fast after the first run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
_MMA = re.compile(r"\b(HMMA|HGMMA|IMMA|WGMMA)\b")
# Global loads / stores / asynchronous copies and their width suffix: .U8/.S8/.U16/.S16 move one 1- or 2-byte
# element per thread (sub-word), none a 32-bit word, .64/.128 a vector.
_GLOBAL = re.compile(r"\b(?:LDG|STG|LDGSTS)\.E(?:\.EL|\.EF|\.LU|\.BYPASS|\.LTC\d+B|\.CONSTANT)*"
                     r"(?:\.(U8|S8|U16|S16|64|128))?\b")
_REPORT_VERSION = 2  # part of the cache key: bumped when the report gains fields


@dataclass
class CompileSpec:
    """One kernel launch configuration to compile: the @triton.jit function, its signature (argument name
    -> Triton type such as "*bf16", "*fp32", "i32", "fp32", or "constexpr") and constexpr values."""

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    expects_mma: bool = False  # the kernel multiplies matrices: its SASS must use tensor cores
    # Int arguments that are multiples of 16 at the preset's shapes. Triton's launcher specializes on that
    # (and on 16-byte-aligned pointers, which every pointer here is taken to be, as fresh PyTorch
    # allocations are), and only then can the compiler prove contiguity and alignment for vector loads:
    # naming them compiles the variant that actually runs.
    divisible: tuple[str, ...] = ()
    # For kernels that stream activations: at most this many sub-word global access instructions in the SASS
    # (per-channel vectors and the like; the activation itself must move as 32-bit words or vectors).
    max_narrow_global: int | None = None


@dataclass
class CompileReport:
    name: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    mma_instructions: int
    expects_mma: bool
    extra: dict[str, Any] = field(default_factory=dict)
    # Global memory instructions in the SASS (static counts): sub-word (1-2 bytes per thread) and vector
    # (8-16 bytes per thread) accesses.
    narrow_global: int = 0
    vector_global: int = 0

    @property
    def spills(self) -> int:
        return self.stack_bytes + self.local_bytes


def _bin_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def cuobjdump() -> Path:
    path = _bin_dir() / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"cuobjdump is not bundled with this Triton install (looked at {path})")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("PDENGINE_CACHE") or Path.home() / ".cache" / "pdengine"
    return Path(root).expanduser() / "compile-check"


def _key(spec: CompileSpec, arch: int) -> str:
    import triton

    fn = getattr(spec.fn, "fn", spec.fn)
    # The whole module's source: a kernel's @triton.jit helpers (_dot, _cast, tile helpers) live beside it,
    # and a change to one of them must not reuse a cached report.
    src = inspect.getsource(inspect.getmodule(fn))
    blob = json.dumps([src, spec.signature, {k: repr(v) for k, v in spec.constexprs.items()}, spec.num_warps,
                       spec.num_stages, arch, triton.__version__, sorted(spec.divisible), _REPORT_VERSION],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) function in cuobjdump --dump-resource-usage output."""
    out: dict[str, int] = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m is None:
            raise ValueError(f"cuobjdump output has no {key} field:\n{text}")
        out[key] = int(m.group(1))
    return out


def _divisibility_attrs(spec: CompileSpec) -> dict[tuple[int, ...], list[list[Any]]]:
    """The launcher's specialization as compile attributes: pointers and `spec.divisible` ints % 16 == 0."""
    unknown = set(spec.divisible) - set(spec.signature)
    if unknown:
        raise ValueError(f"{spec.name}: divisible names unknown arguments {sorted(unknown)}")
    # A tl.constexpr parameter left out of the constants (one with a default, say) would compile as a runtime
    # argument: a variant with both branches of every `if` on it, which no launch ever runs.
    params = inspect.signature(getattr(spec.fn, "fn", spec.fn)).parameters.values()
    missing = [p.name for p in params if "constexpr" in str(p.annotation) and p.name not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: constexpr arguments {missing} need values in the spec's constants")
    names = list(spec.fn.arg_names)  # positions as the JITFunction numbers its arguments
    return {(names.index(name),): [["tt.divisibility", 16]] for name, kind in spec.signature.items()
            if kind.startswith("*") or (name in spec.divisible and kind != "constexpr")}


def _compile_here(spec: CompileSpec, arch: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                                    attrs=_divisibility_attrs(spec))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = str(cuobjdump())
        usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = parse_resource_usage(usage)
    widths = [m.group(1) for m in _GLOBAL.finditer(sass)]
    return CompileReport(
        name=spec.name, arch=arch, registers=res["REG"], stack_bytes=res["STACK"], local_bytes=res["LOCAL"],
        shared_bytes=max(res["SHARED"], int(getattr(kernel.metadata, "shared", 0) or 0)),
        mma_instructions=len(_MMA.findall(sass)), expects_mma=spec.expects_mma,
        extra={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        narrow_global=sum(w in ("U8", "S8", "U16", "S16") for w in widths),
        vector_global=sum(w in ("64", "128") for w in widths),
    )


def jit_function(fn: Any) -> Any:
    """The compilable JITFunction behind a kernel, for a `CompileSpec`: under TRITON_INTERPRET=1 (CPU tests)
    `@triton.jit` gives an InterpretedFunction, which `triton.compile` cannot take."""
    import triton

    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.runtime.JITFunction(fn.fn)


def _module_of(spec: CompileSpec) -> str:
    return getattr(spec.fn, "fn", spec.fn).__module__


_CHILD = """
import json, sys, importlib
from dataclasses import asdict
from pdengine.kernels.compile_check import _compile_here
jobs = json.loads(sys.stdin.read())
specs = {}
out = []
for module, name, arch in jobs:
    if module not in specs:
        specs[module] = {s.name: s for s in importlib.import_module(module).compile_specs()}
    out.append(asdict(_compile_here(specs[module][name], arch)))
print(json.dumps(out))
"""


def _compile_in_children(todo: list[tuple[CompileSpec, int, Path]], workers: int | None) -> list[CompileReport]:
    """Compile `todo` in child processes with the interpreter off, which re-import the kernel modules and find
    the specs by name (spec names must be unique within a module): `workers` of them side by side (default:
    one per CPU core), each taking every `workers`-th job, so each pays Python's and Triton's start-up once."""
    import sys

    jobs = [[_module_of(spec), spec.name, arch] for spec, arch, _ in todo]
    n = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    env = {**os.environ, "TRITON_INTERPRET": "0"}

    def run(i: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs[i::n]), capture_output=True,
                              text=True, env=env)

    with ThreadPoolExecutor(n) as pool:
        procs = list(pool.map(run, range(n)))
    made: list[CompileReport | None] = [None] * len(jobs)
    for i, proc in enumerate(procs):
        if proc.returncode != 0:
            raise RuntimeError(f"compile check child process failed:\n{proc.stderr[-4000:]}")
        made[i::n] = [CompileReport(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    return made  # type: ignore[return-value]


def compile_all(specs: list[CompileSpec], archs: tuple[int, ...] = ARCHS, use_cache: bool = True,
                workers: int | None = None) -> list[CompileReport]:
    """Compile every spec for every arch (cached). Under the Triton interpreter (`TRITON_INTERPRET=1`, the
    CPU test setting) `@triton.jit` yields interpreted functions that cannot be compiled, so the work runs
    in child processes with the interpreter off (`_compile_in_children`; `workers` of them)."""
    reports: dict[tuple[str, int], CompileReport] = {}
    todo: list[tuple[CompileSpec, int, Path]] = []
    for spec in specs:
        for arch in archs:
            cache_file = _cache_dir() / f"{spec.name}-sm{arch}-{_key(spec, arch)}.json"
            if use_cache and cache_file.is_file():
                reports[(spec.name, arch)] = CompileReport(**json.loads(cache_file.read_text()))
            else:
                todo.append((spec, arch, cache_file))
    if todo:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            made = _compile_in_children(todo, workers)
        else:
            made = [_compile_here(spec, arch) for spec, arch, _ in todo]
        for (spec, arch, cache_file), report in zip(todo, made):
            reports[(spec.name, arch)] = report
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp_file.write_text(json.dumps(asdict(report)))
            tmp_file.replace(cache_file)
    return [reports[(spec.name, arch)] for spec in specs for arch in archs]


def compile_spec(spec: CompileSpec, arch: int, use_cache: bool = True) -> CompileReport:
    """Compile `spec` for sm_`arch` and report its resource usage and tensor-core instruction count."""
    return compile_all([spec], (arch,), use_cache)[0]


def all_specs() -> list[CompileSpec]:
    """Every kernel launch of the kernel families at the `pixeldance` preset's shapes."""
    from . import (
        adamw_sr,
        add_layer_norm,
        concat_cond,
        fused_linear,
        geglu,
        group_norm_silu,
        latent_update,
        temporal_attention,
        temporal_conv,
    )

    specs: list[CompileSpec] = []
    for module in (temporal_conv, temporal_attention, concat_cond, latent_update, geglu, fused_linear,
                   group_norm_silu, add_layer_norm, adamw_sr):
        specs.extend(module.compile_specs())
    return specs
