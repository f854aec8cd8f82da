"""The demo's picture: accuracy against stored size, coloured by technique family, with its Pareto front.

Rows of other tasks (other data, labels or protocol) are not points of the same trade-off: they get
a panel of their own beside the main axes.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Any
from collections.abc import Sequence

__all__ = ["plot", "pareto_front"]

OTHER_TASK = "other task"
# colour and marker per family; colours from the colour-blind-safe Okabe-Ito palette
STYLE = {
    "dense reference": ("#000000", "*"),
    "pruning": ("#0072B2", "o"),
    "quantization": ("#D55E00", "s"),
    "weight sharing": ("#009E73", "D"),
    "low-rank": ("#CC79A7", "^"),
    "combined (recipe)": ("#E69F00", "P"),
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher x and higher y), by x.

    Examples:
      >>> pareto_front([(1, 0.99), (4, 0.98), (3, 0.97), (8, 0.90)])
      [0, 1, 3]
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _place_labels(ax: Any, xy: list[tuple[float, float]], texts: list[str]) -> None:
    """Numbers beside their points, each at the first offset whose box overlaps no placed label."""
    fig = ax.figure
    fig.canvas.draw()
    placed: list[Any] = []
    offsets = [(6, 6), (6, -12), (-14, 6), (-14, -12), (10, 0), (-18, 0), (0, 10), (0, -16), (14, 12), (-20, -18)]
    for (x, y), text in zip(xy, texts):
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                                fontweight="bold")
            box = label.get_window_extent(fig.canvas.get_renderer()).expanded(1.1, 1.15)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()
        else:
            placed.append(ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=9,
                                      fontweight="bold").get_window_extent(fig.canvas.get_renderer()))


def plot(rows: list[dict[str, Any]], path: str | pathlib.Path) -> None:
    """Draws the demo's results (the dicts of ``results.json``) to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["family"] != OTHER_TASK]
    other = [r for r in rows if r["family"] == OTHER_TASK]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(14, 7), gridspec_kw={"width_ratios": [2.2, 1]})

    xy = [(r["ratio"], 100 * r["accuracy"]) for r in main]
    front = pareto_front(xy)
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="0.6", lw=1.2, ls="--", zorder=1,
            label="Pareto front (accuracy vs size)")
    for family, (color, marker) in STYLE.items():
        pts = [p for p, r in zip(xy, main) if r["family"] == family]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, s=90 if marker == "*" else 55, zorder=3,
                       edgecolor="white", linewidth=0.6, label=family)
    _place_labels(ax, xy, [str(i) for i in range(1, len(main) + 1)])
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense float32 bytes / stored bytes, log scale)")
    ax.set_ylabel("hold-out accuracy (%)")
    ax.set_title("compressing the digits CNN teacher")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left", frameon=True)
    key = [f"{i}. {r['method']} ({100 * r['accuracy']:.1f}%, {r['ratio']:.1f}x)" for i, r in enumerate(main, 1)]
    half = (len(key) + 1) // 2
    for column, lines in enumerate((key[:half], key[half:])):
        fig.text(0.01 + 0.34 * column, 0.01, "\n".join(lines), fontsize=7.5, va="bottom", family="monospace")

    names = ["\n".join(textwrap.wrap(r["method"], 28)) for r in other]
    acc = [100 * r["accuracy"] for r in other]
    err = [100 * r.get("std", 0.0) for r in other]
    left = min(acc + [90.0]) - 2
    side.barh(range(len(other)), acc, xerr=err, color="#56B4E9", height=0.55)
    for i, r in enumerate(other):
        side.text(left + 0.3, i, f"{acc[i]:.1f}%", va="center", ha="left", fontsize=8, color="white",
                  fontweight="bold")
        if "full_finetune_accuracy" in r:
            side.plot(100 * r["full_finetune_accuracy"], i, "k|", ms=18, mew=2)
            side.text(100 * r["full_finetune_accuracy"], i - 0.38, "full fine-tune", fontsize=7, ha="center")
    side.set_yticks(range(len(other)), names, fontsize=8)
    side.invert_yaxis()
    side.set_xlim(left, 100.5)
    side.set_xlabel("accuracy (%) on each row's own task")
    side.set_title("other tasks (not on the trade-off)")
    side.grid(alpha=0.3, axis="x")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
