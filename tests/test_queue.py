"""Who labels what: overlap, gold mix-in, reloads and second tabs, skips and timeouts (SQLite and PostgreSQL)."""
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from preference_ui.gold import import_gold
from preference_ui.queue import BatchClosed, ItemGone, LabelQueue, unswap
from rlhf.errors import DataError, UserError
from rlhf.store import Assignment, DuplicateVote, LabellerDisabled, Store, StoreError, utcnow
from tests.conftest import database_numbers


def add_comparisons(store, count, batch="b1", kind="train", expected=None):
    made = []
    for _ in range(count):
        number = next(database_numbers)
        prompt = store.add_prompt(f"p{number}", "explain", [{"role": "user", "content": f"Question {number}?"}])
        a = store.add_response(prompt, f"answer a{number}", "m", {})
        b = store.add_response(prompt, f"answer b{number}", "m", {})
        made.append(store.add_comparison(a, b, batch=batch, kind=kind, expected=expected))
    return made


def labellers(store, count):
    return [store.add_user(f"labeller{i}", "labeller", "password1") for i in range(count)]


def backdate_assignments(store, minutes):
    """Every assignment made `minutes` ago."""
    with store.transaction() as session:
        session.execute(update(Assignment).values(created_at=utcnow() - timedelta(minutes=minutes)))


def assignments(store):
    with store.session() as session:
        return list(session.scalars(select(Assignment)))


def test_each_comparison_goes_to_overlap_distinct_labellers(store_url):
    store = Store(store_url)
    add_comparisons(store, 4)
    queue = LabelQueue(store, overlap=2, gold_rate=0.0, seed=0)
    seen = {user.name: [] for user in labellers(store, 3)}
    for _ in range(4):
        for user in store.users():
            item = queue.next_item(user)
            if item is not None:
                seen[user.name].append(item.comparison_id)
                queue.vote(user, item.comparison_id, "a")
    assert all(len(ids) == len(set(ids)) for ids in seen.values())  # never the same item twice
    per_item = [sum(c["id"] in ids for ids in seen.values()) for c in store.comparisons()]
    assert per_item == [2, 2, 2, 2] and len(store.votes()) == 8
    assert all(queue.next_item(user) is None for user in store.users())


def test_a_reload_shows_the_same_item_and_a_second_tab_cannot_vote_again(store_url):
    store = Store(store_url)
    add_comparisons(store, 3)
    ann = labellers(store, 1)[0]
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, seed=0)
    first = queue.next_item(ann)
    assert queue.next_item(ann) == first  # reload / second tab
    queue.vote(ann, first.comparison_id, "a", "slight", "close call", seconds=3.5)
    with pytest.raises(DuplicateVote):
        queue.vote(ann, first.comparison_id, "b")  # the stale tab
    assert [(v.comparison_id, v.strength, v.note, v.seconds) for v in store.votes()] == \
        [(first.comparison_id, "slight", "close call", 3.5)]
    assert queue.next_item(ann).comparison_id != first.comparison_id


def test_an_exported_batch_serves_no_items_and_takes_no_answers_until_it_is_reopened(store_url):
    """Round 1's overlap places left over after its export came before round 2's items (the oldest first), and
    the votes there were never exported."""
    store = Store(store_url)
    round_1, round_2 = add_comparisons(store, 2, batch="round-1"), add_comparisons(store, 1, batch="round-2")
    ann, bob, cy = labellers(store, 3)
    queue = LabelQueue(store, overlap=2, gold_rate=0.0, seed=0)
    held, voted = queue.next_item(ann), queue.next_item(bob)
    assert {held.comparison_id, voted.comparison_id} <= {c.id for c in round_1}
    queue.vote(bob, voted.comparison_id, "a")
    store.close_batch("round-1")
    store.close_batch("round-1")  # (closed twice: closed)
    assert list(store.closed_batches()) == ["round-1"]
    with pytest.raises(BatchClosed, match=rf"comparison {held.comparison_id}'s batch was closed at .* UTC and "
                                          "takes no more answers"):
        queue.vote(ann, held.comparison_id, "a")
    with pytest.raises(DuplicateVote):  # bob's second tab: his first vote counted, before the close
        queue.vote(bob, voted.comparison_id, "b")
    with store.transaction() as session:  # ann's item timed out: an answer on it is not taken back either
        session.execute(update(Assignment).where(Assignment.user_id == ann.id).values(status="expired", slot=None))
    with pytest.raises(BatchClosed):
        queue.vote(ann, held.comparison_id, "a")
    assert [a.status for a in assignments(store) if a.user_id == ann.id] == ["expired"]
    assert len(store.votes()) == 1
    for user in (ann, bob, cy):  # round 2's item for the first two, then nothing: round 1's places are not served
        item = queue.next_item(user)
        if user is cy:
            assert item is None
            continue
        assert item.comparison_id == round_2[0].id
        queue.vote(user, item.comparison_id, "b")
    assert queue.next_item(ann) is None and queue.progress(cy)["remaining"] == 0
    store.reopen_batch("round-1")  # a stage collecting it again (min_votes raised), in another process: the
    queue = LabelQueue(store, overlap=2, gold_rate=0.0, seed=0)  # app's queue finds it within a minute (starts)
    assert store.closed_batches() == {}
    assert queue.next_item(cy).comparison_id in {c.id for c in round_1}


