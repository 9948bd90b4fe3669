"""Results rows as pandas tables for the book: mean plus or minus the std over seeds, the
paper's numbers beside ours, the paper's conditions as check marks, the best value bold,
and differences smaller than their noise marked. (The CLI prints `rmlib.report`'s text.)

Explained in the book: book/table1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from rmlib.evaluation.curves import NOISE_FACTOR, row_conditions
from rmlib.report import auc_text, per_point_text, percent_text


def seed_values(row: Mapping, metric: str = "mAP") -> np.ndarray:
    """A row's per-seed AUCs (one value for a row that does not depend on the seed)."""
    return np.asarray(row.get(f"auc_{metric}_seeds", [row[f"auc_{metric}"]]), dtype=np.float64)


def difference(a: Mapping, b: Mapping, metric: str = "mAP") -> tuple[float, float]:
    """AUC(a) - AUC(b) and its std over seeds. Rows evaluated on the same seeds share the
    backfill order of each seed, so the difference is taken seed by seed (paired)."""
    va, vb = seed_values(a, metric), seed_values(b, metric)
    if len(va) == len(vb) and a.get("seeds") == b.get("seeds"):
        d = va - vb
    else:  # one side is seed-free: its single value against every seed of the other
        d = va[:, None] - vb[None, :]
    d = d.ravel()
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def _is_noise(mean: float, std: float) -> bool:
    return abs(mean) < NOISE_FACTOR * std


def backbone_difference(a: str, b: str, backbones: Mapping[str, Mapping],
                        metric: str = "mAP") -> float | None:
    """The std over backbone seeds of AUC(a) - AUC(b), paired by backbone seed, from the
    backbone-seeds study's rows; for a row outside the study, the largest such std of any
    two rows inside it (a conservative stand-in: no other backbones were trained for it);
    None without a study."""
    if not backbones:
        return None
    if a in backbones and b in backbones:
        va, vb = (np.asarray(backbones[n][f"auc_{metric}_by_backbone_seed"]) for n in (a, b))
        return float((va - vb).std(ddof=1)) if len(va) > 1 else 0.0
    inside = [n for n in backbones]
    return max((backbone_difference(x, y, backbones, metric) or 0.0)
               for i, x in enumerate(inside) for y in inside[i + 1:])


def within_noise(a: Mapping, b: Mapping, metric: str = "mAP",
                 backbone_std: float | None = None) -> bool:
    """True when AUC(a) - AUC(b) is smaller than NOISE_FACTOR times its std over seeds, or,
    given the difference's std over backbone seeds, than NOISE_FACTOR times the larger."""
    mean, std = difference(a, b, metric)
    return _is_noise(mean, max(std, backbone_std or 0.0))


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


METRIC_NAMES = {"mAP": "mAP", "top1": "top-1"}


def results_frame(rows: Mapping[str, Mapping], paper: Mapping | None = None) -> pd.DataFrame:
    """One line per row, numbers in %: AUC mAP and top-1 with their std, the Gain (and the
    Gain over New+rho where the row has it), conditions (6)-(8) on mAP and on top-1 (8 as
    the curve's largest drawdown, judged against the seeds' noise) and, if given, the
    paper's AUC mAP, AUC top-1 and Gain."""
    records = []
    for name, r in rows.items():
        record = {"row": name, "AUC mAP": 100 * r["auc_mAP"], "AUC top-1": 100 * r["auc_top1"],
                  "mAP std": 100 * r.get("auc_mAP_std", 0.0),
                  "top-1 std": 100 * r.get("auc_top1_std", 0.0), "seeds": len(r.get("seeds", [0])),
                  "Gain": 100 * r["gain"]}
        if "gain_upgraded" in r:
            record["Gain vs New+rho"] = 100 * r["gain_upgraded"]
        for metric, c in row_conditions(r).items():
            shown = METRIC_NAMES[metric]
            record.update({f"(6) {shown}": bool(c["cond6_M0_ge_old"]),
                           f"(7) {shown}": bool(c["cond7_M1_ge_new"]),
                           f"(8) {shown} fall": 100 * c["drawdown"],
                           f"(8) {shown}": bool(c["cond8_no_fall_beyond_noise"])})
        if paper is not None:
            p = paper.get(name)
            record.update({"paper AUC mAP": p[0] if p else np.nan,
                           "paper AUC top-1": p[1] if p else np.nan,
                           "paper Gain": p[2] if p else np.nan})
        records.append(record)
    return pd.DataFrame.from_records(records).set_index("row")


