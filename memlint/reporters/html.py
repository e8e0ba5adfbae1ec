"""``memlint report``: a self-contained HTML page per analysed model, drawn with plotly.

For each model (and target): a summary, the findings of its file, the memory timeline of the
simulated step (live bytes per category after each op of forward, backward and the optimizer
step, stacked, on top of the fixed overhead of context and library workspace; the peak marked;
the budget and the device peak drawn as lines), and per-layer bars (parameter bytes and the
activations each layer saved for backward). The timeline runs from the start of the worst
simulated iteration to the end of the step, as ``ModelReport.timeline`` holds it. plotly is the ``report`` extra; its JavaScript
is embedded, so the page works offline.
"""
from __future__ import annotations

import html
from typing import Any

from memlint.engine import CheckResult
from memlint.report import ModelReport
from memlint.units import format_bytes

CATEGORIES = (
    ("parameters", "weights", "#4c78a8"), ("buffers", "buffers", "#9ecae9"), ("gradients", "gradients", "#f58518"),
    ("optimizer_state", "optimizer state", "#e45756"), ("activations", "activations", "#54a24b"),
    ("inputs", "inputs", "#eeca3b"), ("temporaries", "temporaries", "#b279a2"),
)
OVERHEAD_COLOR = "#bab0ac"
PHASE_COLORS = {"forward": "rgba(76,120,168,0.07)", "backward": "rgba(245,133,24,0.07)",
                "optimizer": "rgba(228,87,86,0.07)"}