def test_a_batch_closing_while_a_vote_is_under_way_waits_for_it(store_url):
    """The stage exports right after the close: a vote whose check found the batch open must be committed by then
    (on PostgreSQL's READ COMMITTED it could commit after the close; the close lock makes the close wait. On
    SQLite the process's write lock serialises the two already: the PostgreSQL case is the one the lock is for)."""
    store = Store(store_url)
    [comparison] = add_comparisons(store, 1)
    [ann] = labellers(store, 1)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, seed=0)
    item = queue.next_item(ann)
    checked, release = threading.Event(), threading.Event()

    def slow_vote(connection, swapped):  # the batch was open when checked; the vote commits once released
        connection.execute(queue.sql.new_vote, dict(comparison_id=item.comparison_id, user_id=ann.id, choice="a",
                                                     strength="clear", note=None, seconds=None, swapped=swapped,
                                                     created_at=utcnow()))
        checked.set()
        assert release.wait(30)

    voting = threading.Thread(target=queue.answer, args=(ann, item.comparison_id, slow_vote, "voted on"))
    voting.start()
    closing = threading.Thread(target=store.close_batch, args=("b1",))
    try:
        assert checked.wait(30)
        closing.start()
        closing.join(1.0)
        assert closing.is_alive()  # waiting for the vote under way
    finally:
        release.set()
        voting.join(30)
    closing.join(30)
    assert not closing.is_alive() and list(store.closed_batches()) == ["b1"]
    assert [vote.comparison_id for vote in store.votes()] == [comparison.id]  # what an export now reads


def test_an_account_disabled_while_it_holds_an_item_votes_and_ranks_no_more(store_url):
    """As an admin disabling a simulated or AI labeller mid-run from another process: its next answer is refused
    and nothing is stored; enabled again, the same open item takes its vote."""
    store = Store(store_url)
    add_comparisons(store, 2)
    ann = labellers(store, 1)[0]
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, seed=0)
    item = queue.next_item(ann)
    store.set_disabled(ann.name, True)
    with pytest.raises(LabellerDisabled, match="labeller 'labeller0' is disabled.*users enable labeller0"):
        queue.vote(ann, item.comparison_id, "a")
    with pytest.raises(LabellerDisabled):
        store.cast_vote(item.comparison_id, ann, "a")
    assert store.votes() == [] and [a.status for a in assignments(store)] == ["open"]
    store.set_disabled(ann.name, False)
    queue.vote(ann, item.comparison_id, "a")
    assert [vote.comparison_id for vote in store.votes()] == [item.comparison_id]


def test_the_side_swap_is_undone_before_the_vote_is_stored(store_url):
    store = Store(store_url)
    add_comparisons(store, 12)
    ann = labellers(store, 1)[0]
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, seed=1)
    swaps = []
    while (item := queue.next_item(ann)) is not None:
        comparison = next(c for c in store.comparisons() if c["id"] == item.comparison_id)
        assert (item.left, item.right) == ((comparison["b"], comparison["a"]) if item.swapped
                                           else (comparison["a"], comparison["b"]))
        shown_choice = "a" if item.left.startswith("answer a") else "b"  # always pick the comparison's own `a`
        queue.vote(ann, item.comparison_id, shown_choice)
        swaps.append(item.swapped)
    assert True in swaps and False in swaps
    assert [vote.choice for vote in store.votes()] == ["a"] * 12
    assert [vote.swapped for vote in store.votes()] == swaps
    assert unswap("tie", True) == "tie" and unswap("both_bad", True) == "both_bad"


