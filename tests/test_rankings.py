"""K-wise rankings (rlhf/rankings.py) worked by hand: a ranking to its pairs, the Plackett-Luce loss
(rlhf/preference_loss.py), Kendall's tau-b and the agreement of several labellers' rankings."""
import math
import re

import pytest
import torch

from rlhf.preference_loss import mean_plackett_luce_loss, plackett_luce_loss, preference_loss
from rlhf.rankings import (check_ranks, kendall_tau_b, pair_weight, ranking_agreement, ranking_pairs,
                           ranks_from_order)


def test_a_ranking_gives_every_pair_better_first_with_ties_kept_as_ties():
    assert ranking_pairs([1, 2, 2, 3]) == [(0, 1, False), (0, 2, False), (0, 3, False), (1, 2, True),
                                           (1, 3, False), (2, 3, False)]
    assert ranking_pairs([3, 1, 2]) == [(1, 0, False), (2, 0, False), (1, 2, False)]
    assert ranking_pairs([2, 9]) == [(0, 1, False)]  # only the order counts
    assert pair_weight(4) == pytest.approx(1 / 6) and pair_weight(2) == 1.0


@pytest.mark.parametrize("ranks", [[1], [1, 2, 3, 4, 5, 6, 7], [0, 1], [1.5, 2], [True, 2]])
def test_a_ranking_of_the_wrong_size_or_with_odd_ranks_is_refused(ranks):
    with pytest.raises(ValueError):
        check_ranks(ranks)


def test_plackett_luce_loss_by_hand():
    # rewards 2, 1, 0 in the order given: -[(2 - log(e^2 + e + 1)) + (1 - log(e + 1)) + 0]
    by_hand = math.log(math.e ** 2 + math.e + 1) - 2 + math.log(math.e + 1) - 1
    assert by_hand == pytest.approx(0.720868, abs=1e-6)
    assert plackett_luce_loss(torch.tensor([2.0, 1.0, 0.0]), [1, 2, 3]).item() == pytest.approx(by_hand, abs=1e-6)
    # the same rewards with the order reversed cost more
    assert plackett_luce_loss(torch.tensor([2.0, 1.0, 0.0]), [3, 2, 1]).item() > by_hand + 2
    # two tied at the top of three equal rewards: each chosen against all three (Breslow), the last alone: 2 log 3
    assert plackett_luce_loss(torch.zeros(3), [1, 1, 2]).item() == pytest.approx(2 * math.log(3), abs=1e-6)


def test_plackett_luce_of_two_answers_is_the_bradley_terry_pair_loss_and_has_gradients():
    rewards = torch.tensor([0.3, 1.1], requires_grad=True)
    loss = plackett_luce_loss(rewards, [2, 1])
    assert loss.item() == pytest.approx(preference_loss(rewards[1:], rewards[:1]).item(), abs=1e-6)
    loss.backward()
    assert rewards.grad[0] > 0 > rewards.grad[1]  # descent raises the preferred answer's reward
    mean = mean_plackett_luce_loss([torch.tensor([2.0, 1.0, 0.0]), torch.zeros(3)], [[1, 2, 3], [1, 1, 2]])
    assert mean.item() == pytest.approx((0.720868 + 2 * math.log(3)) / 2, abs=1e-5)


def test_kendall_tau_b_by_hand():
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    # one tie in the first: 5 concordant, none discordant, 6 pairs, 1 tied: 5 / sqrt(5 x 6)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        kendall_tau_b([1, 2], [1, 2, 3])


def test_ranking_agreement_averages_tau_over_every_pair_of_labellers_on_items_ranked_twice():
    units = [[[1, 2, 3, 4], [1, 3, 2, 4]], [[1, 1, 2], [1, 2, 3]], [[1, 2]]]
    assert ranking_agreement(units) == pytest.approx((4 / 6 + 2 / math.sqrt(6)) / 2)
    three = [[[1, 2, 3], [1, 2, 3], [3, 2, 1]]]  # pairs: 1, -1, -1
    assert ranking_agreement(three) == pytest.approx(-1 / 3)
    assert ranking_agreement([[[1, 2]]]) is None


def test_a_typed_order_best_first_with_ties_becomes_ranks_of_the_answers_as_shown():
    assert ranks_from_order("3 1=4 2", 4) == [2, 3, 1, 2] == ranks_from_order("3 1 = 4 2", 4)
    assert ranks_from_order(" 2, 1 ", 2) == [2, 1] and ranks_from_order("1=2=3", 3) == [1, 1, 1]
    for order, message in (("1 2", "leaves out answer 3"), ("1 2 2 3", "answer 2 is in the order twice"),
                           ("1 2 7", "'7' is not an answer's number (1 to 3)"), ("=1 2 3", "'' is not"),
                           ("", "leaves out answers 1, 2, 3")):
        with pytest.raises(ValueError, match=re.escape(message)):
            ranks_from_order(order, 3)
