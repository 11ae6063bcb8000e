"""``training_curves.png``: the run's losses, λ and forgetting signal, drawn from ``train_log.jsonl``.

Without a tracker (``--report_to none``, the default) this picture is the only view of how training
went. It is drawn with matplotlib when installed (``pip install sa-peft[plots]``) and with plain PIL
otherwise, from the same panels, so a bare install still gets every curve.

Panels: the forget and replay losses, the EWC penalty (raw values faint, smoothed on top), λ when the
adaptive schedule moved it, each concept's preference with the forgetting threshold and the retention
signal with its bound; a vertical line marks the step where every concept was first forgotten. γ
(``--replay_weight``) is fixed during a run, so it gets no curve.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from .image_grid import load_font
from .io_utils import atomic_path

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
THRESHOLD_COLOR = "#444444"
MARKER_COLOR = "#d62728"  # the "forgotten at step N" line; no series uses this colour


@dataclass
class Series:
    """One curve: ``raw`` curves are drawn faint under their smoothed copy."""

    name: str
    steps: list[int]
    values: list[float]
    color: str
    raw: bool = False


@dataclass
class Panel:
    title: str
    series: list[Series]
    hlines: list[tuple[str, float]] = field(default_factory=list)  # (label, y): thresholds and bounds


def read_train_log(path: str | os.PathLike) -> list[dict]:
    """The entries of ``train_log.jsonl`` (one JSON object per step); a torn last line is skipped."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written while we read (the loop appends to it)
    return entries


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with pandas' ``span`` (weight 2 / (span + 1)), debiased at the start."""
    alpha = 2 / (span + 1)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        norm = (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def _column(log: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], float(e[key])) for e in log
             if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool) and math.isfinite(e[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _loss_series(log: Sequence[dict], keys: Sequence[str], colors: Sequence[str]) -> list[Series]:
    out = []
    for key, color in zip(keys, colors):
        steps, values = _column(log, key)
        if steps:
            # Span ≈ 1/25 of the run: 40 steps on a 1000-step run, no smoothing on a 6-step test run.
            span = max(1, len(values) // 25)
            out += [Series(key, steps, values, color, raw=True), Series(key, steps, smooth(values, span), color)]
    return out


def forgotten_step(log: Sequence[dict]) -> int | None:
    """The first logged step where every concept was forgotten (``"forgotten": true``), or ``None``."""
    return next((e["step"] for e in log if e.get("forgotten") is True), None)


def curve_panels(log: Sequence[dict], threshold: float | None = None, retention_bound: float | None = None) -> list[Panel]:
    """The panels to draw, from the log's entries; panels without data are left out."""
    panels = [Panel("forget and replay loss", _loss_series(log, ["forget", "replay"], COLORS[:2])),
              Panel("EWC penalty (unweighted)", _loss_series(log, ["ewc"], COLORS[2:3]))]
    steps, lam = _column(log, "ewc_lambda")
    if len(set(lam)) > 1:
        panels.append(Panel("EWC λ (adaptive)", [Series("λ", steps, lam, COLORS[3])]))
    keys = list(dict.fromkeys(k for e in log for k in e if k.startswith("preference/")))
    preference = [Series(k.split("/", 1)[1], *_column(log, k), COLORS[i % len(COLORS)]) for i, k in enumerate(keys)]
    panels.append(Panel("forgetting: preference (1 = base model)", preference,
                        [(f"forgotten at ≤ {threshold:g}", threshold)] if threshold is not None else []))
    panels.append(Panel("retention: drift of held-out replay predictions", [Series("retention", *_column(log, "retention"), COLORS[4])],
                        [(f"bound {retention_bound:g}", retention_bound)] if retention_bound is not None else []))
    return [p for p in panels if any(s.steps for s in p.series)]


def render_matplotlib(panels: Sequence[Panel], marker: int | None, title: str) -> Image.Image:
    """The panels with matplotlib's object API (no pyplot: no global figure state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6 * cols, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s in panel.series:
            if s.raw:
                ax.plot(s.steps, s.values, color=s.color, alpha=0.25, linewidth=0.8)
            else:
                ax.plot(s.steps, s.values, color=s.color, label=s.name, marker="o" if len(s.steps) == 1 else None)
        for label, y in panel.hlines:
            ax.axhline(y, color=THRESHOLD_COLOR, linestyle="--", linewidth=1, label=label)
        if marker is not None:
            ax.axvline(marker, color=MARKER_COLOR, linestyle=":", linewidth=1.2, label=f"forgotten at step {marker}")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# Pillow's bundled font has no λ, ≤ or – glyphs (they draw as boxes); the fallback spells them out.
ASCII = str.maketrans({"λ": "lambda", "≤": "<=", "–": "-", "γ": "gamma"})


def _dashed(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], color: str) -> None:
    (x0, y0), (x1, y1) = start, end
    n = max(1, int(math.hypot(x1 - x0, y1 - y0) // 6))
    for i in range(0, n, 2):
        a, b = i / n, min(1.0, (i + 1) / n)
        draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=color, width=1)


def _faint(color: str) -> str:
    """``color`` mixed 25 % with white: the raw curves under the smoothed ones."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - 0.25 * (255 - c)):02x}" for c in rgb)


def _pil_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel, marker: int | None,
               x_range: tuple[int, int], font) -> None:
    left, top, right, bottom = box
    draw.text((left, top), panel.title.translate(ASCII), fill="black", font=font)
    x0, y0, x1, y1 = left + 56, top + 22, right - 8, bottom - 24  # the plot area, inside room for tick labels
    ys = [v for s in panel.series for v in s.values] + [y for _, y in panel.hlines]
    lo, hi = min(ys), max(ys)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    smin, smax = x_range
    sx = (x1 - x0) / max(1, smax - smin)

    def point(step, value):
        return x0 + (step - smin) * sx, y1 - (value - lo) / (hi - lo) * (y1 - y0)

    draw.rectangle([x0, y0, x1, y1], outline="#999999")
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        draw.text((left, y1 - frac * (y1 - y0) - 6), f"{value:.3g}", fill="#555555", font=font)
    for step in sorted({smin, (smin + smax) // 2, smax}):
        draw.text((point(step, lo)[0] - 8, y1 + 4), str(step), fill="#555555", font=font)
    for label, y in panel.hlines:
        _dashed(draw, point(smin, y), point(smax, y), THRESHOLD_COLOR)
    if marker is not None:
        _dashed(draw, point(marker, hi), point(marker, lo), MARKER_COLOR)
    legend = []
    for s in panel.series:
        pts = [point(a, b) for a, b in zip(s.steps, s.values)]
        color = _faint(s.color) if s.raw else s.color
        if len(pts) == 1:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        else:
            draw.line(pts, fill=color, width=1 if s.raw else 2)
        if not s.raw:
            legend.append((s.name, s.color))
    legend += [(label, THRESHOLD_COLOR) for label, _ in panel.hlines]
    if marker is not None:
        legend.append((f"forgotten at step {marker}", MARKER_COLOR))
    for i, (name, color) in enumerate(legend):
        draw.text((x0 + 6, y0 + 4 + 14 * i), name.translate(ASCII), fill=color, font=font)


def render_pil(panels: Sequence[Panel], marker: int | None, title: str) -> Image.Image:
    """The same panels drawn with PIL only: the fallback when matplotlib is not installed."""
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    w, h, head = 600, 320, 30
    canvas = Image.new("RGB", (w * cols, head + h * rows), "white")
    draw = ImageDraw.Draw(canvas)
    font = load_font(12)
    draw.text((8, 6), title.translate(ASCII), fill="black", font=load_font(16))
    steps = [st for p in panels for s in p.series for st in s.steps]
    x_range = (min(steps), max(steps))
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        _pil_panel(draw, (c * w + 8, head + r * h + 4, (c + 1) * w - 8, head + (r + 1) * h - 4), panel, marker, x_range, font)
    return canvas


def render_training_curves(log: Sequence[dict], threshold: float | None = None, retention_bound: float | None = None,
                           backend: str = "auto") -> tuple[Image.Image, str]:
    """``(picture, backend used)``; ``backend`` is ``"auto"`` (matplotlib if importable), ``"matplotlib"`` or ``"pil"``."""
    panels = curve_panels(log, threshold, retention_bound)
    if not panels:
        raise ValueError("the training log has no loss or signal values to plot")
    marker = forgotten_step(log)
    title = f"training curves, steps {log[0]['step']}–{log[-1]['step']}"
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401 (only: is it installed?)

            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    render = {"matplotlib": render_matplotlib, "pil": render_pil}[backend]
    return render(panels, marker, title), backend


def write_training_curves(log_path: str | os.PathLike, path: str | os.PathLike, threshold: float | None = None,
                          retention_bound: float | None = None) -> Image.Image | None:
    """Draw ``log_path`` (``train_log.jsonl``) into ``path`` atomically (replacing it); returns the picture,
    or ``None`` when the log is missing or has nothing to plot yet."""
    if not os.path.isfile(log_path):
        return None
    log = read_train_log(log_path)
    if not curve_panels(log):
        return None
    image, _ = render_training_curves(log, threshold, retention_bound)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return image