def test_racing_labellers_never_overfill_a_comparison(store_url):
    store = Store(store_url)
    add_comparisons(store, 1)
    users = labellers(store, 8)
    queue = LabelQueue(store, overlap=3, gold_rate=0.0)
    barrier, got = threading.Barrier(len(users)), []

    def take(user):
        barrier.wait()
        got.append(queue.next_item(user))

    threads = [threading.Thread(target=take, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(item is not None for item in got) == 3
    assert sorted(a.slot for a in assignments(store)) == [0, 1, 2]


def test_a_skip_frees_the_slot_for_someone_else_and_comes_back_only_when_nothing_else_is_left(store_url):
    store = Store(store_url)
    add_comparisons(store, 2)
    ann, bob = labellers(store, 2)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0)
    item = queue.next_item(ann)
    queue.skip(ann, item.comparison_id)
    with pytest.raises(ItemGone, match="skipped"):
        queue.vote(ann, item.comparison_id, "a")
    other = queue.next_item(ann)
    assert other.comparison_id != item.comparison_id  # the other item first
    assert queue.next_item(bob).comparison_id == item.comparison_id  # the slot ann's skip freed
    queue.vote(ann, other.comparison_id, "a")
    assert queue.next_item(ann) is None  # the skipped item's one slot is bob's now
    assert queue.progress(ann) == {"votes": 1, "skipped": 1, "remaining": 0, "mean_seconds": None}
    queue.skip(bob, item.comparison_id)
    assert queue.next_item(ann).comparison_id == item.comparison_id  # its slot free again, and nothing else left
    queue.vote(ann, item.comparison_id, "b")
    assert queue.progress(ann) == {"votes": 2, "skipped": 0, "remaining": 0, "mean_seconds": None}
    assert queue.next_item(bob) is None and queue.next_item(ann) is None


def test_a_lone_labellers_timed_out_or_skipped_item_comes_back_so_it_can_get_its_votes(store_url):
    """One person on a laptop: an item they let time out, or skipped, would otherwise wait for a vote for ever
    (and `rlhf run` with it)."""
    store = Store(store_url)
    add_comparisons(store, 2)
    [ann] = labellers(store, 1)
    queue = LabelQueue(store, overlap=3, gold_rate=0.0, timeout_minutes=5)
    first = queue.next_item(ann)
    backdate_assignments(store, minutes=6)
    queue.last_release = float("-inf")
    second = queue.next_item(ann)
    assert second.comparison_id != first.comparison_id
    queue.skip(ann, second.comparison_id)
    assert queue.progress(ann)["remaining"] == 2
    for expected in (first, second):
        item = queue.next_item(ann)
        assert item.comparison_id == expected.comparison_id
        queue.vote(ann, item.comparison_id, "a")
    assert queue.next_item(ann) is None and sorted(store.vote_counts("b1").values()) == [1, 1]


def test_skipping_what_is_left_goes_round_the_set_aside_items_not_back_to_the_same_one(store_url):
    store = Store(store_url)
    add_comparisons(store, 3)
    [ann] = labellers(store, 1)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0)
    shown = []
    for _ in range(9):
        item = queue.next_item(ann)
        shown.append(item.comparison_id)
        queue.skip(ann, item.comparison_id)
    assert len(set(shown[:3])) == 3 and shown == shown[:3] * 3  # (by assignment id: the first, again and again)


def test_an_item_left_open_past_the_timeout_goes_back_to_the_pool(store_url):
    store = Store(store_url)
    add_comparisons(store, 1)
    ann, bob = labellers(store, 2)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, timeout_minutes=5)
    item = queue.next_item(ann)
    backdate_assignments(store, minutes=6)
    queue.last_release = float("-inf")
    bobs = queue.next_item(bob)
    assert bobs.comparison_id == item.comparison_id
    with pytest.raises(ItemGone, match="expired"):
        queue.vote(ann, item.comparison_id, "a")
    queue.vote(bob, item.comparison_id, "b")
    assert [(vote.user_id, vote.choice) for vote in store.votes()] == [(bob.id, unswap("b", bobs.swapped))]


def test_an_answer_on_an_item_that_timed_out_counts_while_its_slot_is_still_free(store_url):
    """A labeller writing a long answer past the timeout: the item expired (another labeller's request released
    it) but nobody took its slot, so the vote and what they wrote count, on that slot. A ranking likewise."""
    store = Store(store_url)
    add_comparisons(store, 1)
    prompt = store.add_prompt("ranked", "explain", [{"role": "user", "content": "Rank these?"}])
    store.add_ranking_item([store.add_response(prompt, f"answer {i}", "m", {}) for i in range(3)], batch="b1")
    ann, bob = labellers(store, 2)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, timeout_minutes=5)
    for _ in range(2):
        item = queue.next_item(ann)
        backdate_assignments(store, minutes=6)
        queue.last_release = float("-inf")
        queue.release_stale()
        if item.answers:
            queue.rank(ann, item.comparison_id, [1, 2, 3])
        else:
            queue.vote(ann, item.comparison_id, "a", written="A better answer, written slowly.")
    assert [vote.user_id for vote in store.votes()] == [ann.id] and len(store.rankings()) == 1
    assert [answer.text for answer in store.written_answers()] == ["A better answer, written slowly."]
    assert queue.next_item(bob) is None  # both slots are ann's again: nothing left for bob
    assert {(a.status, a.slot) for a in assignments(store)} == {("voted", 0)}


