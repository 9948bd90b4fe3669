"""Tables for the book: mean and std over seeds, paired differences, ties within noise."""

import pytest

from rmlib.tables import (
    difference,
    order_with_ties,
    results_frame,
    steps_frame,
    styled_conditions,
    styled_paper,
    styled_results,
    within_noise,
)


def row(seed_aucs, gain=0.5, mAP=None, top1=None, old=0.2, new=0.4, curve_std=0.0):
    """A results row with per-seed AUCs (mAP and top-1 alike) and its mean curves (flat at
    the mean AUC unless given), judged against the old and new models' `old` and `new`."""
    mean = sum(seed_aucs) / len(seed_aucs)
    std = (sum((a - mean) ** 2 for a in seed_aucs) / (len(seed_aucs) - 1)) ** 0.5 \
        if len(seed_aucs) > 1 else 0.0
    mAP = list(mAP or [mean] * 3)
    top1 = list(top1 or mAP)
    n = len(mAP)
    out = {"auc_mAP": mean, "auc_top1": mean, "gain": gain, "seeds": list(range(len(seed_aucs))),
           "t": [i / (n - 1) for i in range(n)], "mAP": mAP, "top1": top1, "top5": top1,
           "nfr": [0.0] * n, "mAP_std": [curve_std] * n, "top1_std": [curve_std] * n,
           "conditions": {m: {"old": old, "new": new} for m in ("mAP", "top1")}}
    if len(seed_aucs) > 1:
        out.update(auc_mAP_seeds=list(seed_aucs), auc_top1_seeds=list(seed_aucs),
                   auc_mAP_std=std, auc_top1_std=std)
    return out


def test_a_consistent_paired_difference_is_established_even_with_a_large_spread():
    # seed by seed b beats a by 0.01, though each row spreads by 0.1 over seeds
    a, b = row([0.30, 0.40, 0.50]), row([0.31, 0.41, 0.51])
    mean, std = difference(b, a)
    assert mean == pytest.approx(0.01) and std == pytest.approx(0.0, abs=1e-12)
    assert not within_noise(b, a)


def test_a_difference_that_changes_sign_over_seeds_is_within_noise():
    a, b = row([0.30, 0.40, 0.50]), row([0.33, 0.38, 0.51])
    assert within_noise(a, b) and within_noise(b, a)


def test_a_seed_free_row_is_compared_with_every_seed_of_the_other():
    old, method = row([0.20]), row([0.19, 0.21, 0.20])
    mean, std = difference(method, old)
    assert mean == pytest.approx(0.0, abs=1e-12) and std == pytest.approx(0.01)
    assert within_noise(method, old)


def test_order_marks_ties_within_noise():
    rows = {"Old": row([0.05]), "A": row([0.30, 0.40, 0.50]), "B": row([0.33, 0.38, 0.51]),
            "C": row([0.60, 0.61, 0.62])}
    assert order_with_ties(rows) == {"C": "1", "B": "2", "A": "≈3", "Old": "4"}



def test_a_difference_established_over_seeds_can_fall_within_the_backbones_spread():
    from rmlib.tables import backbone_difference

    rows = {"A": row([0.40, 0.41, 0.42]), "B": row([0.43, 0.44, 0.45]), "C": row([0.30])}
    assert order_with_ties(rows) == {"B": "1", "A": "2", "C": "3"}  # 3 points, std 0
    backbones = {"A": {"auc_mAP_by_backbone_seed": [0.41, 0.46, 0.39]},
                 "B": {"auc_mAP_by_backbone_seed": [0.44, 0.43, 0.45]}}
    std = backbone_difference("B", "A", backbones)
    assert std == pytest.approx(float(__import__("numpy").std([0.03, -0.03, 0.06], ddof=1)))
    assert order_with_ties(rows, backbones=backbones) == {"B": "1", "A": "≈2", "C": "3"}
    # C was not retrained: the largest backbone spread measured stands in for it
    assert backbone_difference("A", "C", backbones) == pytest.approx(std)
    backbones["D"] = {"auc_mAP_by_backbone_seed": [0.30, 0.50, 0.20]}  # the widest pair: B, D
    widest = float(__import__("numpy").std([0.14, -0.07, 0.25], ddof=1))
    assert backbone_difference("A", "C", backbones) == pytest.approx(widest)
    assert backbone_difference("A", "B", {}) is None

