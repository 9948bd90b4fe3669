"""Figures of the book and the CLI, in one style: a fixed colour and marker per method on
every page, sized for the book's column (7 in wide at most, text 9 pt or more), drawn at
twice the screen's pixel density, legends outside the data. Backfill curves (one panel per
metric, the seed spread as bands), the two systems' distance calibration on one shared
axis, and merged top-k retrievals.

Explained in the book: book/table1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from rmlib.evaluation.curves import BackfillCurve
from rmlib.outputs import save_figure

CURVE_PANELS = {"mAP": "mAP (%)", "top1": "top-1 (%)", "nfr": "negative flips (%)"}
COLUMN_WIDTH = 7.0  # inches: the book's text column (676 px) shows about 97 px per inch
DPI = 200  # twice a screen's 100 px per inch, so the figures stay sharp on dense screens
FONT_SIZE = 9  # points, the smallest text in any figure

# One colour and marker per method, the same on every page (seaborn's "deep" palette).
# "+rho" is the ablation's name for RM (MCL with rho): one method, one colour.
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "Old": ("#4c72b0", "s"),
    "New": ("#dd8452", "^"),
    "New+rho": ("#8c613c", "v"),
    "RM_naive": ("#55a868", "p"),
    "RM_naive+cal": ("#64b5cd", "D"),
    "+RQT": ("#8172b3", "P"),
    "+CL": ("#937860", "X"),
    "+MCL": ("#da8bc3", "*"),
    "+rho": ("#c44e52", "o"),
    "RM": ("#c44e52", "o"),
    "BCT": ("#8c8c8c", "<"),
    "FCT": ("#ccb974", ">"),
    "BiCT": ("#17becf", "h"),
}
# Names outside the registry (order policies, a user's files) take these, in order.
OTHER_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                 "#666666")
OTHER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _method_of(name: str) -> str | None:
    """The method a label names: itself, or its first word ("old system" -> "Old",
    "+MCL: backward system" -> "+MCL"), matched without case."""
    if name in METHOD_STYLE:
        return name
    first = re.split(r"[\s:,(]", name.strip(), maxsplit=1)[0].lower()
    return next((m for m in METHOD_STYLE if m.lower() == first), None)


def method_styles(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each label: its method's own (`_method_of`), else the next of
    OTHER_COLOURS and OTHER_MARKERS."""
    styles, k = {}, 0
    for name in names:
        method = _method_of(name)
        if method:
            styles[name] = METHOD_STYLE[method]
        else:  # OTHER_COLOURS share no colour with METHOD_STYLE
            styles[name] = (OTHER_COLOURS[k % len(OTHER_COLOURS)],
                            OTHER_MARKERS[k % len(OTHER_MARKERS)])
            k += 1
    return styles


def book_style() -> dict:
    """matplotlib settings of every figure: 9 pt text and lines thin enough for 7 in."""
    return {"font.size": FONT_SIZE, "axes.labelsize": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1,
            "xtick.labelsize": FONT_SIZE, "ytick.labelsize": FONT_SIZE,
            "legend.fontsize": FONT_SIZE, "figure.titlesize": FONT_SIZE + 1,
            "figure.dpi": DPI, "savefig.dpi": DPI, "lines.linewidth": 1.4,
            "lines.markersize": 4}


def _pyplot(headless: bool):
    import matplotlib

    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", rc=book_style())
    return plt, sns


def book_figure(nrows: int = 1, ncols: int = 1, height: float = 2.6,
                width: float = COLUMN_WIDTH, **kw):
    """A figure in the book's style and column width, with its axes (a 2-D array): for the
    chapters' own plots, so that every figure of the book reads alike."""
    plt, _ = _pyplot(False)
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(width, COLUMN_WIDTH), height),
                             constrained_layout=True, squeeze=False, **kw)
    return fig, axes


