"""The reward evaluation's measures on hand-made examples."""
import math

import pytest

from rlhf.preference_pairs import gold_weighted, labeller_weights
from reward.evaluate import (calibration, calibration_point, gold_accuracy, human_ceiling, observed_preference,
                             others_majority, win_probability)


def test_gold_accuracy_on_a_hand_made_example():
    scores_a = [1.0, 0.0, 2.0, 0.5, 3.0]
    scores_b = [0.0, 1.0, 1.0, 0.9, 0.0]
    expected = ["a", "a", "b", "b", "tie"]  # right, wrong, wrong, right; the tie item is not counted
    assert gold_accuracy(scores_a, scores_b, expected) == (0.5, 4)
    assert gold_accuracy([], [], []) == (None, 0)


def votes(*verdicts):
    return {"labeller_votes": [{"labeller": f"u{i}", "verdict": v, "strength": "clear"}
                               for i, v in enumerate(verdicts)]}


def test_human_ceiling_holds_out_each_vote_and_scores_the_model_on_the_same_units():
    assert others_majority(["chosen", "chosen"]) == "chosen"
    assert others_majority(["chosen", "rejected"]) is None and others_majority(["tie", "tie"]) is None
    pairs = [votes("chosen", "chosen", "chosen"),   # 3 units, every held-out vote agrees
             votes("chosen", "chosen", "rejected"),  # units: (c vs c|r: none), (c vs c|r: none), (r vs c,c: miss)
             votes("chosen", "rejected", "tie", "chosen"),  # others: r,t,c none; c,t,c -> c (r misses);
             #                                                c,r,c -> c, but a tie held out is no unit; c,r,t none
             votes("chosen", "chosen")]              # fewer than 3 votes: not counted
    gaps = [1.0, -1.0, 0.5, 1.0]
    result = human_ceiling(pairs, gaps)
    assert (result["ceiling_items"], result["ceiling_units"]) == (3, 5)
    assert result["human_ceiling"] == pytest.approx(3 / 5)
    # the model prefers chosen on items 1 and 3 (agrees with 'chosen' majorities: 3 + 1 units) and rejected on
    # item 2 (its one unit's majority is chosen: a miss)
    assert result["model_on_ceiling_units"] == pytest.approx(4 / 5)


def test_calibration_error_and_bins_by_hand():
    probabilities = [0.05, 0.15, 0.55, 0.6, 0.95, 1.0]
    outcomes = [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    ece, bins = calibration(probabilities, outcomes, bins=2)
    assert [b["count"] for b in bins] == [2, 4]
    low = abs(0.1 - 0.0)
    high = abs((0.55 + 0.6 + 0.95 + 1.0) / 4 - 0.75)
    assert ece == pytest.approx(2 / 6 * low + 4 / 6 * high)
    assert calibration([], [], 10) == (None, [])


def test_calibration_points_are_oriented_by_text_not_by_the_verdict():
    pair = {"chosen": [{"role": "assistant", "content": "B"}], "rejected": [{"role": "assistant", "content": "A"}],
            **votes("chosen", "chosen", "rejected")}
    predicted, observed = calibration_point(pair, 1.0, 0.0)  # "A" sorts first: it is the rejected response
    assert predicted == pytest.approx(1 - 1 / (1 + math.exp(-1))) and observed == pytest.approx(1 / 3)
    flipped = {**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]}
    assert calibration_point(flipped, 1.0, 0.0) == (pytest.approx(1 / (1 + math.exp(-1))), pytest.approx(2 / 3))


def test_win_probability_and_observed_preference():
    assert win_probability(0.0, 0.0) == pytest.approx(0.5)
    assert win_probability(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert 0.5 < win_probability(0.5, 1.0) < 1 / (1 + math.exp(-0.5)) * 1.2
    assert observed_preference(votes("chosen", "rejected", "tie", "chosen")) == pytest.approx(2 / 3)
    assert observed_preference({"labeller_votes": []}) == 1.0


def test_gold_weighting_can_overturn_a_head_count():
    gold = {"good": {"answered": 8, "correct": 8}, "bad1": {"answered": 8, "correct": 0},
            "bad2": {"answered": 8, "correct": 0}}
    weights = labeller_weights(gold)
    assert weights["good"] == pytest.approx(0.9) and weights["bad1"] == pytest.approx(0.1)
    row = {"id": "r", "chosen": "X", "rejected": "Y", "tie": False, "both_bad": False, "margin": 0.5,
           "labeller_votes": [{"labeller": "bad1", "verdict": "chosen", "strength": "slight"},
                              {"labeller": "bad2", "verdict": "chosen", "strength": "slight"},
                              {"labeller": "good", "verdict": "rejected", "strength": "clear"}]}
    decided = gold_weighted(row, weights)
    assert (decided["chosen"], decided["rejected"]) == ("Y", "X") and decided["margin"] == 1.0
    assert decided["weight"] == pytest.approx(0.9 / 3)
    assert [v["verdict"] for v in decided["labeller_votes"]] == ["rejected", "rejected", "chosen"]
    unseen = gold_weighted({**row, "labeller_votes": [{"labeller": "new", "verdict": "chosen",
                                                        "strength": "clear"}]}, weights)
    assert unseen["chosen"] == "X" and unseen["weight"] == pytest.approx(0.5)
