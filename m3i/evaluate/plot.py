"""PNG figures drawn with Pillow alone (no plotting library in the images): a confusion matrix, bar charts,
line charts (one panel per series: training losses against step), and panel charts (several lines per
panel with a shared legend and an optional dashed reference such as chance: scores of several runs
against step, one panel per task)."""

from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["bar_chart_png", "confusion_png", "line_chart_png", "panel_chart_png", "smooth"]

_PALETTE = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193), (255, 112, 67))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> float:
    return draw.textlength(text, font=font)


def _dashed_hline(draw: ImageDraw.ImageDraw, left: float, right: float, y: float) -> None:
    """A grey dashed horizontal line from ``left`` to ``right`` (a reference level such as chance)."""
    for x in range(int(left), int(right), 12):
        draw.line((x, y, min(x + 6, right), y), fill=(120, 120, 120), width=1)


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> bytes:
    """A confusion matrix (rows: true class, columns: predicted) with per-class accuracy on the right.

    Cells are shaded by the row-normalised rate and show the count.

    Returns:
        PNG bytes.
    """
    n = len(classes)
    cell = 44 if n <= 12 else max(12, 528 // n)
    font, small = _font(14), _font(max(8, min(12, cell // 3)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max([_text_w(probe, c, font) for c in classes] + [40])) + 12
    top, left = 40 + label_w, 20 + label_w
    width, height = left + n * cell + 90, top + n * cell + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 8), title, fill="black", font=font)
    # Column labels read upwards from just above their column: draw rows on a strip, turn it.
    strip = Image.new("RGB", (label_w, n * cell), "white")
    sd = ImageDraw.Draw(strip)
    for j, name in enumerate(classes):
        sd.text((4, j * cell + cell / 2 - 8), name, fill="black", font=font)
    img.paste(strip.rotate(90, expand=True), (left, top - label_w - 4))
    draw.text((left + n * cell + 8, top - 22), "acc", fill="black", font=font)
    for i, name in enumerate(classes):
        row = [int(v) for v in matrix[i]]
        total = sum(row)
        y = top + i * cell
        draw.text((left - 6 - _text_w(draw, name, font), y + cell / 2 - 8), name, fill="black", font=font)
        for j, v in enumerate(row):
            rate = v / total if total else 0.0
            shade = int(255 - 200 * rate)
            colour = (shade, shade, 255) if i != j else (shade, 255, shade)
            x = left + j * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(200, 200, 200))
            if v and cell >= 24:
                t = str(v)
                draw.text((x + (cell - _text_w(draw, t, small)) / 2, y + cell / 2 - 7), t, fill="black", font=small)
        acc = f"{100 * row[i] / total:.0f}%" if total else "-"
        draw.text((left + n * cell + 8, y + cell / 2 - 8), acc, fill="black", font=font)
    draw.text((left, top + n * cell + 10), "predicted ->  (rows: true class)", fill=(90, 90, 90), font=small)
    return _png(img)


def bar_chart_png(
    groups: Sequence[str],
    series: Sequence[str],
    means: Sequence[Sequence[float]],
    spreads: Sequence[Sequence[float]],
    *,
    title: str = "",
    ylabel: str = "",
    ymax: float | None = None,
    reference: float | None = None,
    reference_label: str = "",
) -> bytes:
    """Grouped bars with error bars: ``means[g][s]`` +- ``spreads[g][s]`` for group ``g``, series ``s``.

    Args:
        groups: Labels along the x axis.
        series: Legend entries, one bar per series in each group.
        means: Bar heights.
        spreads: Half-lengths of the error bars.
        title: Caption above the plot.
        ylabel: Axis caption.
        ymax: Top of the y axis (default: a little above the highest bar).
        reference: A horizontal dashed line (e.g. chance), optional.
        reference_label: Its label.

    Returns:
        PNG bytes.
    """
    font, small = _font(15), _font(13)
    width, height = 120 + 130 * len(groups), 460
    left, right, top, bottom = 70, width - 20, 60, height - 80
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    hi = max((m + s for ms, ss in zip(means, spreads) for m, s in zip(ms, ss)), default=1.0)
    ymax = ymax if ymax is not None else max(hi * 1.1, 1e-9)

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * max(0.0, min(v, ymax)) / ymax

    if title:
        draw.text((left, 10), title, fill="black", font=font)
    for t in range(6):  # grid and ticks
        v = ymax * t / 5
        y = y_of(v)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        label = f"{v:.0f}" if ymax >= 10 else f"{v:.2f}"
        draw.text((left - 8 - _text_w(draw, label, small), y - 7), label, fill="black", font=small)
    if ylabel:
        strip = Image.new("RGB", (int(_text_w(draw, ylabel, small)) + 4, 16), "white")
        ImageDraw.Draw(strip).text((2, 0), ylabel, fill="black", font=small)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (6, int((top + bottom) / 2 - strip.height / 2)))
    group_w = (right - left) / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(series))
    for g, name in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s in range(len(series)):
            m, e = means[g][s], spreads[g][s]
            xa = x0 + s * bar_w
            draw.rectangle((xa + 2, y_of(m), xa + bar_w - 2, bottom), fill=_PALETTE[s % len(_PALETTE)])
            xc = xa + bar_w / 2
            if e > 0:
                draw.line((xc, y_of(m - e), xc, y_of(m + e)), fill="black", width=2)
                for v in (m - e, m + e):
                    draw.line((xc - 5, y_of(v), xc + 5, y_of(v)), fill="black", width=2)
            t = f"{m:.1f}" if ymax >= 10 else f"{m:.2f}"
            draw.text((xc - _text_w(draw, t, small) / 2, y_of(m + e) - 17), t, fill="black", font=small)
        draw.text((left + g * group_w + (group_w - _text_w(draw, name, font)) / 2, bottom + 8), name, fill="black", font=font)
    draw.line((left, bottom, right, bottom), fill="black")
    draw.line((left, top, left, bottom), fill="black")
    if reference is not None:
        _dashed_hline(draw, left, right, y_of(reference))
    x = left
    for s, name in enumerate(series):  # legend
        draw.rectangle((x, height - 32, x + 14, height - 18), fill=_PALETTE[s % len(_PALETTE)])
        draw.text((x + 20, height - 34), name, fill="black", font=small)
        x += 40 + _text_w(draw, name, small)
    if reference is not None and reference_label:
        for xx in (x, x + 10):
            draw.line((xx, height - 25, xx + 6, height - 25), fill=(120, 120, 120), width=1)
        draw.text((x + 22, height - 34), reference_label, fill="black", font=small)
    return _png(img)


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (fewer at the ends); no lag, unlike an EMA.

    Args:
        values: The raw series.
        window: Points averaged; 1 returns the values.

    Returns:
        The smoothed series, as long as ``values``.
    """
    half = max(0, window // 2)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    n = len(values)
    return [(sums[min(n, i + half + 1)] - sums[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half)) for i in range(n)]


def _nice_ticks(lo: float, hi: float, n: int = 4, min_step: float = 0.0) -> list[float]:
    """About ``n`` round tick values between ``lo`` and ``hi``, at least ``min_step`` apart."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = max(min_step, next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= 0.8 * raw))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float, step: float) -> str:
    """``v`` with as many decimals as the tick step needs (2.5 -> one, 0.25 -> two)."""
    if step < 1e-6:
        return f"{v:.3g}"
    digits = f"{step:.6f}".rstrip("0").rstrip(".")
    return f"{v:.{len(digits.split('.')[1]) if '.' in digits else 0}f}"