def _finish(fig, plt, title: str, path: Path | str | None, *legend):
    """Legend below the panels (it never covers a curve), the title, and the file if `path`."""
    if legend and legend[0]:
        longest = max(len(label) for label in legend[1])
        ncol = max(1, min(len(legend[1]), 4, 90 // (longest + 6)))  # ~90 characters a line
        fig.legend(*legend, loc="outside lower center", ncol=ncol, frameon=False)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, dpi=DPI)
        plt.close(fig)
    return fig


def _line_with_band(ax, x, values, std, style: tuple[str, str], label: str,
                    markevery: int) -> None:
    """One system's curve in percent, in its colour and marker, with a band of one std
    over seeds when it has a spread."""
    colour, marker = style
    values = 100 * np.asarray(values)
    ax.plot(x, values, color=colour, marker=marker, markevery=markevery, label=label)
    if std is not None and np.any(std):
        band = 100 * np.asarray(std)
        ax.fill_between(x, values - band, values + band, alpha=0.2, color=colour,
                        linewidth=0)


def plot_curves(curves: Mapping[str, BackfillCurve], path: Path | str | None = None,
                title: str = "", metrics: tuple[str, ...] = ("mAP", "top1", "nfr")):
    """One panel per metric against the backfilled fraction t, one line per system; saved
    if `path`. A curve that carries its spread over seeds (`extras` "mAP_std", "top1_std",
    as `rmlib.methods.reproduce.curve_of` reads them from a results row) gets a band of
    one std. Each method keeps its colour and marker (METHOD_STYLE) on every page; the
    legend sits below the panels, never over a curve."""
    plt, _ = _pyplot(path is not None)
    styles = method_styles(curves)
    fig, axes = plt.subplots(1, len(metrics), figsize=(COLUMN_WIDTH, 2.6),
                             constrained_layout=True, squeeze=False)
    for name, curve in curves.items():
        for ax, metric in zip(axes[0], metrics, strict=True):
            _line_with_band(ax, curve.t, getattr(curve, metric),
                            curve.extras.get(f"{metric}_std"), styles[name], name, 2)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.set(xlabel="backfilled fraction t", ylabel=CURVE_PANELS[metric], xlim=(0, 1),
               xticks=(0, 0.5, 1))
    return _finish(fig, plt, title, path, *axes[0][0].get_legend_handles_labels())


def plot_period_curves(rows: Mapping[str, Mapping], t1: float, path: Path | str | None = None,
                       title: str = "", metrics: tuple[str, ...] = ("mAP", "nfr")):
    """Curves over a whole upgrade chain (`rmlib.methods.chain`): each strategy's metric
    against the items re-embedded since the first backfill began, in units of the gallery
    size N, with its spread over seeds as a band and a dashed line where the third model
    arrives (t1)."""
    plt, _ = _pyplot(path is not None)
    styles = method_styles(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(COLUMN_WIDTH, 2.8),
                             constrained_layout=True, squeeze=False)
    for name, row in rows.items():
        for ax, metric in zip(axes[0], metrics, strict=True):
            _line_with_band(ax, row["x"], row[metric], row.get(f"{metric}_std"),
                            styles[name], name, 4)
    end = max(max(row["x"]) for row in rows.values())  # the period's length
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.axvline(t1, color="0.4", linestyle="--", linewidth=0.9)
        ax.set(xlabel="items re-embedded since the start (× N)",
               ylabel=CURVE_PANELS[metric], xlim=(0, end), xticks=np.arange(0, end + 0.25, 0.5))
    return _finish(fig, plt, title, path, *axes[0][0].get_legend_handles_labels())


def nearest_distances(query, gallery, protocol, positive: bool, limit: int = 2000):
    """Each query's distance to its nearest relevant (positive=True) or irrelevant gallery item.

    Distances of two systems are comparable only if these distributions line up: rank
    merge compares an old-system distance with a new-system one.
    """
    import torch

    from rmlib.evaluation.retrieval import EuclideanSystem

    n = min(limit, len(query))
    relevant, excluded = protocol.masks(0, n)
    d = EuclideanSystem.of(query[:n], gallery).distances()
    mask = relevant if positive else (~relevant & ~excluded)
    d = d.masked_fill(~mask, float("inf")).min(1).values
    return d[torch.isfinite(d)].numpy().astype(np.float64)


def plot_distance_calibration(systems: Mapping[str, tuple], protocol, path=None, title=""):
    """Each system's distances from a query to its nearest relevant (solid) and nearest
    irrelevant (dashed) gallery item, all on one distance axis: rank merge compares
    distances across systems, so the systems must be read on the same scale.

    systems: name -> (query, gallery). Returns the figure.
    """
    plt, sns = _pyplot(path is not None)
    found = {(name, positive): nearest_distances(q, g, protocol, positive)
             for name, (q, g) in systems.items() for positive in (True, False)}
    edges = np.histogram_bin_edges(np.concatenate(list(found.values())), bins=60)
    palette = {name: colour for name, (colour, _) in method_styles(systems).items()}
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.0), constrained_layout=True)
    for (name, positive), d in found.items():
        sns.histplot(d, bins=edges, stat="density", element="step", fill=positive,
                     alpha=0.25 if positive else 1.0, color=palette[name], ax=ax,
                     linestyle="-" if positive else "--",
                     label=f"{name}: nearest {'relevant' if positive else 'irrelevant'}")
    ax.set(xlabel="Euclidean distance from a query to its nearest item",
           ylabel="density")
    return _finish(fig, plt, title, path, *ax.get_legend_handles_labels())


def plot_retrieval_examples(images, rows: Mapping[str, list], query_image, title: str = ""):
    """A query image and, per system, its merged top-k; frame colour = correct (green) or
    not (red), caption = the system that scored the item (old/new) and its distance."""
    plt, _ = _pyplot(False)
    k = max(len(r) for r in rows.values())
    cell = COLUMN_WIDTH / (k + 1)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(COLUMN_WIDTH, 1.25 * cell * len(rows)),
                             constrained_layout=True, squeeze=False)
    for r, (name, items) in enumerate(rows.items()):
        axes[r][0].imshow(query_image.transpose(1, 2, 0))
        axes[r][0].set_title("query")
        axes[r][0].set_ylabel(name)
        for c, (idx, dist, side, ok) in enumerate(items, start=1):
            ax = axes[r][c]
            ax.imshow(images[idx].transpose(1, 2, 0))
            ax.set_title(f"{side} {dist:.2f}")
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if ok else "tab:red")
                spine.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    if title:
        fig.suptitle(title)
    return fig
