import json

import pytest

from rlhf.label_export import export, majority
from rlhf.datasets import load_rows
from rlhf.errors import UserError
from rlhf.store import Store


def store_with_votes(tmp_path, votes_per_item: list[list[tuple[str, str]]]) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    users = [store.add_user(f"u{i}", "labeller", "password1") for i in range(5)]
    for i, votes in enumerate(votes_per_item):
        prompt = store.add_prompt(f"p{i}", "chat", [{"role": "user", "content": f"Prompt {i}?"}])
        comparison = store.add_comparison(store.add_response(prompt, f"A{i}", "m", {}),
                                          store.add_response(prompt, f"B{i}", "m", {}), batch="b1")
        for user, (choice, strength) in zip(users, votes):
            store.cast_vote(comparison.id, user, choice, strength)
    return store


def test_majority_with_draws():
    from collections import Counter

    assert majority(Counter(a=2, b=1)) == "a"
    assert majority(Counter(a=1, b=1)) == "tie" and majority(Counter(a=1, both_bad=1)) == "tie"
    assert majority(Counter(both_bad=2, tie=1)) == "both_bad"


def test_export_aggregates_votes_into_trl_preference_rows(tmp_path):
    store = store_with_votes(tmp_path, [
        [("b", "clear"), ("b", "slight"), ("a", "clear")],  # b wins 2:1, margin (1 + 0.5) / 2
        [("a", "clear"), ("b", "clear")],                   # a draw: tie
        [("both_bad", None), ("both_bad", None), ("tie", None)],
        [("a", "slight")],                                   # under --min-votes 2
    ])
    manifest = export(store, tmp_path / "out", min_votes=2)
    assert (manifest["rows"], manifest["ties"], manifest["both_bad"]) == (3, 1, 1)
    rows = load_rows(tmp_path / "out", "preference")  # the saved dataset passes our own validation
    first, draw, bad = sorted(rows, key=lambda r: r["id"])
    assert first["chosen"] == [{"role": "assistant", "content": "B0"}] and first["rejected"][0]["content"] == "A0"
    assert first["margin"] == 0.75 and not first["tie"] and first["prompt"][0]["content"] == "Prompt 0?"
    assert draw["tie"] and not draw["both_bad"] and bad["both_bad"]
    assert bad["margin"] == 0 and [v["strength"] for v in bad["labeller_votes"]] == [None, None, None]
    raw = json.loads((tmp_path / "out" / "export.json").read_text())
    assert raw["content_hash"] == manifest["content_hash"]


def test_the_same_votes_cast_in_another_order_export_alike(tmp_path):
    """A preferences stage killed and resumed stores the same votes in another order: the export (and its content
    hash, which later stages read) is the uninterrupted run's."""
    hashes = []
    for order in ((0, 1, 2), (2, 0, 1)):
        store = Store(f"sqlite:///{tmp_path / f'order{order[0]}.db'}")
        users = [store.add_user(f"u{i}", "labeller", "password1") for i in range(3)]
        prompt = store.add_prompt("p", "chat", [{"role": "user", "content": "Prompt?"}])
        comparison = store.add_comparison(store.add_response(prompt, "A", "m", {}),
                                          store.add_response(prompt, "B", "m", {}), batch="b1")
        for i in order:
            store.cast_vote(comparison.id, users[i], ["a", "b", "a"][i], "clear")
        hashes.append(export(store, tmp_path / f"out{order[0]}")["content_hash"])
    assert hashes[0] == hashes[1]


def test_a_comparison_of_two_answers_with_the_same_text_or_an_empty_one_is_left_out_of_the_export(tmp_path):
    """An empty answer (the model ended at once) makes no preference row: the reward and DPO stages refuse one, and
    one such row in a store would stop them on the whole export."""
    store = store_with_votes(tmp_path, [[("a", "clear")]])
    prompt = store.add_prompt("same", "chat", [{"role": "user", "content": "Twice?"}])
    same = [store.add_response(prompt, "Same.", "m", {}) for _ in range(2)]
    empty = [store.add_response(prompt, text, "m", {}) for text in ("Said something.", " \n")]
    for comparison in (store.add_comparison(*same, batch="b1"), store.add_comparison(*empty, batch="b1")):
        store.cast_vote(comparison.id, store.users()[0], "a", "clear")
    ranked = store.add_ranking_item([store.add_response(prompt, text, "m", {}) for text in ("X.", "", "Y.")], "b1")
    store.cast_ranking(ranked.id, store.users()[0], [1, 2, 3])
    assert export(store, tmp_path / "out")["rows"] == 2
    rows = load_rows(tmp_path / "out", "preference")
    assert [(row["prompt"][0]["content"], row["chosen"][0]["content"]) for row in rows] == [("Prompt 0?", "A0"),
                                                                                            ("Twice?", "X.")]


