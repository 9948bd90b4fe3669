"""Tables and figures: the terminal summary of a backfill, curves, Table 1 beside the paper."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rmlib.evaluation.backfill import BackfillCurve
from rmlib.outputs import save_figure


def curve_table(curve: BackfillCurve, every: int = 2) -> str:
    """A compact fixed-width table of the curve (every `every`-th point, and the last), in %."""
    rows = [f"{'t':>5} {'mAP':>7} {'top-1':>7} {'top-5':>7} {'NFR':>6}"]
    picks = list(range(0, len(curve.t), every))
    if picks[-1] != len(curve.t) - 1:
        picks.append(len(curve.t) - 1)
    for i in picks:
        rows.append(f"{curve.t[i]:5.2f} {100 * curve.mAP[i]:7.2f} {100 * curve.top1[i]:7.2f} "
                    f"{100 * curve.top5[i]:7.2f} {100 * curve.nfr[i]:6.2f}")
    return "\n".join(rows)


def summary_text(curve: BackfillCurve, conditions: Mapping | None = None) -> str:
    lines = [curve_table(curve), "",
             f"AUC mAP {100 * curve.auc('mAP'):.2f}   AUC top-1 {100 * curve.auc('top1'):.2f}   "
             f"AUC top-5 {100 * curve.auc('top5'):.2f}   ({curve.num_valid_queries} valid queries)"]
    if conditions:
        for metric, c in conditions.items():
            lines.append(
                f"{metric}: (6) M0 {100 * c['M0']:.2f} vs old {100 * c['old']:.2f} "
                f"{'ok' if c['cond6_M0_ge_old'] else 'VIOLATED'}; "
                f"(7) M1 {100 * c['M1']:.2f} vs new {100 * c['new']:.2f} "
                f"{'ok' if c['cond7_M1_ge_new'] else 'VIOLATED'}; "
                f"(8) largest drop {100 * c['max_drop']:.2f} pts "
                f"{'ok' if c['cond8_monotone'] else 'VIOLATED'}")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, BackfillCurve], path: Path | str | None = None,
                title: str = ""):
    """mAP, top-1 and negative-flip curves of one or more systems against t; saved if path.

    A curve that carries the spread over seeds (`extras` "mAP_std", "top1_std", as
    `curve_of` reads them from a results row) is drawn with a band of one std.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for name, curve in curves.items():
        for ax, metric in zip(axes, ("mAP", "top1", "nfr"), strict=True):
            values = np.array(getattr(curve, metric)) * 100
            line, = ax.plot(curve.t, values, marker=".", label=name)
            std = curve.extras.get(f"{metric}_std")
            if std is not None and any(std):
                band = 100 * np.asarray(std)
                ax.fill_between(curve.t, values - band, values + band, alpha=0.2,
                                color=line.get_color(), linewidth=0)
    for ax, label in zip(axes, ("mAP (%)", "top-1 (%)", "negative flips (%)"), strict=True):
        ax.set_xlabel("backfilled fraction t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, dpi=120)
        plt.close(fig)
    return fig


def _auc(row: Mapping, metric: str) -> str:
    """'34.23' or, over several seeds, '34.23±0.12' (std over seeds)."""
    text = f"{100 * row[f'auc_{metric}']:.2f}"
    if len(row.get("seeds", ())) > 1:
        text += f"±{100 * row[f'auc_{metric}_std']:.2f}"
    return text


def table1_text(rows: Mapping[str, Mapping], paper: Mapping | None = None) -> str:
    """Table 1 as fixed-width text: ours (AUC_mAP, AUC_CMC top-1 with their std over
    seeds, Gain) beside the paper's."""
    head = f"{'':12} {'AUC_mAP':>11} {'AUC_CMC':>11} {'Gain':>6}"
    if paper:
        head += f"   | paper: {'AUC_mAP':>7} {'AUC_CMC':>7} {'Gain':>5}"
    lines = [head + f"  {'max mAP drop':>12}"]
    for name, r in rows.items():
        line = f"{name:12} {_auc(r, 'mAP'):>11} {_auc(r, 'top1'):>11} {100 * r['gain']:5.0f}%"
        if paper:
            p = paper.get(name)
            line += (f"   |        {p[0]:7.1f} {p[1]:7.1f} {p[2]:4.0f}%" if p else
                     "   |" + " " * 28)
        drop = r["conditions"]["mAP"]["max_drop"]
        lines.append(line + f"  {100 * drop:10.2f} pt")
    return "\n".join(lines)


def provenance_line(prov: Mapping) -> str:
    """The sentence a results page prints: which run made these numbers, and what it cost.

    A results file may be rewritten from cached steps; the training times recorded with
    the cached models and transforms are reported beside the time of the rewrite.
    """
    m = prov.get("machine", {})
    hw = m.get("gpu") or m.get("cpu") or m.get("processor", "unknown CPU")
    backbones = sum(prov.get("backbone_train_seconds", prov.get("train_wall_time_s", {}))
                    .values())
    transforms = sum(prov.get("transform_fit_seconds", {}).values())
    line = (f"Profile `{prov.get('profile')}`, commit `{str(prov.get('git_commit'))[:12]}`, "
            f"{hw} ({m.get('threads', '?')} threads), {prov.get('date', '?')[:10]}: "
            f"this file written in {prov.get('wall_time_s', 0) / 60:.1f} min")
    if backbones:
        line += f"; backbone training {backbones / 60:.1f} min"
    if transforms:
        line += f"; final transform fits {transforms / 60:.1f} min"
    return line + "."


def nearest_distances(query, gallery, protocol, positive: bool, limit: int = 2000):
    """Each query's distance to its nearest relevant (positive=True) or irrelevant gallery item.

    Distances of two systems are comparable only if these distributions line up: rank
    merge compares an old-system distance with a new-system one.
    """
    import numpy as np
    import torch

    from rmlib.evaluation.retrieval import EuclideanSystem

    n = min(limit, len(query))
    relevant, excluded = protocol.masks(0, n)
    d = EuclideanSystem.of(query[:n], gallery).distances()
    mask = relevant if positive else (~relevant & ~excluded)
    d = d.masked_fill(~mask, float("inf")).min(1).values
    return d[torch.isfinite(d)].numpy().astype(np.float64)


def plot_distance_calibration(systems: Mapping[str, tuple], protocol, path=None, title=""):
    """Histograms of nearest-positive and nearest-negative distances for each system.

    systems: name -> (query, gallery). Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(systems), figsize=(4.2 * len(systems), 3.3),
                             constrained_layout=True, squeeze=False)
    for ax, (name, (q, g)) in zip(axes[0], systems.items(), strict=True):
        pos = nearest_distances(q, g, protocol, True)
        neg = nearest_distances(q, g, protocol, False)
        bins = 40
        ax.hist(pos, bins=bins, alpha=0.6, density=True, label="nearest relevant")
        ax.hist(neg, bins=bins, alpha=0.6, density=True, label="nearest irrelevant")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("Euclidean distance")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path, dpi=120)
    return fig


def plot_retrieval_examples(images, rows: Mapping[str, list], query_image, title: str = ""):
    """A query image and, per system, its merged top-k; frame colour = correct (green) or
    not (red), caption = the system that scored the item (old/new) and its distance."""
    import matplotlib.pyplot as plt

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
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
