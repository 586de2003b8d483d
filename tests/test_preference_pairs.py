"""k answers per prompt into pairs: best-vs-worst selection from labellers' pairs (rlhf.preference_pairs) and
from reward-model scores (ppo.dpo.best_and_worst), checked by hand."""
import json

import pytest

from ppo.dpo import best_and_worst
from rlhf.errors import DataError
from rlhf.preference_pairs import best_vs_worst, usable_pairs


def pair(prompt: str, chosen: str, rejected: str, tie: bool = False, both_bad: bool = False) -> dict:
    return {"id": f"{prompt}-{chosen}-{rejected}", "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "tie": tie, "both_bad": both_bad}


def chosen_and_rejected(rows: list[dict]) -> list[tuple]:
    return [(row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in rows]


# P: four answers, every pair compared. Shares of wins (a tie is half): A 3/3, B 2/3, C 0.5/3, D 0.5/3.
# Q: a cycle X > Y > Z > X, every share 1/2: the first decided row. R: only a tie, nothing decided.
ROWS = [pair("P", "A", "B"), pair("P", "A", "C"), pair("P", "A", "D"), pair("P", "B", "C"), pair("P", "B", "D"),
        pair("P", "C", "D", tie=True),
        pair("Q", "X", "Y"), pair("Q", "Y", "Z"), pair("Q", "Z", "X"),
        pair("R", "M", "N", tie=True)]


def test_best_vs_worst_keeps_one_pair_per_prompt_the_best_answer_against_the_worst():
    # P: A-C and A-D both span 1 - 1/6; the first (A-C) wins the draw
    assert chosen_and_rejected(best_vs_worst(ROWS)) == [("P", "A", "C"), ("Q", "X", "Y")]


def test_usable_pairs_count_all_pairs_or_one_per_prompt(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS + [pair("S", "U", "V", both_bad=True)]))
    assert len(usable_pairs(str(source), "drop", False, "all")) == 8  # 11 rows less 2 ties and 1 both-bad
    assert len(usable_pairs(str(source), "equal", False, "all")) == 10  # the ties kept
    best = usable_pairs(str(source), "drop", False, "best_worst")
    assert chosen_and_rejected(best) == [("P", "A", "C"), ("Q", "X", "Y")]  # without the tie: A 1, C 0, D 0
    only_ties = tmp_path / "ties.jsonl"
    only_ties.write_text(json.dumps(pair("R", "M", "N", tie=True)) + "\n")
    with pytest.raises(DataError, match="no decided pair to learn from: of its 1 rows 1 are ties and 0 both bad"):
        usable_pairs(str(only_ties), "equal", False, "all")


def test_usable_pairs_scale_the_weights_to_a_mean_of_one_over_the_rows_kept(tmp_path):
    source = tmp_path / "pairs.jsonl"
    rows = [{**pair("P", "A", "B"), "pair_weight": 1 / 3}, {**pair("P", "A", "C"), "pair_weight": 1 / 3},
            {**pair("Q", "X", "Y"), "pair_weight": 1.0}, pair("R", "M", "N", tie=True)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    weights = [row["weight"] for row in usable_pairs(str(source), "drop", False, "all")]
    assert weights == pytest.approx([0.6, 0.6, 1.8])  # 1/3 : 1/3 : 1 with a mean of 1 (the tie dropped)
    source.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))  # one ranking's pairs alone
    assert [row["weight"] for row in usable_pairs(str(source), "drop", False, "all")] == [1.0, 1.0]


def test_on_policy_pairs_take_the_reward_models_best_and_worst_of_k():
    prompts = [{"id": "p1", "prompt": [{"role": "user", "content": "one"}]},
               {"id": "p2", "prompt": [{"role": "user", "content": "two"}]},
               {"id": "p3", "prompt": [{"role": "user", "content": "three"}]}]
    answers = ["a", "b", "c", "x", "y", "x", "s", "t", "u"]
    rewards = [0.2, 0.9, -0.4, 1.0, 0.5, 1.0, 0.3, 0.3, 0.3]
    pairs = best_and_worst(prompts, answers, rewards, 3)
    # p1: b (0.9) over c (-0.4); p2: the best (x, 1.0) is also an x at 1.0, the worst y; p3: all equal, left out
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("p1", "b", "c"), ("p2", "x", "y")]
    assert (pairs[0]["chosen_reward"], pairs[0]["rejected_reward"]) == (0.9, -0.4)


def test_best_worst_trains_on_one_pair_per_prompt_and_holds_out_every_pair_of_its_held_out_prompts(tmp_path):
    """The pair best_worst keeps is the one a prompt's labellers set furthest apart: held out alone, it would be
    each held-out prompt's easiest test, and the held-out accuracy would not compare with selection all's."""
    from reward.config import RewardStageConfig
    from reward.data import round_pairs

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = RewardStageConfig(preferences=str(source), selection="best_worst", eval_fraction=0.5, seed=0)
    train, held_out = round_pairs({"preferences": str(source)}, config, 1)
    [trained] = chosen_and_rejected(train)
    held_prompts = {row["prompt"][0]["content"] for row in held_out}
    assert held_prompts == {"P", "Q"} - {trained[0]}
    every_decided = [row for row in chosen_and_rejected(ROWS[:9]) if row[0] in held_prompts and row[1:] != ("C", "D")]
    assert sorted(chosen_and_rejected(held_out)) == sorted(every_decided)
    assert trained in [("P", "A", "C"), ("Q", "X", "Y")]
