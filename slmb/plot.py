"""A loss curve as text, for the terminal: ``slmb train``'s summary, ``slmb runs show`` and ``slmb events --plot``.

Pure functions of numbers (no terminal, no rich), so tests read the plot they draw. The train curve is drawn in
braille dots (2 × 4 dots a character cell) and the validation points as ``●`` on top; with ``unicode=False`` (a
terminal that is not UTF-8) the curve is ``*`` and the validation points ``o``, one a cell.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

Point = tuple[int, float]  # (step, loss)

_BRAILLE_BASE = 0x2800
# Dot bits of a braille cell by (column, row from the top): ⠁⠂⠄⡀ on the left, ⠈⠐⠠⢀ on the right.
_DOTS = (((0, 0), 0x01), ((0, 1), 0x02), ((0, 2), 0x04), ((0, 3), 0x40),
         ((1, 0), 0x08), ((1, 1), 0x10), ((1, 2), 0x20), ((1, 3), 0x80))
_DOT = dict(_DOTS)


def fmt_value(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def _clean(points: Iterable[Point] | None) -> list[Point]:
    """The finite points, sorted by step, the last value of a step kept (a resumed run may log a step twice)."""
    by_step: dict[int, float] = {}
    for step, value in points or ():
        if value is not None and math.isfinite(value):
            by_step[int(step)] = float(value)
    return sorted(by_step.items())


def _lowest(points: Sequence[Point]) -> Point:
    return min(points, key=lambda p: (p[1], p[0]))


def loss_plot(train: Iterable[Point] | None, val: Iterable[Point] | None = None, *, width: int = 80,
              height: int = 6, unicode: bool = True) -> str:
    """The loss curve of a run in at most ``width`` columns: a y axis labelled with the highest and lowest loss
    shown, ``height`` rows of plot, an x axis labelled with the first and last step, and a legend naming each
    curve's lowest value and its step. ``train`` is (step, loss) of the training steps, ``val`` (step, val loss)
    of the evaluations. An empty string when there is nothing to draw."""
    train_pts, val_pts = _clean(train), _clean(val)
    everything = train_pts + val_pts
    if not everything:
        return ""
    height = max(2, height)
    values = [v for _, v in everything]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5  # a flat curve sits in the middle
    steps = [s for s, _ in everything]
    first, last = min(steps), max(steps)
    hi_label, lo_label = fmt_value(hi), fmt_value(lo)
    label_w = max(len(hi_label), len(lo_label))
    cols = max(10, width - label_w - 2)  # "<label> ┤" then the plot

    sub_x = 2 if unicode else 1
    sub_y = 4 if unicode else 1
    nx, ny = cols * sub_x, height * sub_y

    def x_of(step: int) -> int:
        return 0 if last == first else round((step - first) / (last - first) * (nx - 1))

    def y_of(value: float) -> int:  # 0 = bottom
        return round((value - lo) / (hi - lo) * (ny - 1))

    # The train curve: per sub-column the mean of its points, then joined column to column.
    by_x: dict[int, list[float]] = {}
    for step, value in train_pts:
        by_x.setdefault(x_of(step), []).append(value)
    # The lowest point keeps its own place, so the plot's lowest dot is the run's lowest loss at its step.
    if train_pts:
        low_step = _lowest(train_pts)[0]
        by_x[x_of(low_step)] = [min(by_x[x_of(low_step)])]
    curve = sorted((x, y_of(sum(vs) / len(vs))) for x, vs in by_x.items())
    dots: set[tuple[int, int]] = set(curve)
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):  # joined point to point: the line reads as one
        n = max(abs(x1 - x0), abs(y1 - y0))
        dots.update((round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)) for i in range(1, n))

    grid = [[0] * cols for _ in range(height)] if unicode else [[" "] * cols for _ in range(height)]
    for x, y in dots:
        row = height - 1 - y // sub_y
        col = x // sub_x
        if unicode:
            grid[row][col] |= _DOT[(x % sub_x, sub_y - 1 - y % sub_y)]
        else:
            grid[row][col] = "*"
    cells = [[chr(_BRAILLE_BASE + c) if c else " " for c in row] for row in grid] if unicode else grid
    marker = "●" if unicode else "o"
    for step, value in val_pts:
        cells[height - 1 - y_of(value) // sub_y][x_of(step) // sub_x] = marker

    axis_v, corner, axis_h, tick = ("│", "└", "─", "┤") if unicode else ("|", "+", "-", "|")
    lines = []
    for r, row in enumerate(cells):
        label = hi_label if r == 0 else lo_label if r == height - 1 else ""
        lines.append(f"{label:>{label_w}} {tick if label else axis_v}{''.join(row).rstrip()}")
    lines.append(f"{'':>{label_w}} {corner}{axis_h * cols}")
    left, right, mid = f"{first:,}", f"{last:,}", "step"
    room = cols + 1 - len(left) - len(right)
    if room >= len(mid) + 2:
        pad = room - len(mid)
        xaxis = left + " " * (pad // 2) + mid + " " * (pad - pad // 2) + right
    else:
        xaxis = f"step {left} .. {right}"
    lines.append(f"{'':>{label_w}} {xaxis}")
    legend = []
    if train_pts:
        s, v = _lowest(train_pts)
        legend.append(f"{'⣿' if unicode else '*'} train loss (per step; lowest {fmt_value(v)} at step {s:,})")
    if val_pts:
        s, v = _lowest(val_pts)
        legend.append(f"{marker} val loss (lowest {fmt_value(v)} at step {s:,})")
    text = "   ".join(legend)
    if len(text) + label_w + 1 > width:
        lines.extend(f"{'':>{label_w}} {part}" for part in legend)
    else:
        lines.append(f"{'':>{label_w}} {text}")
    return "\n".join(lines)


def curves_of(events: Iterable[object]) -> tuple[list[Point], list[Point]]:
    """(train, val) points of a run's events: the loss of each ``step`` event, the val loss of each ``eval``.
    Takes parsed events (``slmb.core.events``) or their wire form ``{"event": ..., "data": {...}}``."""
    train: list[Point] = []
    val: list[Point] = []
    for e in events:
        if isinstance(e, dict):
            name, data = e.get("event"), e.get("data") or {}
        else:
            name, data = getattr(e, "name", None), vars(e)
        step = data.get("step")
        if not isinstance(step, int):
            continue
        if name == "step" and isinstance(data.get("loss"), (int, float)):
            train.append((step, float(data["loss"])))
        elif name == "eval" and isinstance(data.get("val_loss"), (int, float)):
            val.append((step, float(data["val_loss"])))
    return train, val


def supports_unicode(encoding: str | None) -> bool:
    """Whether text in ``encoding`` can carry braille (a UTF terminal)."""
    return bool(encoding) and encoding.lower().replace("-", "").replace("_", "").startswith("utf")
