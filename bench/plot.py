"""Horizontal bar charts of benchmark rows as hand-written SVG (no plotting dependency).

GPU rows: one bar per (kernel, shape, direction, provider) with its speedup over the eager PyTorch
reference. CPU rows: one bar per counted reference with its bytes ratio (reference bytes / modeled
fused bytes). A dashed line marks 1x; values are written on the bars; failed rows say "error" in red.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

PROVIDER_COLORS = {
    "triton": "#1f77b4",
    "triton_cublas": "#17becf",
    "torch_compile": "#ff7f0e",
    "diffusers": "#2ca02c",
    "torch_ref": "#7f7f7f",
}
_FONT = "font-family='DejaVu Sans, Arial, sans-serif'"


@dataclass
class Bar:
    """One bar: its label, the group (kernel) it is drawn under, its value (None: failed) and colour key."""

    label: str
    group: str
    value: float | None
    provider: str
    note: str = ""


def _label(row: dict[str, Any], provider: bool = True) -> str:
    scope = row.get("scope", "")
    parts = [row.get("shape", ""), row.get("direction", "")]
    if scope and scope not in ("kernel", "layer", "attention core"):
        parts.append(f"[{scope}]")
    if provider:
        parts.append(row.get("provider", ""))
    return "  ".join(p for p in parts if p)


def bars_from_rows(rows: list[dict[str, Any]]) -> tuple[list[Bar], str, str]:
    """The bars to draw, the x-axis label and what 1x means: speedups when rows carry timings, bytes
    ratios otherwise. Compile-statistics rows are not drawn."""
    timed = any("median_ms" in r for r in rows)
    bars: list[Bar] = []
    for r in rows:
        if r.get("direction") == "compile":
            continue
        ok = r.get("status") == "ok"
        if timed:
            if r.get("provider") == "torch_ref":
                continue
            value = r.get("speedup_vs_torch_ref") if ok else None
        else:
            if ok and r.get("bytes_ratio") is None:
                continue  # a counted reference with no fused model to compare with (labelled in the data)
            value = r.get("bytes_ratio") if ok else None
        note = "" if ok else str(r.get("status", "error"))
        bars.append(Bar(_label(r), r.get("kernel", "?"), value, r.get("provider", ""), note))
    if timed:
        return bars, "speedup vs eager PyTorch reference (x, higher is faster)", "1x = torch_ref"
    return bars, "bytes moved by the reference / modeled bytes of the fused kernel (x)", "1x = fused"


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def render_svg(bars: list[Bar], title: str, subtitle: str, x_label: str, ref_label: str) -> str:
    """SVG text of a horizontal bar chart with one row per bar, grouped under kernel headings."""
    label_w, plot_w, right_pad, row_h = 430, 470, 90, 20
    top = 92
    groups: list[str] = []
    for b in bars:
        if b.group not in groups:
            groups.append(b.group)
    n_lines = len(bars) + len(groups)
    height = top + n_lines * row_h + 60
    width = label_w + plot_w + right_pad
    vmax = max([b.value for b in bars if b.value is not None] + [1.0])
    step = _nice_step(vmax * 1.05)
    xmax = step * math.ceil(vmax * 1.05 / step)

    def x_of(v: float) -> float:
        return label_w + plot_w * v / xmax

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {_FONT} font-size='12'>",
        f"<rect x='0' y='0' width='{width}' height='{height}' fill='white'/>",
        f"<text x='{width / 2}' y='24' text-anchor='middle' font-size='16' font-weight='bold'>{escape(title)}</text>",
        f"<text x='{width / 2}' y='44' text-anchor='middle' fill='#444'>{escape(subtitle)}</text>",
    ]
    # Legend of providers present.
    lx = label_w
    for prov in [p for p in PROVIDER_COLORS if any(b.provider == p for b in bars)]:
        out.append(f"<rect x='{lx}' y='56' width='12' height='12' fill='{PROVIDER_COLORS[prov]}'/>")
        out.append(f"<text x='{lx + 16}' y='66'>{escape(prov)}</text>")
        lx += 24 + 7 * len(prov)
    bottom = top + n_lines * row_h
    # Grid and ticks.
    v = 0.0
    while v <= xmax + 1e-9:
        x = x_of(v)
        out.append(f"<line x1='{x:.1f}' y1='{top - 6}' x2='{x:.1f}' y2='{bottom}' stroke='#e4e4e4'/>")
        out.append(f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle' fill='#444'>{v:g}</text>")
        v += step
    out.append(f"<text x='{label_w + plot_w / 2}' y='{bottom + 36}' text-anchor='middle'>{escape(x_label)}</text>")
    y = top
    for group in groups:
        out.append(f"<text x='8' y='{y + 14}' font-weight='bold'>{escape(group)}</text>")
        out.append(f"<line x1='8' y1='{y + 18}' x2='{width - 8}' y2='{y + 18}' stroke='#bbb'/>")
        y += row_h
        for b in (b for b in bars if b.group == group):
            out.append(f"<text x='{label_w - 8}' y='{y + 14}' text-anchor='end'>{escape(b.label)}</text>")
            if b.value is None:
                msg = b.note if len(b.note) <= 60 else b.note[:57] + "..."
                out.append(f"<text x='{label_w + 4}' y='{y + 14}' fill='#c00'>{escape(msg or 'error')}</text>")
            else:
                color = PROVIDER_COLORS.get(b.provider, "#555")
                w = max(x_of(b.value) - label_w, 1.0)
                out.append(f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{row_h - 6}' fill='{color}'/>")
                out.append(f"<text x='{label_w + w + 4:.1f}' y='{y + 14}'>{b.value:.2f}x</text>")
            y += row_h
    x1 = x_of(1.0)
    out.append(f"<line x1='{x1:.1f}' y1='{top - 6}' x2='{x1:.1f}' y2='{bottom}' stroke='#c00' "
               "stroke-dasharray='4,3'/>")
    out.append(f"<text x='{x1 + 3:.1f}' y='{top - 10}' fill='#c00' font-size='11'>{escape(ref_label)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the chart of `rows` to `path` (SVG); the title names the device and the git sha."""
    bars, x_label, ref_label = bars_from_rows(rows)
    first = rows[0] if rows else {}
    device = first.get("gpu", first.get("device", "?"))
    title = f"pdengine kernels on {device}  (git {first.get('git_sha', 'unknown')})"
    subtitle = (f"torch {first.get('torch', '?')}  triton {first.get('triton', '?')}  "
                f"diffusers {first.get('diffusers', '?')}  {first.get('timestamp', '')}")
    if not bars:
        bars = [Bar("no rows to plot", "", None, "", "no data")]
    path = Path(path)
    path.write_text(render_svg(bars, title, subtitle, x_label, ref_label))
    return path