def test_sampling_pairs_and_ranks_no_empty_answer():
    import random
    from types import SimpleNamespace

    from preference_ui.sample import pair_candidates, ranking_items

    answers = [([SimpleNamespace(text=text) for text in ("One.", "", "Two.", "One.", "  ")], "prompt")]
    pairs = pair_candidates(answers, random.Random(0))
    assert sorted(sorted((a.text, b.text)) for a, b, _ in pairs) == [["One.", "Two."], ["One.", "Two."]]
    [item] = ranking_items(answers, random.Random(0))
    assert sorted(response.text for response in item) == ["One.", "Two."]
    one_said = [([SimpleNamespace(text="Only."), SimpleNamespace(text="")], "prompt")]
    assert ranking_items(one_said, random.Random(0)) == []


def test_export_is_deterministic_and_never_overwrites_a_different_one(tmp_path):
    store = store_with_votes(tmp_path, [[("a", "clear")], [("b", "slight")]])
    first = export(store, tmp_path / "out")
    again = export(store, tmp_path / "out")
    assert again["unchanged"] and again["content_hash"] == first["content_hash"]
    store.cast_vote(store.comparisons()[0]["id"], store.user("u1"), "b", "clear")
    with pytest.raises(UserError, match="holds a different export"):
        export(store, tmp_path / "out")
    assert export(store, tmp_path / "out2")["content_hash"] != first["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    with pytest.raises(UserError, match="nothing to export"):
        export(store, tmp_path / "out3", min_votes=9)


def test_export_command(tmp_path, capsys):
    from pipeline.cli import main as cli

    store_with_votes(tmp_path, [[("a", "clear"), ("a", "clear")]])
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    assert cli(["label", "--db", db, "export", "--out", str(tmp_path / "prefs"), "--min-votes", "2"]) == 0
    assert "1 pairs (0 ties, 0 both bad)" in capsys.readouterr().out
    assert cli(["label", "--db", db, "export", "--out", str(tmp_path / "prefs")]) == 0
    assert capsys.readouterr().out.endswith("unchanged\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    refused = [(["--out", str(tmp_path / "new"), "--demonstrations", str(tmp_path)],
                f"error: {tmp_path}: is a folder, and --demonstrations names the file demonstrations are written to"),
               (["--out", str(tmp_path / "a-file" / "x")], f"error: {tmp_path / 'a-file' / 'x'}: "
                f"{tmp_path / 'a-file'} is a file, so --out cannot be made under it"),
               (["--out", str(tmp_path / "a-file")],
                f"error: {tmp_path / 'a-file'}: is a file, and --out names the folder an export is written to"),
               (["--out", str(tmp_path / "empty")],
                f"error: {tmp_path / 'empty'} is a folder that holds no export; choose another --out or remove it")]
    for options, message in refused:  # nothing written: not the export either, when the demonstrations' path is bad
        assert cli(["label", "--db", db, "export", *options]) == 2
        assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


