"""Per-GPU launch table of the temporal conv (`temporal_conv.py`): for each kind of stage GEMM (`fwd`: the
conv, `dgrad`: its transpose, `wgrad`: the weight gradient), dtype and shape (C_out, C_in, H*W), which GEMM
runs (the fused Triton kernels or cuBLAS; for the conv and its transpose also cuBLAS on an im2col matrix)
and which Triton tile, as measured on one GPU model by `pdengine tune` (the launch-configuration sweep of
`bench/conv_configs.py`, every candidate checked against the fp32 reference before it is timed).

A table is a JSON file: {"device": GPU name, "meta": {versions, git sha, batch, frames, when}, "entries":
[{"kind", "dtype", "c_out", "c_in", "hw", "best": "cublas" | "cublas_im2col" | tile, "triton": tile,
"best_ms", "triton_ms", "builtin_ms"}]}; a tile is the list of `_GemmConfig` fields (block_m, block_n, block_k,
num_warps, num_stages, prenorm) or, for wgrad, of `_WgradConfig` (block_o, block_c, block_n, split, num_warps,
num_stages; split 0: the built-in rule for the batch at hand). Lookups are exact: a shape or dtype the
table does not hold runs the built-in tiles (`_gemm_config`, `_dgrad_config`, `_wgrad_config`).

A table may also record, under "transformer_gemm", how this GPU runs the transformers' GEMMs at inference
(`fused_linear.transformer_gemm_for`): {"choice": "cublas" | "fused" | "per_level", "levels": {level:
"cublas" | "fused"} (per transformer size, `gemm_level`), and the timings that chose it},
measured by `pdengine tune` on one UNet call each way, per transformer.

Where the table for a device named N comes from, first found wins:
  1. $PDENGINE_CONV_TABLE: a file (for any device). An unreadable or malformed file is an error.
  2. The user's cache, `$PDENGINE_CACHE or ~/.cache/pdengine` / conv-tables / <slug of N>.json, where
     `pdengine tune` writes. A malformed file there is reported once and skipped.
  3. The tables shipped with the package, `kernels/conv_tables/<slug of N>.json`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

KINDS = ("fwd", "dgrad", "wgrad")
DTYPES = ("bf16", "fp16", "fp32")
CUBLAS = "cublas"
CUBLAS_IM2COL = "cublas_im2col"  # the single-GEMM cuBLAS variant of the conv and its transpose (fwd, dgrad)
TRANSFORMER_GEMM_CHOICES = ("cublas", "fused", "per_level")
TABLE_ENV = "PDENGINE_CONV_TABLE"
PACKAGED_DIR = Path(__file__).parent / "conv_tables"
_GEMM_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "prenorm")
_WGRAD_FIELDS = ("block_o", "block_c", "block_n", "split", "num_warps", "num_stages")
_BLOCKS = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)

Tile = tuple  # _GemmConfig or _WgradConfig fields, in order


@dataclass(frozen=True)
class Entry:
    best: Tile | str  # CUBLAS, CUBLAS_IM2COL (fwd) or the fastest Triton tile
    triton: Tile | None  # the fastest Triton tile (what "triton" mode runs), None if none was correct


@dataclass
class ConvTable:
    device: str
    source: str  # where it was read from (a path), or "memory"
    entries: dict[tuple[str, str, int, int, int], Entry]
    meta: dict[str, Any] = field(default_factory=dict)
    transformer_gemm: dict[str, Any] | None = None  # {"choice", "levels", timings}: see the docstring

    def lookup(self, kind: str, dtype: str, c_out: int, c_in: int, hw: int) -> Entry | None:
        return self.entries.get((kind, dtype, c_out, c_in, hw))

    def describe(self) -> str:
        versions = ", ".join(f"{k} {self.meta[k]}" for k in ("triton", "torch") if k in self.meta)
        gemm = ""
        if self.transformer_gemm:
            gemm = f", transformer GEMMs: {self.transformer_gemm['choice']}"
            if self.transformer_gemm["choice"] == "per_level":
                fused = sorted(k for k, v in self.transformer_gemm["levels"].items() if v == "fused")
                gemm += f" (fused at {', '.join(fused) or 'none'})"
        return f"{len(self.entries)} entries{gemm} tuned on {self.device} ({self.source}" + \
            (f"; {versions})" if versions else ")")


def gemm_level(kind: str, channels: int, inner: int) -> str:
    """The key of one transformer size ("spatial" or "temporal", its channels and inner width) in a table's
    per-level transformer GEMM choice."""
    return f"{kind}:{channels}:{inner}"


def slug(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the table's file name."""
    s = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    if not s:
        raise ValueError(f"device name {device_name!r} has no letters or digits")
    return s


DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # a table's dtype keys


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bf16" (the table's dtype key)."""
    if dtype not in DTYPE_KEYS:
        raise ValueError(f"no conv table dtype for {dtype}")
    return DTYPE_KEYS[dtype]


