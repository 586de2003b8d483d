import random

import pytest
from sqlalchemy import select

from preference_ui.simulate import LabellerModel, decide, decide_ranking, simulate
from rlhf.judges import keywords, length, load_judge, readability, sentiment
from rlhf.errors import UserError
from rlhf.store import Assignment, Store

SIMPLE = "The cat sat. It was warm. We had tea."
DENSE = "Notwithstanding considerable institutional heterogeneity, comprehensive administrative reorganisation " \
        "necessitates extraordinarily meticulous deliberation."


def test_flesch_reading_ease_by_hand():
    # 3 words, 1 sentence, 3 syllables: 206.835 - 1.015 * 3 - 84.6 * 1
    assert readability([""], ["The cat sat."]) == [pytest.approx(119.19)]
    simple, dense = readability(["", ""], [SIMPLE, DENSE])
    assert simple > 100 > 0 > dense


def test_length_and_keyword_judges():
    assert length(["", "", ""], ["word " * 60, "word " * 30, ""]) == [1.0, 0.5, 0.0]
    assert keywords(["Explain how volcanoes erupt"], ["Volcanoes erupt when magma rises."]) == [1.0]
    assert keywords(["Explain how volcanoes erupt"], ["Magma rises."]) == [0.0]
    # words in any alphabet, with straight or curly apostrophes: not "caf", "r", "sum", nor no words at all
    assert length([""] * 3, ["naïve café résumé " * 20, "Привет мир " * 30, "don’t " * 60]) == [1.0, 1.0, 1.0]
    assert keywords(["The café’s menu?"], ["The café’s menu is short."]) == [1.0]
    assert sentiment([""], ["I can’t stand it"]) == sentiment([""], ["I can't stand it"]) == [-3.0]


def test_sentiment_judge_by_hand():
    # AFINN valences: love +3, great +3, terrible -3, sad -2; per ten words, at least ten words counted
    assert sentiment(["", ""], ["I love it.", "Great food, terrible service and a sad waiter."]) == \
        [pytest.approx(10 * 3 / 10), pytest.approx(10 * (3 - 3 - 2) / 10)]
    many_words = "We love this place " + "and the view " * 4 + "from the window over the bay"
    assert sentiment([""], [many_words]) == [pytest.approx(10 * 3 / 22)]  # 22 words
    assert sentiment([""], ["The train leaves at noon."]) == [0.0]
    assert load_judge("builtin:sentiment") is sentiment


def test_judges_load_by_name_or_import_path():
    assert load_judge("builtin:readability") is readability
    assert load_judge("rlhf.judges:length") is length
    with pytest.raises(UserError, match="no such built-in; built-ins: readability, length, keywords, sentiment"):
        load_judge("builtin:vibes")
    with pytest.raises(UserError, match="cannot load"):
        load_judge("no_such_module:judge")


def test_decide_rules():
    rng = random.Random(0)
    assert decide(1.0, 0.5, LabellerModel(both_bad_floor=2.0), rng)[0] == "both_bad"
    assert decide(1.0, 0.95, LabellerModel(tie_margin=0.1), rng)[0] == "tie"
    assert decide(1.0, 3.0, LabellerModel(temperature=0), rng) == ("b", "clear")
    # Bradley-Terry: a score gap of one temperature wins with probability sigmoid(1) = 0.731
    wins = sum(decide(1.0, 0.0, LabellerModel(temperature=1.0), rng)[0] == "a" for _ in range(4000))
    assert wins / 4000 == pytest.approx(0.731, abs=0.03)
    # a gap of thousands of temperatures (Flesch points at temperature 0.05) is certain either way, no overflow
    assert decide(20.0, 80.0, LabellerModel(temperature=0.05), rng)[0] == "b"
    assert decide(80.0, 20.0, LabellerModel(temperature=0.05), rng)[0] == "a"


def store_with_pairs(tmp_path, n) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for i in range(n):
        prompt = store.add_prompt(f"p{i}", "explain", [{"role": "user", "content": f"Question {i}?"}])
        first, second = (SIMPLE, DENSE) if i % 2 else (DENSE, SIMPLE)
        store.add_comparison(store.add_response(prompt, first, "m", {}), store.add_response(prompt, second, "m", {}),
                             batch="b1")
    return store


def agreement(store, among: set | None = None) -> float:
    comparisons = {c["id"]: c for c in store.comparisons("b1")}
    better = {i: "a" if readability([""], [c["a"]])[0] > readability([""], [c["b"]])[0] else "b"
              for i, c in comparisons.items()}
    votes = [vote for vote in store.votes() if among is None or vote.comparison_id in among]
    return sum(v.choice == better[v.comparison_id] for v in votes) / len(votes)