def require_plotly() -> None:
    """Raise a UsageError that says how to install the extra when plotly is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        from memlint.errors import UsageError

        raise UsageError("memlint report needs plotly, which is not installed",
                         hint="pip install 'memlint[report]'") from None


def _unit(report: ModelReport) -> tuple[str, float]:
    largest = max(report.budget_bytes, report.peak_device_bytes, report.peak_allocated_bytes)
    return ("GiB", 2.0**30) if largest >= 2**30 else ("MiB", 2.0**20)


def _phase_spans(report: ModelReport) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for point in report.timeline:
        if spans and spans[-1][0] == point.phase:
            spans[-1] = (point.phase, spans[-1][1], point.index)
        else:
            spans.append((point.phase, point.index, point.index))
    return spans


def timeline_figure(report: ModelReport) -> Any:
    import plotly.graph_objects as go

    unit, scale = _unit(report)
    figure = go.Figure()
    points = report.timeline
    xs = [p.index for p in points]
    hover = [f"op {p.index}: {p.phase} {p.op}" + (f" ({p.module})" if p.module else "") for p in points]
    overhead = report.overhead_bytes
    figure.add_trace(go.Scatter(
        x=xs, y=[overhead / scale] * len(xs), name="CUDA context + library workspace", stackgroup="memory",
        mode="lines", line={"width": 0.5, "color": OVERHEAD_COLOR}, hovertext=hover, hoverinfo="text+y+name"))
    for key, label, color in CATEGORIES:
        values = [p.categories.get(key, 0) / scale for p in points]
        if not any(values):
            continue
        figure.add_trace(go.Scatter(x=xs, y=values, name=label, stackgroup="memory", mode="lines",
                                    line={"width": 0.5, "color": color}, hovertext=hover, hoverinfo="text+y+name"))
    spans = _phase_spans(report)
    width = (spans[-1][2] - spans[0][1]) if spans else 0
    for phase, start, end in spans:
        # Name the phases wide enough to read; short ones (inputs, loss) are only shaded.
        label = {"annotation_text": phase, "annotation_position": "top left", "annotation_font_size": 11} \
            if width and (end - start) >= 0.05 * width else {}
        figure.add_vrect(x0=start, x1=end, fillcolor=PHASE_COLORS.get(phase, "rgba(0,0,0,0.04)"), line_width=0,
                         layer="below", **label)
    if points:
        totals = [overhead + sum(p.categories.values()) for p in points]
        at = max(range(len(points)), key=totals.__getitem__)
        peak = points[at]
        figure.add_trace(go.Scatter(x=[peak.index], y=[totals[at] / scale], mode="markers", name="peak",
                                    marker={"size": 11, "color": "black", "symbol": "x"}, showlegend=False,
                                    hoverinfo="skip"))
        figure.add_annotation(
            x=peak.index, y=totals[at] / scale, ax=40, ay=-40, showarrow=True, arrowhead=2,
            text=f"peak {totals[at] / scale:.2f} {unit} ({peak.phase}: {html.escape(peak.op)})",
            bgcolor="white", bordercolor="black", borderwidth=1)
    budget = report.budget_bytes / scale
    figure.add_hline(y=budget, line={"color": "#d62728", "width": 2, "dash": "dash"},
                     annotation_text=f"budget {budget:.2f} {unit} ({report.threshold:.0%} of {report.target})",
                     annotation_position="top right", annotation_font_color="#d62728")
    device = report.peak_device_bytes / scale
    figure.add_hline(y=device, line={"color": "#7f7f7f", "width": 1, "dash": "dot"},
                     annotation_text=f"device peak with allocator reserve {device:.2f} {unit}",
                     annotation_position="bottom right", annotation_font_color="#7f7f7f")
    top = max([budget, device, *([max(totals) / scale] if points else [])]) * 1.15
    figure.update_layout(
        title=f"Memory during one training step: {report.name} on {report.target}, batch size {report.batch_size}",
        xaxis_title="op of the simulated step", yaxis_title=f"live memory ({unit})", yaxis_range=[0, top],
        hovermode="closest", template="plotly_white", height=520, legend={"traceorder": "normal"},
        margin={"l": 70, "r": 30, "t": 70, "b": 50})
    return figure


def layers_figure(report: ModelReport) -> Any:
    import plotly.graph_objects as go

    layers = report.layers
    unit, scale = ("MiB", 2.0**20) if max([l.activation_bytes for l in layers] + [l.parameter_bytes for l in layers]
                                         + [0]) < 2**30 else ("GiB", 2.0**30)
    names = [f"{'  ' * layer.depth}{layer.name} ({layer.type})" for layer in layers]
    figure = go.Figure()
    figure.add_trace(go.Bar(y=names, x=[l.parameter_bytes / scale for l in layers], name="parameters",
                            orientation="h", marker_color="#4c78a8",
                            hovertext=[format_bytes(l.parameter_bytes) for l in layers], hoverinfo="text+name"))
    figure.add_trace(go.Bar(y=names, x=[l.activation_bytes / scale for l in layers], name="activations saved",
                            orientation="h", marker_color="#54a24b",
                            hovertext=[format_bytes(l.activation_bytes) for l in layers], hoverinfo="text+name"))
    figure.update_layout(
        title="Per layer: parameters and activations saved for backward (with children)", barmode="group",
        xaxis_title=unit, yaxis={"autorange": "reversed", "automargin": True}, template="plotly_white",
        height=max(300, 60 + 26 * len(layers)), margin={"l": 30, "r": 30, "t": 60, "b": 50})
    return figure


def _summary(report: ModelReport, result: CheckResult) -> str:
    fits = report.peak_device_bytes <= report.budget_bytes
    rows = [
        ("model", f"{report.name} ({report.path}:{report.line})"), ("target", report.target),
        ("step", f"{report.mode}, batch size {report.batch_size}, optimizer {report.optimizer}, {report.precision}"),
        ("peak allocated", format_bytes(report.peak_allocated_bytes)),
        ("peak on the device", format_bytes(report.peak_device_bytes)),
        ("budget", f"{format_bytes(report.budget_bytes)} ({report.threshold:.0%} of "
                   f"{format_bytes(report.capacity_bytes)})"),
        ("verdict", "fits" if fits else "does NOT fit"),
        ("largest batch size that fits", str(report.max_batch_size or "none")),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    findings = [d for d in result.diagnostics if d.path == report.path]
    items = "".join(f"<li><code>{html.escape(d.path)}:{d.line}:{d.column}</code> <b>{html.escape(d.code)}</b> "
                    f"{html.escape(d.message)}</li>" for d in findings)
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in report.assumptions)
    return (f"<table class='summary {'fits' if fits else 'over'}'>{table}</table>"
            + (f"<h3>Findings</h3><ul>{items}</ul>" if items else "")
            + (f"<details><summary>Assumptions</summary><ul>{notes}</ul></details>" if notes else ""))


def render(result: CheckResult) -> str:
    """The whole page; plotly's JavaScript is embedded once."""
    import plotly.io as pio

    from memlint import __version__

    sections = []
    first = True
    for report in result.reports:
        parts = [f"<section><h2>{html.escape(report.name)} on {html.escape(report.target)}</h2>",
                 _summary(report, result)]
        for figure in (timeline_figure(report), layers_figure(report)):
            parts.append(pio.to_html(figure, include_plotlyjs=first, full_html=False,
                                     config={"displaylogo": False, "responsive": True}))
            first = False
        parts.append("</section>")
        sections.append("\n".join(parts))
    title = "memlint report: " + ", ".join(html.escape(r.name) for r in result.reports)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="memlint {__version__}">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1em; }}
table.summary th {{ text-align: left; padding: 2px 16px 2px 0; font-weight: 600; }}
table.summary.over tr:nth-child(7) td {{ color: #d62728; font-weight: 700; }}
table.summary.fits tr:nth-child(7) td {{ color: #2ca02c; font-weight: 700; }}
section {{ margin-bottom: 3em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{"".join(sections)}
</body>
</html>
"""
