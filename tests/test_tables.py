"""Tables for the book: mean and std over seeds, paired differences, ties within noise."""

import pytest

from rmlib.tables import (
    difference,
    order_with_ties,
    results_frame,
    steps_frame,
    styled_results,
    within_noise,
)


def row(seed_aucs, gain=0.5, drop=0.0):
    """A results row with per-seed AUCs (mAP and top-1 alike)."""
    mean = sum(seed_aucs) / len(seed_aucs)
    std = (sum((a - mean) ** 2 for a in seed_aucs) / (len(seed_aucs) - 1)) ** 0.5 \
        if len(seed_aucs) > 1 else 0.0
    out = {"auc_mAP": mean, "auc_top1": mean, "gain": gain, "seeds": list(range(len(seed_aucs))),
           "conditions": {"mAP": {"cond6_M0_ge_old": True, "cond7_M1_ge_new": drop == 0,
                                  "max_drop": drop}}}
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


def test_steps_frame_flags_each_step_against_the_one_before():
    rows = {"base": row([0.30, 0.40, 0.50]), "+x": row([0.33, 0.38, 0.51]),
            "+y": row([0.43, 0.48, 0.61])}
    frame = steps_frame(rows)
    assert list(frame["within noise"]) == [True, False]
    assert frame.loc["+x → +y", "Δ AUC mAP"] == pytest.approx(10.0)


def test_html_table_has_every_row_mean_std_marks_and_the_best_in_bold():
    rows = {"Old": row([0.20]), "BCT": row([0.25, 0.27, 0.26], drop=0.1),
            "RM": row([0.40, 0.42, 0.41], gain=1.3)}
    paper = {"Old": [21.6, 34.3, 0], "RM": [41.4, 60.7, 78]}
    frame = results_frame(rows, paper)
    assert list(frame.index) == ["Old", "BCT", "RM"]
    html = styled_results(rows, paper, caption="Table 1").to_html()
    for text in ("41.00 ± 1.00", "26.00 ± 1.00", "20.00", "✓", "✗", "78%", "Table 1",
                 "font-weight: bold"):
        assert text in html, text
    styles = styled_results(rows, paper).data  # the shown strings, not the numbers
    assert styles.loc["RM", "order"] == "1" and styles.loc["BCT", "(7) M1 ≥ New"] == "✗"
    assert styles.loc["BCT", "paper AUC mAP"] == ""


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
