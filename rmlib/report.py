"""Text for the terminal: the summary of a backfill, Table 1 beside the paper, and the line
that says which run made a results file. (Figures: `rmlib.figures`; HTML tables:
`rmlib.tables`.)

Explained in the book: book/table1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from rmlib.evaluation.curves import BackfillCurve, row_conditions


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
                f"(8) largest fall {100 * c['drawdown']:.2f} pts "
                f"(t {c['drawdown_from_t']:.2f} -> {c['drawdown_to_t']:.2f}) "
                f"{'ok' if c['cond8_no_fall_beyond_noise'] else 'VIOLATED'}")
    return "\n".join(lines)


def percent_text(value: float) -> str:
    """A Gain in %, or "—" where it is undefined (the new model no better than the old)."""
    return f"{value:.0f}%" if math.isfinite(value) else "—"


def auc_text(row: Mapping, metric: str, sep: str = "±") -> str:
    """'34.23' or, over several seeds, '34.23±0.12' (std over seeds)."""
    text = f"{100 * row[f'auc_{metric}']:.2f}"
    if len(row.get("seeds", ())) > 1:
        text += f"{sep}{100 * row[f'auc_{metric}_std']:.2f}"
    return text


def table1_text(rows: Mapping[str, Mapping], paper: Mapping | None = None) -> str:
    """Table 1 as fixed-width text: ours (AUC_mAP, AUC_CMC top-1 with their std over
    seeds, Gain) beside the paper's."""
    width = max([12, *map(len, rows)])
    head = f"{'':{width}} {'AUC_mAP':>11} {'AUC_CMC':>11} {'Gain':>6}"
    if paper:
        head += f"   | paper: {'AUC_mAP':>7} {'AUC_CMC':>7} {'Gain':>5}"
    lines = [head + f"  {'max mAP fall':>12}"]
    for name, r in rows.items():
        line = (f"{name:{width}} {auc_text(r, 'mAP'):>11} {auc_text(r, 'top1'):>11} "
                f"{percent_text(100 * r['gain']):>6}")
        if paper:
            p = paper.get(name)
            line += (f"   |        {p[0]:7.1f} {p[1]:7.1f} {p[2]:4.0f}%" if p else
                     "   |" + " " * 28)
        fall = row_conditions(r)["mAP"]["drawdown"]
        lines.append(line + f"  {100 * fall:10.2f} pt")
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


def per_point_text(row: Mapping) -> str:
    """Re-embeddings per AUC point above M1, or "no gain" when the AUC is not above it."""
    value = row["re_embeddings_per_point"]
    return f"{value:,.0f}" if math.isfinite(value) else "no gain"


def chain_text(result: Mapping) -> str:
    """The upgrade-chain study as fixed-width text: for each t1, each strategy's AUC mAP
    and top-1 over the period (mean ± std over seeds), mean negative flips against M1 and
    re-embeddings per AUC point above M1; then the chain's average compatibility for each
    set of maps."""
    third = result["third_model"]
    lines = [f"M3: {third['chosen']} (held-out mAP " + ", ".join(
        f"{n} {100 * v:.2f}" for n, v in third["held_out_mAP"].items())
        + f"); test mAP M1 {100 * result['searches']['M1']['mAP']:.2f}, M2 "
        f"{100 * result['searches']['M2']['mAP']:.2f}, M3 {100 * third['test_mAP']:.2f}"]
    for t1, rows in result["t1"].items():
        lines.append(f"M3 arrives at t1 = {t1}:")
        lines.append(f"  {'':26} {'AUC_mAP':>11} {'AUC_CMC':>11} {'NFR':>6} "
                     f"{'re-emb./pt':>10}")
        for name, r in rows.items():
            lines.append(f"  {name:26} {auc_text(r, 'mAP'):>11} {auc_text(r, 'top1'):>11} "
                         f"{100 * r['auc_nfr']:5.2f}% {per_point_text(r):>10}")
    for ac in result["average_compatibility"].values():
        lines.append(f"average compatibility {ac['AC']:.2f} with {ac['maps']}")
    return "\n".join(lines)
