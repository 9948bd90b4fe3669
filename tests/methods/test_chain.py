"""The upgrade chain's pieces: the third model's candidates, the period curves, their AUC,
the re-embeddings and the average compatibility (the study itself runs end to end in
tests/methods/test_studies.py)."""

import numpy as np
import pytest

from rmlib.engine.backbones import BackboneConfig
from rmlib.evaluation.curves import BackfillCurve
from rmlib.methods.chain import (
    CROSS_SEARCHES,
    PERIOD,
    SEARCHES,
    SERVED_PAIRS,
    STRATEGIES,
    STRATEGY_MAPS,
    THIRD_ROLE,
    average_compatibility,
    period_auc,
    period_curve,
    re_embeddings,
    third_candidates,
)


def flat(value: float, nfr: float = 0.0) -> BackfillCurve:
    t = np.linspace(0, 1, 5).tolist()
    return BackfillCurve(t, [value] * 5, [value] * 5, [value] * 5, [nfr] * 5)


def rising(start: float, stop: float) -> BackfillCurve:
    t = np.linspace(0, 1, 5)
    values = (start + (stop - start) * t).tolist()
    return BackfillCurve(t.tolist(), values, values, values, [0.0] * 5)


def test_the_candidates_are_longer_or_wider_than_the_new_model_and_nothing_else():
    new = BackboneConfig(widths=(64, 128, 256), epochs=14, low_res_epochs=11, seed=1)
    longer, wider = third_candidates(new).values()
    assert (longer.epochs, longer.low_res_epochs, longer.widths) == (21, 16, (64, 128, 256))
    assert longer.run_dir("r").name.startswith("third-less-50-per-class-")  # its subset named
    assert (wider.epochs, wider.widths) == (14, (80, 160, 320))
    for candidate in (longer, wider):
        assert candidate.role == THIRD_ROLE and candidate.dim == new.dim
        assert candidate.seed not in (0, 1, 2, 3, 4, 5)  # no other backbone's start
        assert candidate.num_classes == new.num_classes and candidate.lr == new.lr


def test_a_period_curve_joins_the_two_backfills_and_holds_the_end_until_the_period_ends():
    first, second = rising(0.2, 0.4), rising(0.3, 0.6)
    restart = period_curve(first, 0.5, second)
    assert restart["x"] == [0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    assert restart["mAP"][:3] == pytest.approx([0.2, 0.25, 0.3])  # the first to t1
    assert restart["mAP"][3:8] == pytest.approx([0.3, 0.375, 0.45, 0.525, 0.6])
    assert restart["mAP"][-1] == restart["mAP"][-2]  # all re-embedded: held to the end
    finish = period_curve(first, 0.5, second, finish=first)
    assert finish["x"] == [0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert finish["mAP"][3:6] == pytest.approx([0.3, 0.35, 0.4])  # the first one finished
    assert finish["x"][-1] == PERIOD


def test_period_auc_is_the_mean_height_and_counts_a_jump_at_t1_once():
    assert period_auc(period_curve(flat(0.3), 0.25, flat(0.3)), "mAP") == pytest.approx(0.3)
    # at 0.2 until t1 = 0.5, then at 0.6: (0.5 * 0.2 + 1.5 * 0.6) / 2
    jump = period_curve(flat(0.2), 0.5, flat(0.6))
    assert period_auc(jump, "mAP") == pytest.approx((0.5 * 0.2 + 1.5 * 0.6) / 2)
    assert period_auc(period_curve(flat(0.2), 0.5, flat(0.6), finish=flat(0.2)), "mAP") \
        == pytest.approx((1.0 * 0.2 + 1.0 * 0.6) / 2)


def test_finishing_first_re_embeds_the_rest_of_the_first_backfill_too():
    assert re_embeddings("finish first", 0.25) == 2.0
    assert re_embeddings("restart", 0.25) == 1.25
    assert re_embeddings("3-system RM", 0.75) == 1.75


def test_average_compatibility_is_the_share_of_pairs_whose_cross_search_beats_the_own():
    scores = dict.fromkeys(SEARCHES, 0.1)
    scores.update({"M1": 0.2, "M1 by psi_21": 0.25, "M1 by psi_31": 0.3,
                   "M1 by psi_21 psi_32": 0.15, "M2 by rho_2": 0.4, "M2 by psi_32": 0.45})
    direct = average_compatibility("direct", scores)
    assert direct["AC"] == 1.0 and all(p["compatible"] for p in direct["pairs"].values())
    composed = average_compatibility("composed", scores)
    assert composed["AC"] == pytest.approx(2 / 3) and not composed["pairs"]["1-3"]["compatible"]
    assert average_compatibility("naive", scores)["AC"] == 0.0
    assert {s for pairs in CROSS_SEARCHES.values() for p in pairs.values() for s in p} \
        <= set(SEARCHES)
    # the maps each strategy trains; the searches it serves are among them
    assert STRATEGY_MAPS == {"finish first": "composed", "restart": "composed",
                             "3-system naive": "naive", "3-system RM": "direct",
                             "3-system RM, composed psi": "composed"}
    assert SERVED_PAIRS["3-system naive"] == () and SERVED_PAIRS["restart"] == ("1-2",)
    assert set(SERVED_PAIRS) == set(STRATEGIES)


def test_t1_must_be_a_point_of_the_grid():
    with pytest.raises(ValueError, match="not a point"):
        period_curve(flat(0.2), 0.33, flat(0.3))