def order_with_ties(rows: Mapping[str, Mapping], metric: str = "mAP",
                    backbones: Mapping[str, Mapping] | None = None) -> dict[str, str]:
    """Each row's place by AUC (1 = best); a row within noise of the row just above it
    gets "≈" before its place: the order of the two is not established by this run. With
    the backbone-seeds study's rows, noise is the larger of the two spreads."""
    ranked = sorted(rows, key=lambda n: -rows[n][f"auc_{metric}"])
    places = {}
    for i, name in enumerate(ranked):
        tied = i > 0 and within_noise(
            rows[ranked[i - 1]], rows[name], metric,
            backbone_difference(ranked[i - 1], name, backbones or {}, metric))
        places[name] = ("≈" if tied else "") + str(i + 1)
    return places


def steps_frame(rows: Mapping[str, Mapping], metric: str = "mAP") -> pd.DataFrame:
    """An ablation's steps: each row's AUC change over the row before it, its std over
    seeds, and whether the change is within noise."""
    names = list(rows)
    records = []
    for before, name in zip(names, names[1:], strict=False):
        mean, std = difference(rows[name], rows[before], metric)
        records.append({"step": f"{before} → {name}", f"Δ AUC {metric}": 100 * mean,
                        "std": 100 * std, "within noise": _is_noise(mean, std)})
    return pd.DataFrame.from_records(records).set_index("step")


def _styled(shown: pd.DataFrame, caption: str, bold=None):
    """A table of the book: class "rmlib-results" (one line per cell, fits the column)."""
    styler = shown.style
    if bold is not None:
        styler = styler.apply(bold)
    styler = styler.set_table_attributes('class="rmlib-results"')
    return styler.set_caption(caption) if caption else styler


def styled_results(rows: Mapping[str, Mapping], caption: str = "",
                   backbones: Mapping[str, Mapping] | None = None):
    """The rows' AUC mAP and top-1 (mean ± std over seeds), Gain, and order by AUC mAP with
    ties within noise marked "≈" (with `backbones`, the backbone-seeds study's rows: within
    the larger of the two spreads); best AUC and Gain
    in bold. "Gain vs New+rho" appears only beside the New+rho row it is measured against.
    Conditions: `styled_conditions`; the paper's numbers: `styled_paper`."""
    frame = results_frame(rows)
    shown = pd.DataFrame(index=frame.index)
    shown["AUC mAP"] = [auc_text(rows[n], "mAP", " ± ") for n in frame.index]
    shown["AUC top-1"] = [auc_text(rows[n], "top1", " ± ") for n in frame.index]
    gains = ["Gain"] + (["Gain vs New+rho"] if "New+rho" in rows and "Gain vs New+rho" in frame
                        else [])
    for col in gains:
        shown[col] = frame[col].map(percent_text)
    shown["order"] = pd.Series(order_with_ties(rows, backbones=backbones))

    def bold_best(column: pd.Series) -> list[str]:
        source = frame[column.name] if column.name in ("AUC mAP", "AUC top-1", *gains) else None
        if source is None:
            return [""] * len(column)
        best = source[np.isfinite(source)].max() if np.isfinite(source).any() else None
        return ["font-weight: bold" if v == best else "" for v in source]

    return _styled(shown, caption, bold_best)


def styled_conditions(rows: Mapping[str, Mapping], caption: str = ""):
    """The paper's conditions (6)-(8) of each row, on mAP and on top-1: (6) M_0 at least the
    old system's, (7) M_1 at least the new system's, (8) the curve's largest fall from its
    best earlier value in points, ✗ where it exceeds the seeds' noise (any fall, for a row
    of one run)."""
    frame = results_frame(rows)
    columns = {}
    for metric in METRIC_NAMES.values():
        if f"(6) {metric}" not in frame:
            continue
        columns[("(6) M₀ ≥ Old", metric)] = frame[f"(6) {metric}"].map(_mark)
        columns[("(7) M₁ ≥ New", metric)] = frame[f"(7) {metric}"].map(_mark)
        columns[("(8) largest fall", metric)] = [
            f"{v:.2f} {_mark(ok)}" for v, ok in zip(frame[f"(8) {metric} fall"],
                                                   frame[f"(8) {metric}"], strict=True)]
    order = sorted(columns, key=lambda c: (c[0], c[1] != "mAP"))  # (6), (7), (8); mAP first
    shown = pd.DataFrame({c: columns[c] for c in order}, index=frame.index)
    return _styled(shown, caption)


def styled_paper(rows: Mapping[str, Mapping], paper: Mapping, caption: str = ""):
    """The paper's Table 1 values for the rows it has (AUC mAP, AUC CMC top-1, Gain), in a
    table of their own, to read beside ours."""
    names = [n for n in rows if n in paper]
    shown = pd.DataFrame({"AUC mAP": [f"{paper[n][0]:.1f}" for n in names],
                          "AUC top-1": [f"{paper[n][1]:.1f}" for n in names],
                          "Gain": [percent_text(paper[n][2]) for n in names]},
                         index=pd.Index(names, name="row"))
    return _styled(shown, caption)


