import re

import pytest

from preference_ui.stats import (batch_rows, format_stats, human_win_rates, krippendorff_alpha, load_labels,
                                 pairwise_agreement, stats, wilson_interval)
from rlhf.store import Store


def test_krippendorff_alpha_by_hand():
    # o_aa = 2 (unit 1), o_ab = o_ba = 1 (unit 2); n_a = 3, n_b = 1, n = 4: alpha = 1 - 3 * 2 / (2 * 3 * 1) = 0
    assert krippendorff_alpha([["a", "a"], ["a", "b"]]) == pytest.approx(0.0)
    assert krippendorff_alpha([["a", "a"], ["b", "b"], ["tie", "tie", "tie"]]) == pytest.approx(1.0)
    # perfect disagreement on two units: o_ab = o_ba = 2, n_a = n_b = 2: alpha = 1 - 3 * 4 / 8 = -0.5
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) == pytest.approx(-0.5)
    assert krippendorff_alpha([["a", "a"], ["a", "a"]]) is None  # one value throughout: undefined
    assert krippendorff_alpha([["a"]]) is None


def test_pairwise_agreement():
    assert pairwise_agreement([["a", "a", "b"]]) == pytest.approx(1 / 3)
    assert pairwise_agreement([["a", "a"], ["b", "tie"]]) == 0.5 and pairwise_agreement([]) is None