def test_noiseless_labellers_follow_the_judge_and_never_vote_twice(tmp_path):
    store = store_with_pairs(tmp_path, 20)
    counts = simulate(store, "builtin:readability", 3, LabellerModel(temperature=0), batch="b1")
    assert counts["a"] + counts["b"] == 60 and counts["skipped"] == 0
    assert agreement(store) == 1.0
    assert {u.name for u in store.users()} == {"sim/readability/0", "sim/readability/1", "sim/readability/2"}
    again = simulate(store, "builtin:readability", 3, LabellerModel(temperature=0), batch="b1")
    assert sum(again.values()) == 0 and len(store.votes()) == 60  # the queue has nothing left for them


def test_simulated_labellers_take_their_items_from_the_queue_with_overlap_gold_and_skips(tmp_path):
    store = store_with_pairs(tmp_path, 30)
    prompt = store.add_prompt("g", "explain", [{"role": "user", "content": "Gold?"}])
    for i in range(4):
        store.add_comparison(store.add_response(prompt, f"{SIMPLE} {i}", "m", {}),
                             store.add_response(prompt, f"{DENSE} {i}", "m", {}), batch="gold", kind="gold",
                             expected="a")
    model = LabellerModel(temperature=0, skip=0.3)
    counts = simulate(store, "builtin:readability", 4, model, batch="b1", overlap=2, gold_rate=0.2, seed=3)
    votes, train = store.votes(), {c["id"] for c in store.comparisons("b1")}
    with store.engine.connect() as connection:
        skipped = {(row.comparison_id, row.user_id) for row in connection.execute(
            select(Assignment.comparison_id, Assignment.user_id).where(Assignment.status == "skipped"))}
    voted = {(vote.comparison_id, vote.user_id) for vote in votes}
    assert len(voted) == len(votes) and counts["a"] + counts["b"] == len(votes)
    # a skipped item's slot goes to another labeller; the item comes back to the skipper (who then votes on it)
    # only when nothing else is left for them and its slot is still free: every comparison gets its 2 votes
    assert counts["skipped"] > 0 and 0 < len(skipped) <= counts["skipped"] and not skipped & voted
    for comparison in train:
        assert sum(c == comparison for c, _ in voted) == 2, comparison
    # gold items were mixed in, and a noiseless labeller gets them right
    gold = [vote for vote in votes if vote.comparison_id not in train]
    assert gold and all(vote.choice == "a" for vote in gold)


def test_a_simulated_labeller_disabled_while_it_runs_stops_and_the_others_take_its_items(tmp_path, monkeypatch,
                                                                                           capsys):
    import preference_ui.simulate as simulate_module
    store = store_with_pairs(tmp_path, 12)
    scored, judge_scores = [], simulate_module.judge_scores

    def disabling_after_four(judge, prompts, answers):  # an admin disables labeller 1 after four judgements
        scored.append(1)
        if len(scored) == 4:
            store.set_disabled("sim/readability/1", True)
        return judge_scores(judge, prompts, answers)

    monkeypatch.setattr(simulate_module, "judge_scores", disabling_after_four)
    counts = simulate(store, "builtin:readability", 3, LabellerModel(temperature=0), batch="b1", overlap=2)
    stopped = store.user("sim/readability/1").id
    votes = store.votes()
    assert sum(vote.user_id == stopped for vote in votes) <= 2 and counts["a"] + counts["b"] == len(votes)
    for comparison in store.comparisons("b1"):  # its open item was given up: the other two voted on everything
        assert sum(vote.comparison_id == comparison["id"] for vote in votes) == 2
    assert "labeller 'sim/readability/1' is disabled" in capsys.readouterr().err


def test_a_simulated_vote_does_not_depend_on_the_side_the_queue_showed_each_answer_on(tmp_path):
    """The same labellers on the same comparisons, the queue's draws changed by gold items mixed into one of them
    (so other items are shown swapped): every vote on the shared comparisons is the same."""
    votes = []
    for name, gold_rate in (("plain", 0.0), ("gold", 0.4)):
        (tmp_path / name).mkdir()
        store = store_with_pairs(tmp_path / name, 30)
        prompt = store.add_prompt("g", "explain", [{"role": "user", "content": "Gold?"}])
        for i in range(6):
            store.add_comparison(store.add_response(prompt, f"{SIMPLE} {i}", "m", {}),
                                 store.add_response(prompt, f"{DENSE} {i}", "m", {}), batch="gold", kind="gold",
                                 expected="a")
        # the answers' readability differs by about 300: at temperature 300 the better one wins 3 times in 4
        simulate(store, "builtin:readability", 3, LabellerModel(temperature=300.0), batch="b1", gold_rate=gold_rate)
        train = {c["id"] for c in store.comparisons("b1")}
        votes.append({(v.comparison_id, v.user_id, v.choice) for v in store.votes() if v.comparison_id in train})
        assert 0.6 < agreement(store, train) < 0.9
    assert len(votes[0]) == 90 and votes[0] == votes[1]