def styled_steps(rows: Mapping[str, Mapping], caption: str = "", metric: str = "mAP"):
    """`steps_frame` for a page, changes within noise in grey."""
    frame = steps_frame(rows, metric)
    shown = pd.DataFrame(index=frame.index)
    shown[f"Δ AUC {metric}"] = [f"{d:+.2f} ± {s:.2f}" for d, s in
                                zip(frame[f"Δ AUC {metric}"], frame["std"], strict=True)]
    shown["within noise"] = frame["within noise"].map(lambda v: "yes" if v else "no")

    def grey(row: pd.Series) -> list[str]:
        return ["color: grey" if frame.loc[row.name, "within noise"] else ""] * len(row)

    styler = shown.style.apply(grey, axis=1).set_table_attributes('class="rmlib-results"')
    return styler.set_caption(caption) if caption else styler


def seeds_caption(rows: Mapping[str, Mapping], provenance: Mapping) -> str:
    """What the ± of a results table covers: the seeds, what they vary, and what they do not."""
    seeds = max((r.get("seeds", [0]) for r in rows.values()), key=len)
    backbones = provenance.get("config", {}).get("backbones", {})
    fixed = ", ".join(f"{role} seed {c['seed']}" for role, c in backbones.items() if "seed" in c)
    if len(seeds) < 2:
        return f"one run (seed {seeds[0]}): no spread is measured"
    return (f"mean ± std over seeds {', '.join(map(str, seeds))} of the backfill order, the "
            f"transforms' initialisation and batches and the calibration sample; one backbone "
            f"per role ({fixed or 'one seed each'}), so backbone variance is not covered")


def _order(rows: Mapping[str, Mapping], names: tuple[str, ...], values: Mapping) -> str:
    present = [n for n in names if n in rows and n in values]
    return " > ".join(sorted(present, key=lambda n: -values[n]))


def departures_frame(rows: Mapping[str, Mapping], paper: Mapping) -> pd.DataFrame:
    """The quantities where a run and the paper part ways, side by side (AUC mAP in points,
    Gains in %); "" where the paper has no such number."""
    auc = {n: 100 * r["auc_mAP"] for n, r in rows.items()}
    ref = {n: v[0] for n, v in paper.items()}
    baselines = ("BCT", "FCT", "BiCT")
    lines = [
        ("Old model, AUC mAP", auc["Old"], ref.get("Old")),
        ("New model, AUC mAP", auc["New"], ref.get("New")),
        ("New − Old (the Gain's denominator)", auc["New"] - auc["Old"],
         ref["New"] - ref["Old"] if "New" in ref else None),
        ("RM_naive − Old", auc["RM_naive"] - auc["Old"], ref["RM_naive"] - ref["Old"]
         if "RM_naive" in ref else None),
    ]
    if "RM_naive+cal" in auc:
        lines.append(("RM_naive+cal − RM_naive (calibration alone)",
                      auc["RM_naive+cal"] - auc["RM_naive"], None))
    if "New+rho" in auc:
        lines.append(("New+rho − New (rho improves the new model)", auc["New+rho"] - auc["New"],
                      None))
    lines.append(("RM Gain over New, %", 100 * rows["RM"]["gain"],
                  paper["RM"][2] if "RM" in paper else None))
    if "gain_upgraded" in rows["RM"]:
        lines.append(("RM Gain over New+rho, %", 100 * rows["RM"]["gain_upgraded"], None))
    frame = pd.DataFrame(lines, columns=["quantity", "this run", "paper"]).set_index("quantity")
    frame["this run"] = frame["this run"].map(lambda v: f"{v:.2f}")
    frame["paper"] = frame["paper"].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.1f}")
    frame.loc["baselines by AUC mAP"] = [_order(rows, baselines, auc),
                                         _order(rows, baselines, ref)]
    return frame