def test_two_exports_of_the_same_votes_at_once_both_end_well(tmp_path, monkeypatch):
    """A second click on the app's export button, or a second command, puts the same export in place while this
    one is being written: this one then finds it there, unchanged."""
    import rlhf.label_export as label_export

    store = store_with_votes(tmp_path, [[("a", "clear")]])
    write_manifest, raced = label_export.atomic_write_json, []

    def another_export_first(path, value):
        if not raced:
            raced.append("racing")
            raced.append(export(store, tmp_path / "out"))
        write_manifest(path, value)

    monkeypatch.setattr(label_export, "atomic_write_json", another_export_first)
    manifest = export(store, tmp_path / "out")
    assert manifest["unchanged"] and manifest["content_hash"] == raced[1]["content_hash"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_a_ranking_item_exports_one_row_per_pair_and_its_pairs_weigh_one_observation(tmp_path):
    from rlhf.preference_pairs import load_pairs

    store = store_with_votes(tmp_path, [[("a", "clear")]])
    prompt = store.add_prompt("ranked", "chat", [{"role": "user", "content": "Rank these?"}])
    item = store.add_ranking_item([store.add_response(prompt, text, "m", {}) for text in "WXYZ"], batch="b1")
    for user, ranks in zip(store.users(), ([1, 2, 3, 4], [1, 3, 2, 4], [2, 1, 3, 3])):
        store.cast_ranking(item.id, user, ranks)
    manifest = export(store, tmp_path / "out")
    assert (manifest["rows"], manifest["rankings"]) == (1 + 6, 1)
    rows = {row["id"]: row for row in load_rows(tmp_path / "out", "preference")}
    w_x, x_y, y_z = rows[f"rank-{item.id}-0-1"], rows[f"rank-{item.id}-1-2"], rows[f"rank-{item.id}-2-3"]
    assert w_x["chosen"][0]["content"] == "W" and w_x["margin"] == 0
    assert [vote["verdict"] for vote in w_x["labeller_votes"]] == ["chosen", "chosen", "rejected"]
    assert x_y["chosen"][0]["content"] == "X" and x_y["rejected"][0]["content"] == "Y"  # 2 of 3 put X first
    assert [vote["verdict"] for vote in y_z["labeller_votes"]] == ["chosen", "chosen", "tie"]
    ranked = [row for row in rows.values() if row["id"].startswith("rank-")]
    assert {(row["ranking"], round(row["pair_weight"], 6)) for row in ranked} == {(f"rank-{item.id}", 0.166667)}
    [pairwise] = [row for row in rows.values() if row["id"].startswith("cmp-")]
    assert (pairwise["ranking"], pairwise["pair_weight"]) == (None, 1.0)
    weights = {pair["id"]: pair["weight"] for pair in load_pairs(str(tmp_path / "out"), weight_by_gold=False)}
    assert weights[pairwise["id"]] == 1.0
    assert sum(weight for id, weight in weights.items() if id.startswith("rank-")) == pytest.approx(1.0)


def test_an_export_without_rankings_keeps_its_columns_and_hash(tmp_path):
    store = store_with_votes(tmp_path, [[("a", "clear")], [("b", "slight")]])
    manifest = export(store, tmp_path / "out")
    assert manifest["rankings"] == 0
    assert all("ranking" not in row and "pair_weight" not in row for row in load_rows(tmp_path / "out", "preference"))
    import datasets

    assert "pair_weight" not in datasets.load_from_disk(str(tmp_path / "out")).column_names


def test_a_written_answer_becomes_a_demonstration_and_a_pair_over_what_the_votes_chose(tmp_path, capsys):
    from pipeline.cli import main as cli
    from preference_ui.queue import LabelQueue

    store = store_with_votes(tmp_path, [[("b", "clear")], [("tie", None)]])
    decided, tied = store.comparisons()
    writer = store.add_user("wren", "labeller", "password1")
    queue = LabelQueue(store, overlap=5, gold_rate=0.0, seed=0)
    for _ in range(2):
        item = queue.next_item(writer)
        queue.vote(writer, item.comparison_id, "a" if item.left == "B0" else "b" if item.right == "B0" else "tie",
                   written=f"  A better answer to {item.prompt[0]['content']}  ")
    assert sorted(w.text for w in store.written_answers()) == ["A better answer to Prompt 0?",
                                                              "A better answer to Prompt 1?"]
    # answers written on a gold item and a held-out eval item become neither demonstrations nor pairs
    for kind, expected in (("gold", "a"), ("eval", None)):
        prompt = store.add_prompt(f"{kind}-1", "chat", [{"role": "user", "content": f"A {kind} prompt?"}])
        store.add_comparison(store.add_response(prompt, "X", "m", {}), store.add_response(prompt, "Y", "m", {}),
                             batch=kind, kind=kind, expected=expected)
    for batch in ("gold", "eval"):
        item = LabelQueue(store, overlap=5, gold_rate=1.0, seed=0, batch=batch).next_item(writer)
        queue.vote(writer, item.comparison_id, "a", written=f"A better answer to {item.prompt[0]['content']}")
    assert len(store.written_answers()) == 4
    manifest = export(store, tmp_path / "out")
    assert (manifest["rows"], manifest["written"]) == (2 + 1 + 2, 3)
    rows = {row["id"]: row for row in load_rows(tmp_path / "out", "preference")}
    def written_for(prompt: str) -> list[dict]:
        return [row for id, row in rows.items()
                if id.startswith("written-") and row["chosen"][0]["content"] == f"A better answer to {prompt}"]

    [over_b0] = written_for("Prompt 0?")
    assert over_b0["chosen"][0]["content"] == "A better answer to Prompt 0?"
    assert over_b0["rejected"][0]["content"] == "B0" and over_b0["margin"] == 1.0  # the votes chose B0
    assert over_b0["labeller_votes"] == [{"labeller": "wren", "verdict": "chosen", "strength": "clear"}]
    # after a tie the written answer beats both
    assert sorted(row["rejected"][0]["content"] for row in written_for("Prompt 1?")) == ["A1", "B1"]
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    demos = tmp_path / "demos.jsonl"
    assert cli(["label", "--db", db, "export", "--demonstrations", str(demos)]) == 0
    assert "2 demonstrations written by labellers" in capsys.readouterr().out
    demonstrations = load_rows(demos, "sft")  # what `--sft.train_data` reads
    assert {"messages": [{"role": "user", "content": "Prompt 0?"},
                         {"role": "assistant", "content": "A better answer to Prompt 0?"}]}.items() <= \
        next(row for row in demonstrations if row["messages"][0]["content"] == "Prompt 0?").items()
    assert len(demonstrations) == 2
    assert cli(["label", "--db", db, "export", "--demonstrations", str(demos)]) == 0  # the same again: unchanged
    precious = tmp_path / "precious.jsonl"
    precious.write_text("somebody's notes\n")
    for options, message in (
            (["--demonstrations", str(precious)], f"{precious} exists and holds something else than these "
                                                  "demonstrations; choose another --demonstrations or remove it"),
            (["--out", str(tmp_path / "same"), "--demonstrations", str(tmp_path / "same")],
             f"--demonstrations {tmp_path / 'same'} is in --out {tmp_path / 'same'}, the export's own folder"),
            (["--out", str(tmp_path / "new"), "--min-votes", "0"], "--min-votes must be at least 1, got 0")):
        capsys.readouterr()
        assert cli(["label", "--db", db, "export", *options]) == 2
        assert message in capsys.readouterr().err
    assert precious.read_text() == "somebody's notes\n" and not (tmp_path / "same").exists()
    assert not (tmp_path / "new").exists()
    assert cli(["label", "--db", db, "export"]) == 2
    assert cli(["label", "--db", db, "export", "--demonstrations", str(tmp_path / "none.jsonl"), "--batch",
                "gold"]) == 2
    assert "no written answers in batch gold" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_a_written_answer_too_long_is_refused_with_the_vote(tmp_path):
    from preference_ui.queue import LabelQueue
    from rlhf.store import MAX_WRITTEN_CHARS, StoreError

    store = store_with_votes(tmp_path, [[]])
    writer = store.add_user("wren", "labeller", "password1")
    queue = LabelQueue(store, overlap=5, gold_rate=0.0, seed=0)
    item = queue.next_item(writer)
    with pytest.raises(StoreError, match="the written answer is"):
        queue.vote(writer, item.comparison_id, "a", written="x" * (MAX_WRITTEN_CHARS + 1))
    assert store.votes() == [] and store.written_answers() == []
    queue.vote(writer, item.comparison_id, "a", written="   ")  # blank: no written answer
    assert len(store.votes()) == 1 and store.written_answers() == []


def test_a_prompt_with_earlier_turns_is_exported_as_the_whole_conversation(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    ann = store.add_user("ann", "labeller", "password1")
    turns = [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "A robin."},
             {"role": "user", "content": "Another?"}]
    prompt = store.add_prompt("turns", "chat", turns)
    item = store.add_comparison(store.add_response(prompt, "A wren.", "m", {}),
                                store.add_response(prompt, "A robin.", "m", {}), batch="b1")
    store.cast_vote(item.id, ann, "a", "clear")
    export(store, tmp_path / "out")
    [row] = load_rows(tmp_path / "out", "preference")
    assert row["prompt"] == turns and row["chosen"] == [{"role": "assistant", "content": "A wren."}]


@pytest.mark.parametrize("read", ["comparisons", "written_answers", "rankings", "votes", "users"])
def test_an_export_read_while_a_labeller_votes_with_a_written_answer_stays_whole(tmp_path, monkeypatch, read):
    """Whichever of the export's reads a new labeller's vote (with a written answer) lands after, the export
    neither fails nor holds the written answer without its vote."""
    from preference_ui.queue import LabelQueue
    from rlhf.label_export import build_export

    store = store_with_votes(tmp_path, [[("a", "clear")]])
    [comparison] = store.comparisons()
    original = getattr(store, read)

    def then_a_vote_lands(*args, **kwargs):
        result = original(*args, **kwargs)
        if not store.user("late"):
            late = store.add_user("late", "labeller", "password1")
            queue = LabelQueue(store, overlap=5, gold_rate=0.0, seed=0)
            queue.vote(late, queue.next_item(late).comparison_id, "a", "clear", written="A better answer.")
        return result

    monkeypatch.setattr(store, read, then_a_vote_lands)
    rows, _ = build_export(store)
    assert store.user("late") is not None and len(store.votes()) == 2  # the vote did land, after that read
    by_id = {row["id"]: row for row in rows}
    # the export reads comparisons, written answers, rankings, votes, users, in that order: what a read finds, the
    # later reads have too; the written answer is read only after comparisons, and the vote before votes
    votes_read = 2 if read in ("comparisons", "written_answers", "rankings") else 1
    assert by_id[f"cmp-{comparison['id']}"]["votes"] == votes_read
    assert any(id.startswith("written-") for id in by_id) == (read == "comparisons")


def test_a_stores_export_that_cannot_be_read_is_named_as_the_export_not_the_copy_it_was_read_from(tmp_path):
    """The export of a store named as a stage's preferences is read from a copy outside the run folder until the
    stage publishes it: an error in it names runs/<name>/exports/<hash>, where the stage records it."""
    from rlhf.errors import DataError
    from rlhf.preference_pairs import load_pairs, preference_source
    from rlhf.runs import RunDir

    store = store_with_votes(tmp_path, [[("a", "clear")]])
    prompt = store.add_prompt("nul", "chat", [{"role": "user", "content": "Odd?"}])
    odd = store.add_comparison(store.add_response(prompt, "A \x00 byte.", "m", {}),
                               store.add_response(prompt, "Plain.", "m", {}), batch="b1")
    store.cast_vote(odd.id, store.users()[0], "a", "clear")
    found = preference_source("reward", str(store.engine.url), "", 1, RunDir(tmp_path / "runs", "r"))
    assert found["preferences"].startswith(str(tmp_path / "runs" / "r" / "exports"))
    with pytest.raises(DataError) as raised:
        load_pairs(found["preferences"], weight_by_gold=False)
    assert str(raised.value).startswith(f"{found['preferences']}:") and "NUL character" in str(raised.value)


def test_nul_characters_never_reach_the_store_from_a_model_or_a_labeller(tiny_tokenizer):
    """A byte-level tokenizer decodes byte 0 as a NUL character: PostgreSQL's text columns refuse it (a stage
    would stop mid-way) and our data files refuse it; a labeller's written answer loses it too."""
    from rlhf.generation import cut_at_stop
    from rlhf.store import check_written

    ids = tiny_tokenizer.encode("Say \x00 this", add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
    assert "\x00" in tiny_tokenizer.decode(ids) and cut_at_stop(ids, tiny_tokenizer).text == "Say  this"
    assert check_written(" A\x00 better answer. ") == "A better answer." and check_written("\x00") is None