@pytest.mark.parametrize("noise", [0.3, 0.6])
def test_agreement_falls_with_noise_as_expected(tmp_path, noise):
    store = store_with_pairs(tmp_path, 150)
    simulate(store, "builtin:readability", 3, LabellerModel(temperature=0, noise=noise), batch="b1", seed=1)
    # a noisy vote is uniform over four choices, so it still agrees a quarter of the time
    assert agreement(store) == pytest.approx(1 - noise + noise / 4, abs=0.06)


def test_simulate_command(tmp_path, capsys):
    from pipeline.cli import main as cli

    store_with_pairs(tmp_path, 4)
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert cli(["label", "--db", db, "simulate", "--judge", "builtin:readability", "--labellers", "2",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out.split() == ["a=4", "b=4", "tie=0", "both_bad=0", "skipped=0"]
    assert cli(["label", "--db", db, "simulate", "--judge", "builtin:nope"]) == 2
    # a judge that checks against reference answers cannot vote between two answers: refused before the store opens
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert cli(["label", "--db", fresh, "simulate", "--judge", "builtin:final_number"]) == 2
    assert "checks answers against reference answers" in capsys.readouterr().err
    assert not (tmp_path / "fresh.db").exists()
    for flags, message in ((["--temperature", "-0.001"], "a negative temperature reverses every vote"),
                           (["--labellers", "0"], "--labellers and --overlap must be at least 1"),
                           (["--overlap", "0"], "--labellers and --overlap must be at least 1"),
                           (["--gold-rate", "5"], "--gold-rate between 0 and 1"),
                           (["--skip", "1"], "skip rate from 0 to below 1")):
        assert cli(["label", "--db", db, "simulate", "--judge", "builtin:length", *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert cli(["label", "--db", db, "stats"]) == 0 and "comparisons voted, 8 votes" in capsys.readouterr().out
    for command in (["stats"], ["export", "--out", str(tmp_path / "out")], ["simulate", "--judge", "builtin:length"]):
        assert cli(["label", "--db", db, *command, "--batch", "b2"]) == 2, command  # mistyped: read as empty
        assert "no batch 'b2' in sqlite:///" in capsys.readouterr().err and not (tmp_path / "out").exists()
    from preference_ui.config import PreferencesStageConfig

    with pytest.raises(ValueError, match="a negative temperature reverses every vote"):  # the stage's settings too
        PreferencesStageConfig(simulate_temperature=-1.0)


def test_the_rlhf_command_finds_a_users_judge_in_the_working_folder(tmp_path):
    """As `python -m pipeline.cli` does: the console script's own folder, not the working one, heads sys.path."""
    import subprocess
    import sys
    from pathlib import Path

    store_with_pairs(tmp_path, 4)
    (tmp_path / "my_judge.py").write_text("def longer(prompts, answers):\n    return [len(a) for a in answers]\n")
    result = subprocess.run([str(Path(sys.executable).parent / "rlhf"), "label", "--db",
                             f"sqlite:///{tmp_path / 'labels.db'}", "simulate", "--judge", "my_judge:longer",
                             "--temperature", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "skipped=0"


def test_a_simulated_ranking_sorts_by_score_draws_plackett_luce_and_ties_within_the_margin():
    rng = random.Random(0)
    assert decide_ranking([0.2, 0.9, 0.5], LabellerModel(temperature=0), rng) == [3, 1, 2]
    assert decide_ranking([0.5, 0.5, 0.1], LabellerModel(temperature=0), rng) == [1, 1, 3]
    assert decide_ranking([1.0, 0.95, 0.2], LabellerModel(temperature=0, tie_margin=0.1), rng) == [1, 1, 3]
    draws = [decide_ranking([2.0, 1.0, 0.0], LabellerModel(temperature=1.0), rng) for _ in range(4000)]
    # Plackett-Luce: P(0 > 1 > 2) = e^2 / (e^2 + e + 1) x e / (e + 1) = 0.486
    in_order = sum(ranks == [1, 2, 3] for ranks in draws) / len(draws)
    assert in_order == pytest.approx(0.486, abs=0.03)
    noisy = [decide_ranking([2.0, 1.0, 0.0], LabellerModel(temperature=0, noise=1.0), rng) for _ in range(600)]
    assert all(sorted(ranks) == [1, 2, 3] for ranks in noisy)
    assert sum(ranks == [1, 2, 3] for ranks in noisy) / len(noisy) == pytest.approx(1 / 6, abs=0.05)


def test_simulated_labellers_rank_ranking_items_through_the_queue(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    for i in range(2):
        prompt = store.add_prompt(f"r{i}", "explain", [{"role": "user", "content": "Explain tides."}])
        store.add_ranking_item([store.add_response(prompt, "word " * words, "m", {}) for words in (10, 60, 30, 45)],
                               batch="b1")
    counts = simulate(store, "builtin:length", 3, LabellerModel(temperature=0), batch="b1")
    assert counts["ranked"] == 6 and sum(counts.values()) == 6
    # the length judge is best at 60 words: 60 > 45 > 30 > 10, in the items' own order of answers
    assert [ranking.ranks for ranking in store.rankings()] == [[4, 1, 3, 2]] * 6