def test_a_simulated_labellers_queue_expires_only_its_own_labellers_items(store_url):
    """The app's timeout is its own setting: another process's queue (simulated or AI labellers, built with the
    default timeout) leaves a person's open item alone."""
    store = Store(store_url)
    add_comparisons(store, 3)
    person, sim = labellers(store, 2)
    app = LabelQueue(store, overlap=1, gold_rate=0.0, timeout_minutes=120)
    item = app.next_item(person)
    backdate_assignments(store, minutes=45)
    simulated = LabelQueue(store, overlap=1, gold_rate=0.0, expires_others=False)  # 30 minutes
    assert simulated.next_item(sim).comparison_id != item.comparison_id
    app.vote(person, item.comparison_id, "a")  # still theirs
    backdate_assignments(store, minutes=45)
    simulated.last_release = float("-inf")
    simulated.next_item(sim)  # its own labeller's stale item: expired (and a fresh one given)
    with store.transaction() as session:
        states = sorted(session.execute(select(Assignment.user_id, Assignment.status)).all())
    assert states == sorted([(person.id, "voted"), (sim.id, "expired"), (sim.id, "open")])


def test_gold_items_are_mixed_in_for_everyone_and_never_use_up_the_overlap(store_url):
    store = Store(store_url)
    add_comparisons(store, 40, batch="b1")
    import_gold(store, "data/gold_comparisons.jsonl")
    ann, bob = labellers(store, 2)
    queue = LabelQueue(store, overlap=1, gold_rate=0.25, batch="b1", seed=3)
    kinds = {ann.name: [], bob.name: []}
    for _ in range(26):
        for user in (ann, bob):
            item = queue.next_item(user)
            kinds[user.name].append(item.kind)
            queue.vote(user, item.comparison_id, "a")
    for name, seen in kinds.items():
        share = seen.count("gold") / len(seen)
        assert 0.1 < share < 0.45, (name, share)  # 12 gold items, drawn at about a quarter of the time
    gold = {c["id"] for c in store.comparisons("gold")}
    gold_voters = {}
    for vote in store.votes():
        if vote.comparison_id in gold:
            gold_voters.setdefault(vote.comparison_id, set()).add(vote.user_id)
    assert any(len(voters) == 2 for voters in gold_voters.values())  # overlap 1 does not apply to gold


def test_gold_is_spread_through_a_short_queue_and_not_left_for_its_end(store_url):
    """6 gold and 6 other items at gold_rate 0.1: drawn at the rate alone, most gold would come last, where an
    attentive labeller could spot it; drawn at the share of gold left, it is spread through the queue."""
    store = Store(store_url)
    users = labellers(store, 8)
    add_comparisons(store, 6, batch="gold", kind="gold", expected="a")
    positions = []
    for seed, user in enumerate(users):  # a batch of 6 each; the gold items are everyone's
        add_comparisons(store, 6, batch=f"short{seed}")
        queue = LabelQueue(store, overlap=1, gold_rate=0.1, batch=f"short{seed}", seed=seed)
        kinds = []
        while len(kinds) < 12:
            item = queue.next_item(user)
            queue.progress(user)  # as the app does after every item: the counts the share comes from
            kinds.append(item.kind)
            queue.vote(user, item.comparison_id, "a")
        assert kinds.count("gold") == 6 and kinds[-6:] != ["gold"] * 6
        positions += [position for position, kind in enumerate(kinds) if kind == "gold"]
    assert sum(positions) / len(positions) < 7.0  # uniform: 5.5; gold last: 8.5


