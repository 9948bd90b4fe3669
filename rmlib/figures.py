"""Figures of the book and the CLI, drawn with seaborn: backfill curves (one panel per
metric, the seed spread as bands, the legend outside the data), the two systems' distance
calibration on one shared axis, and merged top-k retrievals."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rmlib.evaluation.backfill import BackfillCurve
from rmlib.outputs import save_figure

CURVE_PANELS = {"mAP": "mAP (%)", "top1": "top-1 (%)", "nfr": "negative flips (%)"}


def _pyplot(headless: bool):
    import matplotlib

    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    return plt, sns


def _finish(fig, plt, title: str, path: Path | str | None, *legend):
    """Legend to the right of the panels, the title, and the file if `path` is given."""
    fig.legend(*legend, loc="outside right center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, dpi=120)
        plt.close(fig)
    return fig


def plot_curves(curves: Mapping[str, BackfillCurve], path: Path | str | None = None,
                title: str = "", metrics: tuple[str, ...] = ("mAP", "top1", "nfr")):
    """One panel per metric against the backfilled fraction t, one line per system; saved
    if `path`. A curve that carries its spread over seeds (`extras` "mAP_std", "top1_std",
    as `rmlib.methods.reproduce.curve_of` reads them from a results row) gets a band of
    one std. The legend sits to the right of the panels, never over a curve."""
    plt, sns = _pyplot(path is not None)
    palette = sns.color_palette("tab10", n_colors=max(len(curves), 1))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.9 * len(metrics) + 1.6, 3.4),
                             constrained_layout=True, squeeze=False)
    for colour, (name, curve) in zip(palette, curves.items(), strict=False):
        for ax, metric in zip(axes[0], metrics, strict=True):
            values = 100 * np.asarray(getattr(curve, metric))
            ax.plot(curve.t, values, color=colour, marker=".", label=name)
            std = curve.extras.get(f"{metric}_std")
            if std is not None and np.any(std):
                band = 100 * np.asarray(std)
                ax.fill_between(curve.t, values - band, values + band, alpha=0.2,
                                color=colour, linewidth=0)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.set(xlabel="backfilled fraction t", ylabel=CURVE_PANELS[metric], xlim=(0, 1))
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
    palette = dict(zip(systems, sns.color_palette("tab10", len(systems)), strict=True))
    fig, ax = plt.subplots(figsize=(8.2, 3.4), constrained_layout=True)
    for (name, positive), d in found.items():
        sns.histplot(d, bins=edges, stat="density", element="step", fill=positive,
                     alpha=0.25 if positive else 1.0, color=palette[name], ax=ax,
                     linestyle="-" if positive else "--",
                     label=f"{name}: nearest {'relevant' if positive else 'irrelevant'}")
    ax.set(xlabel="Euclidean distance from a query to its nearest item",
           ylabel="density (share of queries per unit distance)")
    return _finish(fig, plt, title, path)


def plot_retrieval_examples(images, rows: Mapping[str, list], query_image, title: str = ""):
    """A query image and, per system, its merged top-k; frame colour = correct (green) or
    not (red), caption = the system that scored the item (old/new) and its distance."""
    plt, _ = _pyplot(False)
    k = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.35 * (k + 1), 1.6 * len(rows)),
                             constrained_layout=True, squeeze=False)
    for r, (name, items) in enumerate(rows.items()):
        axes[r][0].imshow(query_image.transpose(1, 2, 0))
        axes[r][0].set_title("query", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
        for c, (idx, dist, side, ok) in enumerate(items, start=1):
            ax = axes[r][c]
            ax.imshow(images[idx].transpose(1, 2, 0))
            ax.set_title(f"{side} {dist:.2f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if ok else "tab:red")
                spine.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