def run_frame(provenance: Mapping, backbones: Mapping | None = None) -> pd.DataFrame:
    """Where the time of the run behind a results file went, in seconds and minutes: each
    backbone's training and each transform's fits (all seeds together), as recorded when
    they were made (a later run that read them from the cache does not count its cache
    reads), the other steps of this run, and the wall time of the results files."""
    steps: dict[str, float] = {}
    for role, seconds in provenance.get("backbone_train_seconds", {}).items():
        steps[f"train backbone {role}"] = seconds
    fits: dict[str, list[float]] = {}
    for key, seconds in provenance.get("transform_fit_seconds", {}).items():
        fits.setdefault(key.split("@")[0], []).append(seconds)
    for name, seconds in fits.items():
        steps[f"fit transform {name} ({len(seconds)} seed{'s' * (len(seconds) > 1)})"] = \
            sum(seconds)
    for key, seconds in provenance.get("step_seconds", {}).items():
        if not key.startswith(("backbone_", "transform_")):  # those: cache reads here
            steps[f"{key.replace('_', ' ')} (this run)"] = seconds
    steps["this results file (wall)"] = provenance.get("wall_time_s", 0.0)
    wall = (backbones or {}).get("provenance", {}).get("wall_time_s")
    if wall:
        steps["backbones.json run (wall)"] = wall
    frame = pd.DataFrame({"seconds": pd.Series(steps, dtype=np.float64)}).rename_axis("step")
    frame["minutes"] = frame["seconds"] / 60
    return frame.round(1)


def comparisons_frame(rows: Mapping[str, Mapping],
                      questions: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Each (question, a, b), read "does a beat b?": AUC mAP of a minus b in points, its std
    over seeds (paired by seed), and the answer the table can back: "yes" or "no" when the
    difference exceeds its noise (by its sign), "within noise" when it does not."""
    records = []
    for question, a, b in questions:
        mean, std = difference(rows[a], rows[b])
        answer = "within noise" if _is_noise(mean, std) else ("yes" if mean > 0 else "no")
        records.append({"question": question, "difference": f"{a} − {b}",
                        "Δ AUC mAP (points)": f"{100 * mean:+.2f} ± {100 * std:.2f}",
                        "answer": answer})
    return pd.DataFrame.from_records(records).set_index("question")


def external_frame(entry: Mapping):
    """One entry of `rmlib.methods.registry.external_results` as a small captioned table:
    its rows in its metric, with its protocol and where the numbers were quoted from."""
    frame = pd.DataFrame({entry["metric"]: [f"{v:.1f}" for v in entry["rows"].values()]},
                         index=list(entry["rows"]))
    return frame.style.set_caption(f"{entry['protocol']} ({entry['quoted']})")


def part_distances_frame(rows: Mapping[str, Mapping]):
    """Each row's geometry (`part_distances`, rmlib.evaluation.geometry): the median distance
    from a new query to each part's relevant and irrelevant items, and how often an
    irrelevant item of one part is closer than a relevant item of the other."""
    frame = pd.DataFrame({
        name: {"new rel.": d["new relevant"], "new irr.": d["new irrelevant"],
               "old rel.": d["old relevant"], "old irr.": d["old irrelevant"],
               "new irr. < old rel.": d["new irrelevant closer than old relevant"],
               "old irr. < new rel.": d["old irrelevant closer than new relevant"]}
        for name, row in rows.items() for d in [row["part_distances"]]}).T
    return frame.style.format("{:.2f}", subset=list(frame.columns[:4])).format(
        "{:.0%}", subset=list(frame.columns[4:])).set_caption(
        "median distances from a query to each part's relevant and irrelevant items, and "
        "how often an irrelevant item of one part is closer than a relevant item of the other")


def chain_frame(rows: Mapping[str, Mapping], caption: str = ""):
    """The upgrade chain's strategies at one t1 (`rmlib.methods.chain`): AUC mAP over the
    whole period (mean ± std over seeds), mean negative flips against M1, items
    re-embedded (x N), re-embeddings per AUC point above M1, and the cross-model searches
    each serves; the best AUC and the fewest re-embeddings per point in bold. (Top-1 is
    in the results file: six columns fit the book's column, seven do not.)"""
    shown = pd.DataFrame(index=list(rows))
    shown["AUC mAP"] = [auc_text(r, "mAP", " ± ") for r in rows.values()]
    shown["flips"] = [f"{100 * r['auc_nfr']:.1f}%" for r in rows.values()]
    shown["re-embedded"] = [f"{r['re_embedded_N']:.2f} N" for r in rows.values()]
    shown["per point"] = [per_point_text(r) for r in rows.values()]
    shown["serves"] = [", ".join(r["served_cross_searches"]) or "none"
                       for r in rows.values()]
    auc = pd.Series({name: r["auc_mAP"] for name, r in rows.items()})
    cost = pd.Series({name: r["re_embeddings_per_point"] for name, r in rows.items()})

    def bold_best(column: pd.Series) -> list[str]:
        source = {"AUC mAP": auc, "per point": -cost}.get(column.name)
        if source is None:
            return [""] * len(column)
        best = source[np.isfinite(source)].max() if np.isfinite(source).any() else None
        return ["font-weight: bold" if v == best else "" for v in source]

    return _styled(shown, caption, bold_best)