def line_chart_png(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "step",
    window: int | None = None,
) -> bytes:
    """One panel per series, stacked, sharing the x axis: the raw line in a light shade, a smoothed one over it.

    Each panel has its own y range (loss parts differ in scale by orders of magnitude).

    Args:
        series: ``{name: (xs, ys)}`` in drawing order; every series non-empty.
        title: Caption above the first panel.
        xlabel: Caption of the shared x axis.
        window: Points of the smoothed line's moving average (see :func:`smooth`); ``None`` takes
            a twentieth of the series (no smoothed line under 60 points).

    Returns:
        PNG bytes.

    Raises:
        ValueError: When ``series`` is empty, or a series is empty or its x and y lengths differ.
    """
    if not series:
        raise ValueError("line_chart_png needs at least one series")
    for name, (xs, ys) in series.items():
        if not xs or len(xs) != len(ys):
            raise ValueError(f"series {name!r} has {len(xs)} x and {len(ys)} y values; need as many of each, at least one")
    font, small = _font(15), _font(12)
    width, panel_h, gap = 720, 150, 34
    left, right = 80, width - 20
    top0 = 40 if title else 14
    height = top0 + len(series) * (panel_h + gap) + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((left, 10), title, fill="black", font=font)
    x_lo = min(min(xs) for xs, _ in series.values())
    x_hi = max(max(xs) for xs, _ in series.values())
    x_span = (x_hi - x_lo) or 1.0

    def x_of(v: float) -> float:
        return left + (right - left) * (v - x_lo) / x_span

    x_ticks = _nice_ticks(x_lo, x_hi, 6, min_step=1.0) if x_hi > x_lo else [x_lo]  # steps are whole numbers
    for p, (name, (xs, ys)) in enumerate(series.items()):
        colour = _PALETTE[p % len(_PALETTE)]
        light = tuple(int(c + (255 - c) * 0.65) for c in colour)
        top = top0 + p * (panel_h + gap) + 18
        bottom = top + panel_h
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad

        def y_of(v: float) -> float:
            return bottom - (bottom - top) * (v - lo) / (hi - lo)

        y_ticks = _nice_ticks(lo, hi, 4)
        y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else abs(hi - lo)
        for v in y_ticks:
            y = y_of(v)
            draw.line((left, y, right, y), fill=(230, 230, 230))
            label = _tick_label(v, y_step)
            draw.text((left - 6 - _text_w(draw, label, small), y - 7), label, fill="black", font=small)
        for v in x_ticks:
            draw.line((x_of(v), top, x_of(v), bottom), fill=(240, 240, 240))
        draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        w = window if window is not None else (len(ys) // 20 if len(ys) >= 60 else 1)
        points = [(x_of(x), y_of(y)) for x, y in zip(xs, ys)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        elif w > 1:
            draw.line(points, fill=light, width=1)
            draw.line([(x_of(x), y_of(y)) for x, y in zip(xs, smooth(ys, w))], fill=colour, width=2)
        else:
            draw.line(points, fill=colour, width=2)
        last = f"last {ys[-1]:.4g}"
        draw.text((left, top - 17), name, fill=colour, font=font)
        draw.text((right - _text_w(draw, last, small), top - 15), last, fill=(90, 90, 90), font=small)
        if p == len(series) - 1:
            _x_axis(draw, x_ticks, x_of, bottom, right, xlabel, small)
    return _png(img)


def _x_axis(draw, x_ticks: list[float], x_of, bottom: float, right: float, xlabel: str, font) -> None:
    """Tick labels under the bottom panel and the axis label at its right end."""
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    for v in x_ticks:
        label = _tick_label(v, x_step)
        draw.text((x_of(v) - _text_w(draw, label, font) / 2, bottom + 4), label, fill="black", font=font)
    draw.text((right - _text_w(draw, xlabel, font), bottom + 18), xlabel, fill=(90, 90, 90), font=font)


def panel_chart_png(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    reference: dict[str, float] | None = None,
    reference_label: str = "chance",
    title: str = "",
    ylabel: str = "",
    xlabel: str = "step",
    unit: str = "%",
    y_limits: tuple[float, float] = (0.0, 100.0),
    y_step: float = 5.0,
) -> bytes:
    """One panel per group, stacked, sharing the x axis; in each, one line per series; a shared legend on top.

    A series keeps its colour in every panel. Earlier series are drawn wider, so lines that
    coincide stay visible. Each panel's y range covers its lines and its reference, rounded
    out to multiples of ``y_step`` with one ``y_step`` of margin, within ``y_limits``.

    Args:
        panels: ``{panel: {series: (xs, ys)}}`` in drawing order (e.g. ``{attribute: {arm: (steps, score in %)}}``).
        reference: ``{panel: level}``, drawn as a grey dashed line (e.g. chance), optional per panel.
        reference_label: What the dashed line is, in each panel's caption.
        title: Caption above the legend.
        ylabel: What the y axis shows, after the panel's name in its caption.
        xlabel: Caption of the shared x axis.
        unit: Unit of ``reference`` in the caption (``""`` for none).
        y_limits: The y range never goes beyond these.
        y_step: Rounding and margin of each panel's y range.

    Returns:
        PNG bytes.

    Raises:
        ValueError: When ``panels`` is empty or a series' x and y lengths differ.
    """
    if not panels:
        raise ValueError("panel_chart_png needs at least one panel")
    for name, lines in panels.items():
        for series, (xs, ys) in lines.items():
            if len(xs) != len(ys):
                raise ValueError(f"series {series!r} of panel {name!r} has {len(xs)} x and {len(ys)} y values; need as many of each")
    reference = reference or {}
    names = list(dict.fromkeys(v for p in panels.values() for v in p))
    colour = {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(names)}
    font, small = _font(15), _font(12)
    width, panel_h, gap, left, right = 760, 170, 40, 70, 740
    top0 = 64 if title else 40
    img = Image.new("RGB", (width, top0 + len(panels) * (panel_h + gap) + 20), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((left, 10), title, fill="black", font=font)
    x = left
    for v in names:  # legend
        draw.line((x, top0 - 16, x + 18, top0 - 16), fill=colour[v], width=3)
        draw.text((x + 22, top0 - 24), v, fill="black", font=small)
        x += 40 + _text_w(draw, v, small)
    xs_all = [x for p in panels.values() for xs, _ in p.values() for x in xs] or [0.0]
    x_lo, x_hi = min(xs_all), max(xs_all)

    def x_of(v: float) -> float:
        return left + (right - left) * (v - x_lo) / ((x_hi - x_lo) or 1.0)

    for i, (name, lines) in enumerate(panels.items()):
        top = top0 + i * (panel_h + gap) + 18
        bottom = top + panel_h
        ys = [y for _, yv in lines.values() for y in yv] + [reference.get(name, 0.0)]
        lo = max(y_limits[0], math.floor(min(ys) / y_step) * y_step - y_step)
        hi = min(y_limits[1], math.ceil(max(ys) / y_step) * y_step + y_step)

        def y_of(v: float, lo: float = lo, hi: float = hi, top: float = top, bottom: float = bottom) -> float:
            return bottom - (bottom - top) * (v - lo) / ((hi - lo) or 1.0)

        ticks = _nice_ticks(lo, hi, 4)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for v in ticks:
            draw.line((left, y_of(v), right, y_of(v)), fill=(230, 230, 230))
            label = _tick_label(v, step)
            draw.text((left - 6 - _text_w(draw, label, small), y_of(v) - 7), label, fill="black", font=small)
        draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
        if name in reference:
            _dashed_hline(draw, left, right, y_of(reference[name]))
        for j, (v, (xs, yv)) in enumerate(lines.items()):
            pts = [(x_of(x), y_of(y)) for x, y in zip(xs, yv)]
            w = 2 + 2 * (len(lines) - 1 - j)
            if len(pts) > 1:
                draw.line(pts, fill=colour[v], width=w)
            for px, py in pts:
                draw.ellipse((px - w / 2 - 2, py - w / 2 - 2, px + w / 2 + 2, py + w / 2 + 2), fill=colour[v])
        caption = f"{name}: {ylabel}" if ylabel else name
        if name in reference:
            caption += f" (dashed: {reference_label} {reference[name]:.1f}{' ' + unit if unit else ''})"
        draw.text((left, top - 18), caption, fill="black", font=font)
        if i == len(panels) - 1:
            x_ticks = _nice_ticks(x_lo, x_hi, 6, min_step=1.0) if x_hi > x_lo else [x_lo]
            _x_axis(draw, x_ticks, x_of, bottom, right, xlabel, small)
    return _png(img)