def test_no_gold_at_rate_zero_and_a_vote_needs_an_assignment(store_url):
    store = Store(store_url)
    train = add_comparisons(store, 3)
    add_comparisons(store, 3, kind="gold", expected="a")
    ann = labellers(store, 1)[0]
    queue = LabelQueue(store, overlap=1, gold_rate=0.0)
    kinds = []
    while (item := queue.next_item(ann)) is not None:
        kinds.append(item.kind)
        queue.vote(ann, item.comparison_id, "tie")
    assert kinds == ["train"] * 3
    bob = store.add_user("bob", "labeller", "password1")
    with pytest.raises(ItemGone, match="not assigned"):
        LabelQueue(store).vote(bob, train[0].id, "a")
    item = LabelQueue(store, overlap=2, gold_rate=0.0).next_item(bob)
    for bad, message in (({"shown_choice": "left"}, "choice must be one of a, b, tie, both_bad, got 'left'"),
                         ({"shown_choice": "a", "strength": "huge"}, "strength must be one of .*, got 'huge'"),
                         ({"shown_choice": "a", "note": "x" * 2001}, "note is 2001 characters")):
        with pytest.raises(StoreError, match=message):  # told as such, not turned down by the database
            queue.vote(bob, item.comparison_id, **bad)
    assert len(store.votes()) == 3


def test_gold_import_is_idempotent_and_checks_its_rows(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    assert import_gold(store, "data/gold_comparisons.jsonl") == {"batch": "gold", "items": 12, "unchanged": False}
    assert import_gold(store, "data/gold_comparisons.jsonl")["unchanged"] is True
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "2+2?", "a": "4", "b": "5", "expected": "a"}\n')
    with pytest.raises(UserError, match="already holds different comparisons"):
        import_gold(store, str(other))
    other.write_text('{"prompt": "2+2?", "a": "4", "b": "5", "expected": "a"}\n'
                     '{"prompt": "3+3?", "a": "6", "b": "7", "expected": "left"}\n')
    with pytest.raises(DataError, match=r"other.jsonl:2: expected: expected one of a, b, tie, both_bad"):
        import_gold(store, str(other), batch="gold2")


def test_a_gold_import_cut_short_leaves_no_gold_items_and_the_next_one_imports_them_all(tmp_path, monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    add_response, calls = store.add_response, []

    def killed_at_the_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a killed `rlhf run` would stop it
        return add_response(*args)

    monkeypatch.setattr(store, "add_response", killed_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        import_gold(store, "data/gold_comparisons.jsonl")
    assert store.comparisons("gold") == []
    monkeypatch.setattr(store, "add_response", add_response)
    assert import_gold(store, "data/gold_comparisons.jsonl") == {"batch": "gold", "items": 12, "unchanged": False}
    assert len(store.comparisons("gold")) == 12


def add_ranking_items(store, count, answers=4, batch="b1"):
    made = []
    for _ in range(count):
        number = next(database_numbers)
        prompt = store.add_prompt(f"p{number}", "explain", [{"role": "user", "content": f"Question {number}?"}])
        responses = [store.add_response(prompt, f"answer {i} to {number}", "m", {}) for i in range(answers)]
        made.append(store.add_ranking_item(responses, batch=batch))
    return made


def test_a_ranking_item_is_shown_shuffled_per_labeller_and_stored_in_its_own_order(store_url):
    store = Store(store_url)
    [item] = add_ranking_items(store, 1, answers=5)
    queue = LabelQueue(store, overlap=3, gold_rate=0.0, seed=0)
    shown = {}
    for user in labellers(store, 3):
        first = queue.next_item(user)
        assert first.comparison_id == item.id and queue.next_item(user).answers == first.answers  # a reload
        assert sorted(text.split()[1] for text in first.answers) == ["0", "1", "2", "3", "4"]
        shown[user.name] = first
        # each labeller ranks the answers by the number in their text, whatever order they were shown in
        queue.rank(user, item.id, [int(text.split()[1]) + 1 for text in first.answers], seconds=9.0)
    assert len({tuple(one.answers) for one in shown.values()}) > 1  # not everyone sees the same order
    assert [ranking.ranks for ranking in store.rankings(item.id)] == [[1, 2, 3, 4, 5]] * 3
    assert queue.next_item(store.user("labeller0")) is None
    with pytest.raises(DuplicateVote):
        queue.rank(store.user("labeller0"), item.id, [1, 2, 3, 4, 5])


def test_a_ranking_item_takes_no_vote_and_a_bad_ranking_changes_nothing(store_url):
    store = Store(store_url)
    [item] = add_ranking_items(store, 1, answers=3)
    queue = LabelQueue(store, overlap=1, gold_rate=0.0, seed=0)
    [ann] = labellers(store, 1)
    assert queue.next_item(ann).answers
    with pytest.raises(StoreError, match="it takes a ranking, not a vote"):
        queue.vote(ann, item.id, "a")
    for ranks in ([1, 2], [1, 2, 0]):
        with pytest.raises(StoreError):
            queue.rank(ann, item.id, ranks)
    assert store.rankings() == [] and queue.next_item(ann).comparison_id == item.id  # still open for a real one
    queue.rank(ann, item.id, [2, 1, 2])
    assert len(store.rankings()) == 1