def test_steps_frame_flags_each_step_against_the_one_before():
    rows = {"base": row([0.30, 0.40, 0.50]), "+x": row([0.33, 0.38, 0.51]),
            "+y": row([0.43, 0.48, 0.61])}
    frame = steps_frame(rows)
    assert list(frame["within noise"]) == [True, False]
    assert frame.loc["+x → +y", "Δ AUC mAP"] == pytest.approx(10.0)


def test_html_table_has_every_row_mean_std_on_one_cell_and_the_best_in_bold():
    rows = {"Old": row([0.20]), "BCT": row([0.25, 0.27, 0.26]),
            "RM": row([0.40, 0.42, 0.41], gain=1.3)}
    assert list(results_frame(rows).index) == ["Old", "BCT", "RM"]
    html = styled_results(rows, caption="Table 1").to_html()
    for text in ("41.00 ± 1.00", "26.00 ± 1.00", "20.00", "130%", "Table 1",
                 "font-weight: bold", 'class="rmlib-results"'):
        assert text in html, text
    shown = styled_results(rows).data  # the shown strings, not the numbers
    assert shown.loc["RM", "order"] == "1"
    assert "paper AUC mAP" not in shown and "(6) M₀ ≥ Old" not in shown  # tables of their own


def test_gain_over_new_rho_appears_only_beside_the_new_rho_row():
    rm = {**row([0.40, 0.42, 0.41], gain=1.3), "gain_upgraded": 0.7}
    assert "Gain vs New+rho" not in styled_results({"Old": row([0.2]), "RM": rm}).data
    shown = styled_results({"RM": rm, "New+rho": {**row([0.5]), "gain_upgraded": 1.0}}).data
    assert shown.loc["RM", "Gain vs New+rho"] == "70%"


def test_an_undefined_gain_shows_a_dash_not_nan():
    shown = styled_results({"Old": row([1.0], gain=float("nan"))}).data
    assert shown.loc["Old", "Gain"] == "—"


def test_condition_8_is_the_largest_fall_from_the_best_earlier_value():
    # small steps down add up: the largest step is 2 points, the fall from the top 8
    sliding = row([0.3], mAP=[0.30, 0.28, 0.26, 0.24, 0.22, 0.30])
    rows = {"sliding": sliding, "flat": row([0.3])}
    frame = results_frame(rows)
    assert frame.loc["sliding", "(8) mAP fall"] == pytest.approx(8.0)
    assert not frame.loc["sliding", "(8) mAP"] and frame.loc["flat", "(8) mAP"]
    shown = styled_conditions(rows).data
    assert shown.loc["sliding", ("(8) largest fall", "mAP")] == "8.00 ✗"
    assert shown.loc["flat", ("(8) largest fall", "top-1")] == "0.00 ✓"


def test_a_fall_within_the_seeds_noise_passes_condition_8_and_a_larger_one_fails():
    dip = [0.30, 0.29, 0.31]  # falls by 1 point
    noisy = results_frame({"r": row([0.3, 0.31, 0.29], mAP=dip, curve_std=0.01)})
    quiet = results_frame({"r": row([0.3, 0.31, 0.29], mAP=dip, curve_std=0.002)})
    assert noisy.loc["r", "(8) mAP"] and not quiet.loc["r", "(8) mAP"]


def test_conditions_are_checked_on_top1_as_well_as_map():
    # mAP starts above the old model's, top-1 below it: (6) holds on mAP only
    r = row([0.3], mAP=[0.25, 0.30, 0.45], top1=[0.15, 0.30, 0.45], old=0.2, new=0.4)
    shown = styled_conditions({"BCT": r}).data
    assert shown.loc["BCT", ("(6) M₀ ≥ Old", "mAP")] == "✓"
    assert shown.loc["BCT", ("(6) M₀ ≥ Old", "top-1")] == "✗"


