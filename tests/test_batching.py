"""Batches of rows of similar length (rlhf/batching.py), by hand; through DPO's trainer in tests/test_dpo.py."""
from itertools import permutations

from rlhf.batching import LengthGroupedBatches


def test_rows_are_sorted_into_batches_whose_order_is_shuffled_and_the_short_batch_comes_last():
    lengths = [50, 10, 40, 11, 30, 12, 41, 31, 51, 9]
    sampler = LengthGroupedBatches(lengths, batch_size=3, seed=0)
    batches = sampler.batches()
    assert sorted(i for batch in batches for i in batch) == list(range(10)) and len(sampler) == 10
    assert list(sampler) == [i for batch in batches for i in batch]
    # by hand: sorted 9,10,11 | 12,30,31 | 40,41,50 | 51 -> three full batches in some order, then the one left
    expected = [{9, 1, 3}, {5, 4, 7}, {2, 6, 0}]
    assert [set(batch) for batch in batches[:3]] in [list(order) for order in permutations(expected)]
    assert batches[3] == [8]
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    assert padded == 3 * 11 + 3 * 31 + 3 * 50 + 51  # 327 tokens; one batch of 10: 510
    # seeded: the same epoch gives the same order (resuming relies on it), epochs differ
    assert LengthGroupedBatches(lengths, 3, 0).batches() == batches
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(map(tuple, sampler.batches())))
    assert len(orders) > 1


def test_equal_lengths_are_ordered_at_random_so_every_row_can_share_a_batch_with_any_other():
    partners = set()
    for seed in range(20):
        for batch in LengthGroupedBatches([7] * 6, batch_size=2, seed=seed).batches():
            partners.add(frozenset(batch))
    assert len(partners) == 15  # every pair of the 6 rows