def _tile(kind: str, value: Any, where: str) -> Tile:
    fields = _WGRAD_FIELDS if kind == "wgrad" else _GEMM_FIELDS
    if not isinstance(value, list | tuple) or len(value) != len(fields):
        raise ValueError(f"{where}: a {kind} tile is a list of {len(fields)} values {fields}, got {value!r}")
    out = []
    for name, v in zip(fields, value):
        if name == "prenorm":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: prenorm must be true or false, got {v!r}")
        elif not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{where}: {name} must be an integer, got {v!r}")
        elif name.startswith("block") and v not in _BLOCKS:
            raise ValueError(f"{where}: {name} must be one of {_BLOCKS}, got {v}")
        elif name == "num_warps" and v not in _WARPS:
            raise ValueError(f"{where}: num_warps must be one of {_WARPS}, got {v}")
        elif name == "num_stages" and not 1 <= v <= 8:
            raise ValueError(f"{where}: num_stages must be 1..8, got {v}")
        elif name == "split" and not 0 <= v <= 64:
            raise ValueError(f"{where}: split must be 0..64 (0: the built-in rule), got {v}")
        out.append(v)
    return tuple(out)


def parse(data: Any, source: str) -> ConvTable:
    """A table from its JSON object; ValueError naming `source` and the entry for anything malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("device"), str) or not isinstance(
            data.get("entries"), list):
        raise ValueError(f"{source}: a conv table is an object with a 'device' name and a list of 'entries'")
    entries: dict[tuple[str, str, int, int, int], Entry] = {}
    for i, e in enumerate(data["entries"]):
        where = f"{source}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: not an object")
        kind, dtype = e.get("kind"), e.get("dtype")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {DTYPES}, got {dtype!r}")
        dims = []
        for name in ("c_out", "c_in", "hw"):
            v = e.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
            dims.append(v)
        triton = None if e.get("triton") is None else _tile(kind, e["triton"], where)
        best = e.get("best")
        if best == CUBLAS_IM2COL and kind == "wgrad":
            raise ValueError(f"{where}: {CUBLAS_IM2COL!r} is a variant of the conv and its transpose (fwd, "
                             "dgrad), not of the weight gradient")
        best = best if best in (CUBLAS, CUBLAS_IM2COL) else _tile(kind, best, where)
        if triton is None and not isinstance(best, str):
            triton = best  # the fastest is a Triton tile: it is also the Triton tile to run
        key = (kind, dtype, *dims)
        if key in entries:
            raise ValueError(f"{where}: a second entry for {key}")
        entries[key] = Entry(best, triton)
    meta = data.get("meta", {})
    gemm = data.get("transformer_gemm")
    if gemm is not None and (not isinstance(gemm, dict) or gemm.get("choice") not in TRANSFORMER_GEMM_CHOICES):
        raise ValueError(f"{source}: transformer_gemm must be an object whose choice is one of "
                         f"{TRANSFORMER_GEMM_CHOICES}, got {gemm!r}")
    levels = gemm.get("levels") if gemm is not None else None
    if gemm is not None and gemm["choice"] == "per_level" and (
            not isinstance(levels, dict) or any(v not in ("cublas", "fused") for v in levels.values())):
        raise ValueError(f"{source}: a per_level transformer_gemm needs \"levels\": an object of \"cublas\" or "
                         f"\"fused\" per level, got {levels!r}")
    return ConvTable(data["device"], source, entries, meta if isinstance(meta, dict) else {}, gemm)


def read(path: Path | str) -> ConvTable:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable conv table: {e}") from None
    return parse(data, str(path))


def to_json(table: ConvTable, extra: dict[tuple, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON object of `table`; `extra` adds fields (timings) per entry key."""
    rows = []
    for key, entry in sorted(table.entries.items()):
        kind, dtype, c_out, c_in, hw = key
        rows.append({"kind": kind, "dtype": dtype, "c_out": c_out, "c_in": c_in, "hw": hw,
                     "best": entry.best if isinstance(entry.best, str) else list(entry.best),
                     "triton": None if entry.triton is None else list(entry.triton),
                     **(extra or {}).get(key, {})})
    out = {"device": table.device, "meta": table.meta, "entries": rows}
    if table.transformer_gemm is not None:
        out["transformer_gemm"] = table.transformer_gemm
    return out


def write(table: ConvTable, path: Path, extra: dict[tuple, dict[str, Any]] | None = None) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(to_json(table, extra), indent=1) + "\n")
    tmp.replace(path)
    return path


def user_path(device_name: str) -> Path:
    root = os.environ.get("PDENGINE_CACHE") or Path.home() / ".cache" / "pdengine"
    return Path(root).expanduser() / "conv-tables" / f"{slug(device_name)}.json"


def find(device_name: str) -> tuple[ConvTable | None, list[str]]:
    """The table for a GPU named `device_name` (see the module's docstring) and the problems met on the way
    (a malformed cache file: skipped and reported). A bad $PDENGINE_CONV_TABLE raises ValueError."""
    env = os.environ.get(TABLE_ENV)
    if env:
        return read(Path(env)), []
    problems = []
    for path in (user_path(device_name), PACKAGED_DIR / f"{slug(device_name)}.json"):
        if not path.is_file():
            continue
        try:
            return read(path), problems
        except ValueError as e:
            problems.append(f"{e} (skipped)")
    return None, problems