def test_the_papers_numbers_are_a_table_of_their_own_for_the_rows_it_has():
    rows = {"Old": row([0.20]), "New+rho": row([0.5]), "RM": row([0.40, 0.42, 0.41])}
    paper = {"Old": [21.6, 34.3, 0], "RM": [41.4, 60.7, 78]}
    shown = styled_paper(rows, paper).data
    assert list(shown.index) == ["Old", "RM"]
    assert shown.loc["RM"].tolist() == ["41.4", "60.7", "78%"]


def test_the_run_table_counts_fits_and_training_when_they_were_made_not_cache_reads():
    from rmlib.tables import run_frame

    prov = {"step_seconds": {"backbone_old": 0.2, "transform_rqt": 0.01,
                             "hyperparameter_selection": 14.7},
            "backbone_train_seconds": {"old": 420.0},
            "transform_fit_seconds": {"rqt": 15.0, "rqt@seed1": 14.0}, "wall_time_s": 336.0}
    frame = run_frame(prov)
    assert frame.loc["train backbone old", "seconds"] == 420.0
    assert frame.loc["fit transform rqt (2 seeds)", "seconds"] == 29.0
    assert frame.loc["hyperparameter selection (this run)", "seconds"] == 14.7
    assert not any("transform_rqt" in s or "backbone_old" in s for s in frame.index)


def test_departures_put_the_run_beside_the_paper_and_say_what_the_paper_lacks():
    from rmlib.tables import departures_frame

    rows = {"Old": row([0.20]), "New": row([0.40]), "RM_naive": row([0.18, 0.19, 0.20]),
            "BCT": row([0.25]), "FCT": row([0.35]), "BiCT": row([0.30]),
            "RM": row([0.45, 0.46, 0.47], gain=1.3), "New+rho": row([0.50]),
            "RM_naive+cal": row([0.26, 0.27, 0.28])}
    rows["RM"]["gain_upgraded"] = 0.87
    paper = {"Old": [21.6, 34.3, 0], "New": [47.4, 62.6, 100], "RM_naive": [30.8, 49.1, 36],
             "BCT": [26.4, 43.5, 19], "FCT": [27.1, 49.4, 21], "BiCT": [29.0, 48.3, 29],
             "RM": [41.4, 60.7, 78]}
    frame = departures_frame(rows, paper)
    assert frame.loc["New − Old (the Gain's denominator)"].tolist() == ["20.00", "25.8"]
    assert frame.loc["RM_naive+cal − RM_naive (calibration alone)", "paper"] == ""
    assert frame.loc["RM_naive+cal − RM_naive (calibration alone)", "this run"] == "8.00"
    assert frame.loc["RM Gain over New+rho, %", "this run"] == "87.00"
    assert frame.loc["baselines by AUC mAP"].tolist() == ["FCT > BiCT > BCT",
                                                          "BiCT > FCT > BCT"]


def test_the_caption_says_what_the_seeds_vary_and_what_they_do_not():
    from rmlib.tables import seeds_caption

    prov = {"config": {"backbones": {"old": {"seed": 0}, "new": {"seed": 1}}}}
    caption = seeds_caption({"RM": row([0.4, 0.5, 0.6]), "Old": row([0.2])}, prov)
    assert "seeds 0, 1, 2" in caption and "old seed 0, new seed 1" in caption
    assert "backbone variance is not covered" in caption
    assert seeds_caption({"Old": row([0.2])}, prov).startswith("one run")


def test_comparisons_answer_by_the_sign_of_an_established_difference():
    from rmlib.tables import comparisons_frame

    rows = {"A": row([0.30, 0.40, 0.50]), "B": row([0.31, 0.41, 0.51]),
            "C": row([0.33, 0.38, 0.51])}
    frame = comparisons_frame(rows, [("does B beat A?", "B", "A"), ("does A beat B?", "A", "B"),
                                     ("does C beat A?", "C", "A")])
    assert frame["answer"].tolist() == ["yes", "no", "within noise"]
    assert frame.loc["does A beat B?", "Δ AUC mAP (points)"].startswith("-1.00")
