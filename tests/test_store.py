"""The label store on SQLite and on a real PostgreSQL server (started here from Debian's binaries)."""
import threading

import pytest
from sqlalchemy import create_engine, inspect, text, update
from sqlalchemy.exc import IntegrityError

from rlhf.errors import UserError
from rlhf.store import DuplicateVote, Meta, Store, StoreError, Vote, check_new_user, password_matches
from tests.conftest import database_numbers


def comparison_in(store, kind="train", expected=None, batch="b1"):
    prompt = store.add_prompt(f"p{next(database_numbers)}", "explain", [{"role": "user", "content": "Why?"}])
    a = store.add_response(prompt, "Because.", "m", {"temperature": 0.7})
    b = store.add_response(prompt, "No idea.", "m", {"temperature": 0.7})
    return store.add_comparison(a, b, batch=batch, kind=kind, expected=expected)


def test_passwords_are_salted_kdf_hashes_and_disabled_users_cannot_log_in(store_url):
    store = Store(store_url)
    ann, bob = store.add_user("ann", "labeller", "correct horse"), store.add_user("bob", "admin", "correct horse")
    assert ann.password_hash != bob.password_hash and ann.password_hash.startswith("scrypt$")
    assert "correct horse" not in ann.password_hash and password_matches("correct horse", ann.password_hash)
    assert store.authenticate("ann", "correct horse").name == "ann"
    assert store.authenticate("ann", "wrong horse") is None and store.authenticate("nobody", "x" * 8) is None
    store.disable_user("ann")
    assert store.authenticate("ann", "correct horse") is None
    assert store.set_disabled("ann", False).disabled is False and store.authenticate("ann", "correct horse")
    with pytest.raises(StoreError, match="already exists"):
        store.add_user("bob", "labeller", "another password")
    with pytest.raises(StoreError, match="role must be one of labeller, admin"):
        store.add_user("cy", "boss", "long enough")


