"""Tables and figures show the spread over seeds where a row has it."""

import matplotlib

matplotlib.use("Agg")

from rmlib.figures import plot_curves  # noqa: E402
from rmlib.methods.reproduce import curve_of  # noqa: E402
from rmlib.report import table1_text  # noqa: E402


def row(auc, std=None, seeds=(0,)):
    t = [i / 20 for i in range(21)]
    out = {"t": t, "mAP": [auc] * 21, "top1": [auc] * 21, "top5": [auc] * 21,
           "nfr": [0.0] * 21, "auc_mAP": auc, "auc_top1": auc, "gain": 0.5,
           "seeds": list(seeds),
           "conditions": {m: {"old": 0.2, "new": 0.4} for m in ("mAP", "top1")}}
    if std is not None:
        out.update(auc_mAP_std=std, auc_top1_std=std, mAP_std=[std] * 21, top1_std=[std] * 21)
    return out


def test_table_shows_mean_and_std_over_seeds():
    text = table1_text({"Old": row(0.2), "RM_naive+cal": row(0.3, 0.0123, (0, 1, 2))},
                       {"Old": [21.6, 34.3, 0]})
    old, cal = text.splitlines()[1:]
    assert "20.00" in old and "±" not in old
    assert "30.00±1.23" in cal and cal.startswith("RM_naive+cal")


def test_curves_with_a_spread_are_drawn_with_bands():
    fig = plot_curves({"one seed": curve_of(row(0.2)),
                       "three seeds": curve_of(row(0.3, 0.01, (0, 1, 2)))})
    # one band on mAP and on top-1 (the three-seed curve's), none on negative flips
    assert [len(ax.collections) for ax in fig.axes] == [1, 1, 0]


def test_figures_are_drawn_for_the_books_column_with_a_colour_per_method():
    from rmlib.figures import COLUMN_WIDTH, DPI, FONT_SIZE, METHOD_STYLE

    fig = plot_curves({"RM": curve_of(row(0.4)), "Old": curve_of(row(0.2))})
    assert fig.get_figwidth() <= COLUMN_WIDTH and fig.dpi == DPI
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["RM"].get_color() == METHOD_STYLE["RM"][0]
    assert lines["Old"].get_color() == METHOD_STYLE["Old"][0]
    sizes = [t.get_fontsize() for ax in fig.axes for t in ax.get_xticklabels()]
    sizes += [t.get_fontsize() for t in fig.legends[0].get_texts()]
    assert min(sizes) >= FONT_SIZE