def test_stats_report_progress_agreement_and_gold_accuracy(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    ann, bob = store.add_user("ann", "labeller", "password1"), store.add_user("bob", "labeller", "password1")
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    responses = [store.add_response(prompt, text, "m", {}) for text in ("x", "y")]
    train = store.add_comparison(*responses, batch="b1")
    gold = store.add_comparison(*responses, batch="b1", kind="gold", expected="a")
    store.add_comparison(*responses, batch="b1")  # not voted yet
    store.cast_vote(train.id, ann, "a", seconds=4.0)
    store.cast_vote(train.id, bob, "b", seconds=6.0)
    store.cast_vote(gold.id, ann, "a", seconds=2.0)
    store.cast_vote(gold.id, bob, "tie")
    report = stats(store, "b1")
    assert (report["comparisons"], report["voted"], report["votes"]) == (3, 2, 4)
    assert report["pairwise_agreement"] == 0.0
    # ann and bob disagree on both items they share: each agrees with the other on none
    assert report["labellers"]["ann"] == {"votes": 2, "mean_seconds": 3.0, "gold_votes": 1, "gold_accuracy": 1.0,
                                          "gold_passed": 0, "agreement_with_others": 0.0}
    assert report["labellers"]["bob"] == {"votes": 2, "mean_seconds": 6.0, "gold_votes": 1, "gold_accuracy": 0.0,
                                          "gold_passed": 0, "agreement_with_others": 0.0}
    assert "2/3 comparisons voted" in format_stats(report) and "gold accuracy 1.00" in format_stats(report)
    # over every batch, gold items (easy, and given to everyone) are not counted as labelling: their agreement
    # would hide the labellers' disagreement; each labeller's gold accuracy still counts them
    shared_gold = store.add_comparison(*responses, batch="gold", kind="gold", expected="a")
    store.cast_vote(shared_gold.id, ann, "a")
    store.cast_vote(shared_gold.id, bob, "a")
    report = stats(store)
    assert (report["comparisons"], report["votes"], report["pairwise_agreement"]) == (2, 2, 0.0)
    assert report["labellers"]["bob"]["gold_votes"] == 2 and report["labellers"]["bob"]["gold_accuracy"] == 0.5
    # a gold item skipped (or let time out) never comes back: it is counted beside the accuracy, which it leaves out
    from preference_ui.queue import LabelQueue

    queue = LabelQueue(store, overlap=3, gold_rate=1.0)
    item = queue.next_item(bob)
    assert item.kind == "gold"
    queue.skip(bob, item.comparison_id)
    report = stats(store)
    assert report["labellers"]["bob"]["gold_passed"] == 1 and report["labellers"]["ann"]["gold_passed"] == 0
    assert report["labellers"]["bob"]["gold_accuracy"] == 0.5
    assert "gold accuracy 0.50 (1 passed)" in format_stats(report)


def test_stats_read_while_people_label_count_what_they_read(tmp_path, monkeypatch):
    """A comparison added and voted on by a new labeller while the statistics are read: its vote is left for the
    next reading (a vote read before its comparison was a KeyError)."""
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    ann = store.add_user("ann", "labeller", "password1")
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    responses = [store.add_response(prompt, text, "m", {}) for text in ("x", "y")]
    store.cast_vote(store.add_comparison(*responses, batch="b1").id, ann, "a")
    read_comparisons = store.comparisons

    def labelling_meanwhile():
        rows = read_comparisons()
        late = store.add_user("late", "labeller", "password1")
        store.cast_vote(store.add_comparison(*responses, batch="b1").id, late, "b")
        return rows

    monkeypatch.setattr(store, "comparisons", labelling_meanwhile)
    report = stats(store, "b1")
    assert (report["comparisons"], report["votes"]) == (1, 1) and list(report["labellers"]) == ["ann"]
    monkeypatch.undo()
    assert (stats(store, "b1")["votes"], len(stats(store, "b1")["labellers"])) == (2, 2)


def test_each_labellers_agreement_with_the_others_majority(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    ann, bob, cy, ai = (store.add_user(name, "labeller", "password1") for name in ("ann", "bob", "cy", "ai/m"))
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    responses = [store.add_response(prompt, text, "m", {}) for text in ("x", "y")]
    first, second, third = (store.add_comparison(*responses, batch="b1") for _ in range(3))
    for item, votes in ((first, {ann: "a", bob: "a", cy: "b", ai: "a"}),   # others' majority a for ai
                        (second, {ann: "b", bob: "a", ai: "b"}),           # others draw a:b, a tie: ai misses
                        (third, {ai: "a"})):                               # nobody else: not counted
        for user, choice in votes.items():
            store.cast_vote(item.id, user, choice)
    labellers = stats(store, "b1")["labellers"]
    assert labellers["ai/m"]["agreement_with_others"] == 0.5
    assert labellers["cy"]["agreement_with_others"] == 0.0 and labellers["ann"]["agreement_with_others"] == 0.5
    assert "agrees with the others 0.50" in format_stats(stats(store, "b1"))


def test_stats_cover_rankings_with_kendalls_tau(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    ann, bob, cy = (store.add_user(name, "labeller", "password1") for name in ("ann", "bob", "cy"))
    prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Hi?"}])
    responses = [store.add_response(prompt, text, "m", {}) for text in ("w", "x", "y", "z")]
    item, once = (store.add_ranking_item(responses, batch="b1") for _ in range(2))
    store.cast_ranking(item.id, ann, [1, 2, 3, 4], seconds=10.0)
    store.cast_ranking(item.id, bob, [1, 3, 2, 4], seconds=20.0)  # tau-b with ann: 4 / 6
    store.cast_ranking(once.id, cy, [4, 3, 2, 1])
    store.cast_vote(store.add_comparison(*responses[:2], batch="b1").id, ann, "a", seconds=2.0)
    report = stats(store, "b1")
    assert (report["comparisons"], report["voted"], report["votes"], report["rankings"]) == (3, 3, 1, 3)
    assert report["kendall_tau"] == pytest.approx(4 / 6) and report["ranked_twice"] == 1
    assert report["labellers"]["ann"]["votes"] == 2 and report["labellers"]["ann"]["mean_seconds"] == 6.0
    assert "rankings: 3; agreement: Kendall's tau-b 0.667 over 1 items ranked twice or more" in format_stats(report)
    assert "rankings" not in format_stats(stats(store, "none"))
    # the admin tab's batch row counts a ranking as one, as the labellers' rows do: 1 vote and 3 rankings
    assert batch_rows(load_labels(store)) == [["b1", 3, 3, 4, None, None, ""]]
    store.close_batch("b1")  # exported by a stage: the row says when
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", batch_rows(load_labels(store))[0][-1])
    store.reopen_batch("b1")
    store.close_batch("b1", by_hand=True)
    assert batch_rows(load_labels(store))[0][-1].endswith(" UTC (by hand)")


def test_stats_command(tmp_path, capsys):
    from pipeline.cli import main as cli

    Store(f"sqlite:///{tmp_path / 'labels.db'}")
    assert cli(["label", "--db", f"sqlite:///{tmp_path / 'labels.db'}", "stats"]) == 0
    assert capsys.readouterr().out.startswith("batch (all): 0/0 comparisons voted, 0 votes {}\nagreement: "
                                              "Krippendorff's alpha n/a, pairwise n/a")


def test_the_human_win_rate_counts_each_comparison_once_whatever_its_votes():
    """Three labellers who agree on a comparison are one piece of evidence, not three: the interval is over the
    comparisons (each the mean of its votes), so more votes on the same comparisons leave it as it is."""
    from types import SimpleNamespace as Vote

    comparisons = {i: {"kind": "eval", "a_role": "policy", "b_role": "baseline", "a_model": "run/ppo",
                       "b_model": "run/sft"} for i in range(10)}
    one = [Vote(comparison_id=i, choice="a" if i < 7 else "b") for i in range(10)]
    three = [Vote(comparison_id=i, choice=vote.choice) for vote in one for i in [vote.comparison_id] * 3]
    split = three[:-1] + [Vote(comparison_id=9, choice="tie")]  # one labeller of the last comparison says tie
    by_one, by_three = human_win_rates(comparisons, one)["run/ppo"], human_win_rates(comparisons, three)["run/ppo"]
    assert (by_one["comparisons"], by_one["votes"], by_three["comparisons"], by_three["votes"]) == (10, 10, 10, 30)
    assert (by_three["win_rate"], by_three["low"], by_three["high"]) == (0.7, *wilson_interval(0.7, 10))
    assert (by_one["low"], by_one["high"]) == (by_three["low"], by_three["high"])
    assert human_win_rates(comparisons, split)["run/ppo"]["win_rate"] == pytest.approx((7 + 0.5 / 3) / 10)