def test_one_vote_per_labeller_per_comparison(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    comparison = comparison_in(store)
    vote = store.cast_vote(comparison.id, ann, "a", "slight", note="clearer", seconds=4.5, swapped=True)
    assert (vote.choice, vote.strength, vote.swapped, vote.seconds) == ("a", "slight", True, 4.5)
    with pytest.raises(DuplicateVote, match="ann has already voted on comparison"):
        store.cast_vote(comparison.id, ann, "b")
    assert [v.choice for v in store.votes(comparison.id)] == ["a"]


def test_vote_counts_cover_every_comparison_of_the_batch_including_those_without_votes(store_url):
    store = Store(store_url)
    ann, bob = (store.add_user(name, "labeller", "password1") for name in ("ann", "bob"))
    first, second, third = (comparison_in(store) for _ in range(3))
    store.cast_vote(first.id, ann, "a")
    store.cast_vote(first.id, bob, "b")
    store.cast_vote(third.id, bob, "tie")
    assert store.vote_counts("b1") == {first.id: 2, second.id: 0, third.id: 1}
    assert store.vote_counts("another batch") == {}


def test_concurrent_double_votes_store_exactly_one(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    comparison = comparison_in(store)
    outcomes, start = [], threading.Barrier(8)

    def vote():
        start.wait()
        try:
            store.cast_vote(comparison.id, ann, "tie")
            outcomes.append("stored")
        except DuplicateVote:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=vote) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["duplicate"] * 7 + ["stored"]
    assert len(store.votes(comparison.id)) == 1


def test_the_database_itself_refuses_votes_outside_the_vocabulary(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    comparison = comparison_in(store)
    with pytest.raises(StoreError, match="choice must be one of a, b, tie, both_bad"):
        store.cast_vote(comparison.id, ann, "maybe")
    with pytest.raises(StoreError, match="note is 2001 characters"):
        store.cast_vote(comparison.id, ann, "a", note="x" * 2001)
    with pytest.raises(IntegrityError):  # bypassing the API: the check constraint still holds
        with store.session() as session, session.begin():
            session.add(Vote(comparison_id=comparison.id, user_id=ann.id, choice="maybe", strength="clear"))


def test_a_strength_belongs_to_a_or_b_votes_only(store_url):
    store = Store(store_url)
    ann, bob, cy = (store.add_user(name, "labeller", "password1") for name in ("ann", "bob", "cy"))
    comparison = comparison_in(store)
    with pytest.raises(StoreError, match="a 'tie' vote has no strength"):
        store.cast_vote(comparison.id, ann, "tie", "slight")
    store.cast_vote(comparison.id, ann, "tie")
    store.cast_vote(comparison.id, bob, "b")
    store.cast_vote(comparison.id, cy, "both_bad")
    assert [(v.choice, v.strength) for v in store.votes(comparison.id)] == [("tie", None), ("b", "clear"),
                                                                           ("both_bad", None)]
    with pytest.raises(IntegrityError):  # bypassing the API: the database holds the rule too
        with store.session() as session, session.begin():
            session.add(Vote(comparison_id=comparison_in(store).id, user_id=ann.id, choice="tie", strength="slight"))


@pytest.mark.parametrize("cut_short", [False, True])
def test_a_version_2_store_is_upgraded_clearing_the_strengths_of_ties(store_url, cut_short, monkeypatch):
    """Version 2 kept a strength on every vote, and the app's sticky strength wrote 'slight' into ties: opening
    it rebuilds the votes table under the new rule, keeping every vote and the strengths of a and b votes. An
    upgrade cut short (here as it puts the votes back) leaves the store as it was, and the next open upgrades it:
    on SQLite the dropped table had been committed on its own, and the next open went on with no votes."""
    store = Store(store_url)
    users = [store.add_user(name, "labeller", "password1") for name in ("ann", "bob", "cy")]
    comparison = comparison_in(store)
    engine = create_engine(store_url)
    with engine.begin() as connection:  # the version 2 table, as version 2 created it
        connection.execute(text("DROP TABLE votes"))
        connection.execute(text(
            "CREATE TABLE votes (id INTEGER PRIMARY KEY, comparison_id INTEGER NOT NULL REFERENCES comparisons(id), "
            "user_id INTEGER NOT NULL REFERENCES users(id), choice VARCHAR(16) NOT NULL, strength VARCHAR(16) NOT "
            "NULL, note TEXT, seconds FLOAT, swapped BOOLEAN NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL, "
            "CONSTRAINT one_vote_per_labeller UNIQUE (comparison_id, user_id), "
            "CONSTRAINT vote_strength CHECK (strength IN ('slight', 'clear')))"))
        for i, (user, choice) in enumerate(zip(users, ("a", "tie", "both_bad"))):
            connection.execute(text("INSERT INTO votes VALUES (:id, :comparison, :user, :choice, 'slight', NULL, "
                                    "2.5, false, CURRENT_TIMESTAMP)"),
                               {"id": i + 1, "comparison": comparison.id, "user": user.id, "choice": choice})
        connection.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    if cut_short:
        with monkeypatch.context() as patched:
            patched.setattr(Vote.__table__, "insert", lambda: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                Store(store_url)
    upgraded = Store(store_url)
    assert [(v.id, v.choice, v.strength, v.seconds) for v in upgraded.votes()] == [
        (1, "a", "slight", 2.5), (2, "tie", None, 2.5), (3, "both_bad", None, 2.5)]
    upgraded.cast_vote(comparison_in(upgraded).id, users[0], "b")  # new votes number on after the kept ones
    assert [v.id for v in upgraded.votes()] == [1, 2, 3, 4]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "6"
    engine.dispose()


def test_gold_items_carry_their_answer_and_pairs_share_a_prompt(store_url):
    store = Store(store_url)
    assert comparison_in(store, kind="gold", expected="a").expected == "a"
    with pytest.raises(StoreError, match="gold comparisons, and only they"):
        comparison_in(store, kind="gold")
    first, second = comparison_in(store), comparison_in(store)
    with pytest.raises(StoreError, match="same prompt"):
        with store.session() as session:
            from rlhf.store import Response
            a, b = session.get(Response, first.response_a_id), session.get(Response, second.response_a_id)
        store.add_comparison(a, b, batch="b1")


def test_a_store_from_another_schema_version_is_refused(store_url):
    store = Store(store_url)
    with store.session() as session, session.begin():
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value="99"))
    with pytest.raises(StoreError, match="label store schema version 99, this code reads version 6"):
        Store(store_url)


def test_a_version_1_store_is_upgraded_in_place(store_url):
    """Version 1 created an assignments table without slots or states; opening it upgrades it, keeping the rest."""
    Store(store_url).add_user("ann", "labeller", "correct horse")
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE assignments"))
        connection.execute(text("CREATE TABLE assignments (id INTEGER PRIMARY KEY, comparison_id INTEGER, "
                                "user_id INTEGER, created_at TIMESTAMP)"))
        connection.execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    assert Store(store_url).authenticate("ann", "correct horse") is not None
    columns = {column["name"] for column in inspect(engine).get_columns("assignments")}
    assert {"slot", "swapped", "status"} <= columns
    with engine.connect() as connection:
        version = connection.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
        assert version == "6"  # and on to version 6
    engine.dispose()


def ranking_item_in(store, answers=4, batch="r1"):
    prompt = store.add_prompt(f"p{next(database_numbers)}", "explain", [{"role": "user", "content": "Why?"}])
    responses = [store.add_response(prompt, f"Answer {i}.", "m", {"temperature": 0.7}) for i in range(answers)]
    return store.add_ranking_item(responses, batch=batch), responses


def test_a_ranking_item_lists_its_answers_and_takes_one_ranking_per_labeller(store_url):
    store = Store(store_url)
    ann, bob = store.add_user("ann", "labeller", "password1"), store.add_user("bob", "labeller", "password1")
    item, responses = ranking_item_in(store)
    assert store.ranking_answers(item.id) == [response.id for response in responses]
    assert (item.response_a_id, item.response_b_id) == (responses[0].id, responses[1].id)
    ranking = store.cast_ranking(item.id, ann, [2, 1, 3, 3], note="the second is clearest", seconds=12.5)
    assert (ranking.ranks, ranking.note, ranking.seconds) == ([2, 1, 3, 3], "the second is clearest", 12.5)
    with pytest.raises(DuplicateVote, match="ann has already ranked"):
        store.cast_ranking(item.id, ann, [1, 2, 3, 4])
    store.cast_ranking(item.id, bob, [1, 2, 3, 4])
    assert [(r.user_id, r.ranks) for r in store.rankings(item.id)] == [(ann.id, [2, 1, 3, 3]), (bob.id, [1, 2, 3, 4])]
    pairwise = comparison_in(store, batch="r1")
    store.cast_vote(pairwise.id, ann, "a")
    assert store.vote_counts("r1") == {item.id: 2, pairwise.id: 1}
    assert store.ranking_answers(pairwise.id) == []


def test_rankings_and_votes_each_go_only_to_their_own_kind_of_item(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    item, _ = ranking_item_in(store, answers=3)
    for ranks, message in (([1, 2], "has 3 answers to rank, got 2 ranks"), ([0, 1, 2], "whole numbers from 1"),
                           ([1, 2, 3, 4, 5, 6, 7], "2 to 6 answers")):
        with pytest.raises(StoreError, match=message):
            store.cast_ranking(item.id, ann, ranks)
    with pytest.raises(StoreError, match="is a ranking item: it takes a ranking, not a vote"):
        store.cast_vote(item.id, ann, "a")
    with pytest.raises(StoreError, match="is pairwise: it takes a vote, not a ranking"):
        store.cast_ranking(comparison_in(store).id, ann, [1, 2])
    assert store.rankings() == [] and store.votes() == []


def test_a_ranking_item_needs_two_to_six_distinct_answers_to_one_prompt(store_url):
    store = Store(store_url)
    _, responses = ranking_item_in(store, answers=6)
    _, others = ranking_item_in(store, answers=2)
    for answers, kind, message in ((responses[:1], "train", "2 to 6 answers"),
                                   ([*responses, others[0]], "train", "2 to 6 answers"),
                                   ([responses[0], others[0]], "train", "same prompt"),
                                   ([responses[0], responses[0]], "train", "each answer once"),
                                   (responses[:3], "gold", "gold items are pairwise")):
        with pytest.raises(StoreError, match=message):
            store.add_ranking_item(answers, batch="r1", kind=kind)


def test_a_version_3_store_gains_ranking_items_keeping_its_votes(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    store.cast_vote(comparison_in(store).id, ann, "b", "slight")
    engine = create_engine(store_url)
    with engine.begin() as connection:  # as version 3 left it: no ranking tables
        connection.execute(text("DROP TABLE written_answers"))
        connection.execute(text("DROP TABLE rankings"))
        connection.execute(text("DROP TABLE comparison_answers"))
        connection.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    upgraded = Store(store_url)
    assert [(v.choice, v.strength) for v in upgraded.votes()] == [("b", "slight")]
    item, _ = ranking_item_in(upgraded, answers=2)
    assert upgraded.cast_ranking(item.id, ann, [2, 1]).ranks == [2, 1]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "6"
    engine.dispose()


def test_a_version_4_store_gains_closed_batches_keeping_its_votes(store_url):
    store = Store(store_url)
    ann = store.add_user("ann", "labeller", "password1")
    store.cast_vote(comparison_in(store).id, ann, "b", "slight")
    engine = create_engine(store_url)
    with engine.begin() as connection:  # as version 4 left it
        connection.execute(text("DROP TABLE closed_batches"))
        connection.execute(text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    upgraded = Store(store_url)
    assert [(v.choice, v.strength) for v in upgraded.votes()] == [("b", "slight")]
    upgraded.close_batch("b1", by_hand=True)
    assert list(upgraded.closed_batches()) == ["b1"] and upgraded.closed_by_hand() == {"b1"}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "6"
    engine.dispose()


def test_a_version_5_store_keeps_its_closed_batches_as_exported(store_url):
    store = Store(store_url)
    comparison_in(store, batch="exported")
    engine = create_engine(store_url)
    with engine.begin() as connection:  # as version 5 left it: a batch closed, nothing said of how
        connection.execute(text("ALTER TABLE closed_batches DROP COLUMN by_hand"))
        connection.execute(text("INSERT INTO closed_batches (batch, closed_at) VALUES ('exported', '2026-12-01')"))
        connection.execute(text("UPDATE meta SET value = '5' WHERE key = 'schema_version'"))
    upgraded = Store(store_url)
    assert list(upgraded.closed_batches()) == ["exported"] and upgraded.closed_by_hand() == set()
    upgraded.close_batch("later", by_hand=True)
    assert upgraded.closed_by_hand() == {"later"}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "6"
    engine.dispose()


def test_users_command_adds_lists_disables_and_enables(tmp_path, monkeypatch, capsys):
    import io

    from pipeline.cli import main as cli

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli(["label", "--db", db, "users", "add", "ann", "--role", "admin"]) == 2
    assert "password of at least 8 characters" in capsys.readouterr().err
    assert not (tmp_path / "labels.db").exists()  # refused before a store was made for the user
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-passphrase\n"))
    assert cli(["label", "--db", db, "users", "add", "a" * 129]) == 2  # wider than the store's column
    assert "a user name holds at most 128 characters" in capsys.readouterr().err
    for name in (" ann", "ann ", "a\tb", "ann\x01", "ann\u200b"):  # reads as another account's name, or hides
        monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-passphrase\n"))
        assert cli(["label", "--db", db, "users", "add", name]) == 2
        assert f"user name {name!r}: no spaces around it and no control or invisible characters" in \
            capsys.readouterr().err
    assert not (tmp_path / "labels.db").exists()
    check_new_user("مهر\u200cناز", "labeller", "s3cret-passphrase")  # a joiner names are written with: a name
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-passphrase\r\n"))  # a Windows line end: no \r kept
    assert cli(["label", "--db", db, "users", "add", "ann", "--role", "admin"]) == 0
    assert cli(["label", "--db", db, "users", "disable", "ann"]) == 0
    assert cli(["label", "--db", db, "users", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["ann", "admin", "disabled"]
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli(["label", "--db", db, "users", "add", "bob"]) == 2
    assert "password of at least 8 characters" in capsys.readouterr().err
    assert Store(db).authenticate("ann", "s3cret-passphrase") is None  # disabled
    assert cli(["label", "--db", db, "users", "enable", "ann"]) == 0
    assert Store(db).authenticate("ann", "s3cret-passphrase").name == "ann"
    assert cli(["label", "--db", db, "users", "enable", "nobody"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    key = tmp_path / "key.pem"
    key.write_text("not read: the certificate is missing")
    assert cli(["label", "--db", db, "serve", "--ssl-keyfile", str(key)]) == 2
    assert "HTTPS needs both --ssl-keyfile and --ssl-certfile" in capsys.readouterr().err
    assert cli(["label", "--db", db, "serve", "--ssl-keyfile", str(key), "--ssl-certfile",
                str(tmp_path / "no.pem")]) == 2
    assert f"{tmp_path / 'no.pem'}: no such file" in capsys.readouterr().err
    assert cli(["label", "--db", db, "serve", "--batch", "typo"]) == 2  # would hand out gold items only
    assert "no batch 'typo' in" in capsys.readouterr().err
    store = Store(db)
    comparison_in(store, batch="done")
    store.close_batch("done")  # exported by its preferences stage: nothing of it would be served or voted
    for command in (["serve"], ["simulate", "--judge", "builtin:length"]):
        assert cli(["label", "--db", db, *command, "--batch", "done"]) == 2
        assert "batch 'done' was exported and closed at " in capsys.readouterr().err
    assert cli(["label", "--db", db, "stats", "--batch", "done"]) == 0  # read, not labelled
    capsys.readouterr()
    assert store.closed_by_hand() == set()
    assert cli(["label", "--db", db, "close", "done"]) == 0  # kept closed from now on, whatever a stage wants
    assert "was closed by its export at " in capsys.readouterr().out and store.closed_by_hand() == {"done"}
    assert cli(["label", "--db", db, "reopen", "done"]) == 0
    assert "reopened batch 'done' (closed at " in capsys.readouterr().out
    assert cli(["label", "--db", db, "simulate", "--judge", "builtin:length", "--labellers", "1", "--batch",
                "done"]) == 0
    assert len(store.votes()) == 1
    assert cli(["label", "--db", db, "reopen", "done"]) == 0
    assert "is open already" in capsys.readouterr().out
    assert cli(["label", "--db", db, "close", "done"]) == 0
    assert "closed batch 'done'" in capsys.readouterr().out
    assert list(store.closed_batches()) == ["done"] and store.closed_by_hand() == {"done"}
    assert cli(["label", "--db", db, "serve", "--batch", "done"]) == 2
    assert "batch 'done' was closed by hand at " in capsys.readouterr().err
    assert cli(["label", "--db", db, "close", "done"]) == 0
    assert "was already closed by hand (at " in capsys.readouterr().out
    assert cli(["label", "--db", db, "close", "typo"]) == 2
    assert "no batch 'typo' in" in capsys.readouterr().err
    comparison_in(store, kind="gold", expected="a", batch="gold")
    assert cli(["label", "--db", db, "close", "gold"]) == 2  # mixed into every batch
    assert "holds gold items" in capsys.readouterr().err
    assert list(store.closed_batches()) == ["done"]


def test_a_human_wait_on_a_batch_closed_by_hand_before_any_comparison_has_its_votes_stops(store_url):
    from preference_ui.collect import wait_for_votes
    from preference_ui.config import PreferencesStageConfig

    store = Store(store_url)
    comparison_in(store, batch="early")
    store.close_batch("early", by_hand=True)
    with pytest.raises(UserError, match="batch 'early' was closed by hand before any comparison had 1 vote.*"
                                        "`rlhf label reopen early`, then run the stage again"):
        wait_for_votes(store, "early", PreferencesStageConfig(poll_seconds=0.1))


def test_every_label_command_given_a_run_config_uses_that_runs_own_store(tmp_path, monkeypatch, capsys,
                                                                          tiny_model_path):
    import io

    from pipeline.cli import main as cli
    from tests.conftest import REPO

    monkeypatch.delenv("RLHF_DB_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # where the store without a run config would be: runs/labels.db
    config = tmp_path / "run.yaml"
    config.write_text(f"run:\n  name: mine\n  output_root: {tmp_path / 'runs'}\n  tracking: none\n"
                      f"preferences:\n  model: {tiny_model_path}\n  prompts: {REPO / 'data/rl_prompts.jsonl'}\n"
                      f"  guidelines: {REPO / 'data/guidelines.md'}\n  num_prompts: 3\n  responses_per_prompt: 2\n"
                      "  max_new_tokens: 6\n")
    own = tmp_path / "runs" / "mine" / "labels.db"
    assert cli(["label", "sample", "--config", str(config)]) == 0
    assert f"created the label store sqlite:///{own}" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-passphrase\n"))
    assert cli(["label", "users", "add", "ann", "--config", str(config)]) == 0
    assert [user.name for user in Store(f"sqlite:///{own}").users()] == ["ann"]
    assert cli(["label", "stats", "--config", str(config)]) == 0
    assert len(Store(f"sqlite:///{own}").comparisons()) == 3 and "3 comparisons" in capsys.readouterr().out
    # serve opens the same store (the shared default is not there: it would refuse that first) and looks the
    # user up in it
    assert cli(["label", "serve", "--config", str(config), "--no-auth", "--user", "nobody"]) == 2
    assert "needs --user NAME, an existing user" in capsys.readouterr().err
    # without a run config or --db: the shared default, which is not there and is not made by reading it
    assert cli(["label", "stats"]) == 2
    assert "no label store at" in capsys.readouterr().err and not (tmp_path / "runs" / "labels.db").exists()
