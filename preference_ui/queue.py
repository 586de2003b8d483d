"""Who labels what: each labeller's queue of comparisons, drawn from the store.

- A labeller always gets back the item they were shown and have not answered (a reload or a second tab shows
  the same item), so they hold at most one open item at a time in normal use.
- Train and eval comparisons go to `overlap` distinct labellers: a new assignment takes a numbered slot, and
  the database's unique (comparison, slot) constraint settles races for the last slot.
- Gold comparisons go to every labeller once, drawn at `gold_rate`.
- A vote is accepted only for the labeller's own open assignment, and the store's one-vote-per-labeller
  constraint turns a second vote from another tab into `DuplicateVote`.
- An item left open longer than `timeout` goes back to the pool; its labeller will not get it again.
- A ranking item (2 to 6 answers, rlhf/rankings.py) is handed out like a comparison; each labeller sees its
  answers in their own fixed shuffled order (against position bias, as the side swap does for pairs), and the
  ranking is stored in the item's own order.
"""
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, bindparam, exists, func, insert, null, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from rlhf.store import (Assignment, ClosedBatch, Comparison, ComparisonAnswer, DuplicateVote, Prompt, Ranking,
                        Response, Store, StoreError, User, Vote, WrittenAnswer, check_note, check_ranking, check_vote,
                        check_written, hold_close_lock, shown_utc, utcnow, vote_strength)

CANDIDATES = 32  # draw among this many of the oldest open comparisons, so concurrent labellers rarely collide
ATTEMPTS = 64  # tries to take a slot while other labellers keep winning the race for it
PROGRESS_REFRESH = 10.0  # seconds between full counts of a labeller's remaining items


@dataclass
class Item:
    """A comparison as one labeller sees it: `left`/`right` already in the order shown. A ranking item also has
    all its `answers` in the order shown; `order[i]` is the item's own position of the answer shown i-th."""
    comparison_id: int
    prompt: list[dict]
    left: str
    right: str
    swapped: bool
    kind: str
    answers: list[str] = field(default_factory=list)
    order: list[int] = field(default_factory=list)


def shown_order(comparison_id: int, user_id: int, answers: int) -> list[int]:
    """The order one labeller sees a ranking item's answers in: shuffled, and the same on every reload."""
    order = list(range(answers))
    random.Random(f"{comparison_id}:{user_id}").shuffle(order)
    return order


def unshuffle(shown_ranks: list[int], order: list[int]) -> list[int]:
    """Ranks given to the answers as shown, in the item's own order of its answers."""
    ranks = [0] * len(order)
    for shown, position in enumerate(order):
        ranks[position] = shown_ranks[shown]
    return ranks


class ItemGone(StoreError):
    """The item shown is no longer this labeller's to vote on (skipped, timed out, or never assigned)."""


class BatchClosed(ItemGone):
    """The item's batch has been closed (exported, or by hand): an answer now would never be exported."""


def unswap(shown_choice: str, swapped: bool) -> str:
    """The choice in the comparison's own a/b terms: "a" means the response shown on the left."""
    if swapped and shown_choice in ("a", "b"):
        return "b" if shown_choice == "a" else "a"
    return shown_choice


class Statements:
    """The queue's queries, built once (building a statement costs more than running it on SQLite; SQLAlchemy
    caches the compiled SQL). `:labeller` (a user id) and `:item` (a comparison id) are bound when they run.
    Slot counts and "seen by this labeller" are correlated subqueries on the assignments' unique indexes, so a
    query reads the rows of the comparisons it looks at and not the whole assignments table."""

    def __init__(self, overlap: int, batch: str | None):
        user_id = bindparam("labeller")  # `:start`: see LabelQueue.starts
        # this queue's comparisons: its batch (every batch if none) and, always, the gold items
        in_scope = true() if batch is None else or_(Comparison.batch == batch, Comparison.kind == "gold")
        # and not of a batch already exported: its leftover overlap slots went first (the oldest first, below)
        servable = and_(in_scope, ~exists().where(ClosedBatch.batch == Comparison.batch))
        seen = exists().where(Assignment.comparison_id == Comparison.id, Assignment.user_id == user_id)
        taken = (select(func.count()).where(Assignment.comparison_id == Comparison.id, Assignment.slot.is_not(None))
                 .correlate(Comparison).scalar_subquery())
        open_for_me = and_(Comparison.id >= bindparam("start"), Comparison.kind != "gold", servable, ~seen,
                           taken < overlap)
        gold_for_me = and_(Comparison.kind == "gold", ~seen)
        held = (Assignment.comparison_id, Assignment.swapped, Assignment.status)
        this_one = and_(Assignment.user_id == user_id, Assignment.comparison_id == bindparam("item"))

        self.open_assignment = (select(*held).join(Comparison, Comparison.id == Assignment.comparison_id)
                                .where(Assignment.user_id == user_id, Assignment.status == "open", servable)
                                .order_by(Assignment.id).limit(1))
        self.assignment_status = select(Assignment.status).where(this_one)
        # open -> voted / skipped only while still open: of two tabs answering at once, one changes no row
        still_open = and_(this_one, Assignment.status == "open")
        # a vote or ranking closes it only while the labeller's account is enabled: an account disabled while a
        # simulated or AI labeller runs stops it at its next answer (the app also checks on every request)
        enabled = exists().where(User.id == user_id, User.disabled.is_(False))
        closed = (select(ClosedBatch.closed_at).join(Comparison, Comparison.batch == ClosedBatch.batch)
                  .where(Comparison.id == bindparam("item")))
        self.close_voted = (update(Assignment).where(still_open, enabled, ~closed.exists()).values(status="voted")
                            .returning(Assignment.swapped))
        self.closed_at = closed
        self.is_disabled = select(User.disabled).where(User.id == user_id)
        self.close_skipped = (update(Assignment).where(still_open).values(status="skipped", slot=None)
                              .returning(Assignment.swapped))
        self.new_assignment = insert(Assignment)
        self.new_vote = insert(Vote)
        self.new_ranking = insert(Ranking)
        self.new_written = insert(WrittenAnswer)
        self.ranking_answers = (select(Response.text)
                                .join(ComparisonAnswer, ComparisonAnswer.response_id == Response.id)
                                .where(ComparisonAnswer.comparison_id == bindparam("item"))
                                .order_by(ComparisonAnswer.position))
        self.is_ranking = select(exists().where(ComparisonAnswer.comparison_id == bindparam("item")))
        # the oldest first, so items are finished before new ones start and agreement can be measured early
        self.train_candidates = (select(Comparison.id, taken).where(open_for_me).order_by(Comparison.id)
                                 .limit(CANDIDATES))
        self.gold_candidates = (select(Comparison.id, null()).where(gold_for_me).order_by(Comparison.id)
                                .limit(CANDIDATES))
        self.slots = select(Assignment.slot).where(Assignment.comparison_id == bindparam("item"),
                                                   Assignment.slot.is_not(None))
        # the labeller's own skipped or timed-out training items that still have a free slot, the oldest first
        set_aside = and_(Assignment.user_id == user_id, Assignment.status.in_(("skipped", "expired")),
                         Comparison.kind != "gold", servable, taken < overlap)
        # (by when each was last handed out, which reopening sets: a skipped item taken back and skipped again
        # goes behind the others, where by assignment id it came straight back after every skip)
        self.set_aside = (select(Assignment.comparison_id).join(Comparison, Comparison.id == Assignment.comparison_id)
                          .where(set_aside).order_by(Assignment.created_at, Assignment.id).limit(CANDIDATES))
        self.reopen = (update(Assignment).where(this_one, Assignment.status.in_(("skipped", "expired")))
                       .values(status="open", slot=bindparam("free_slot"), created_at=bindparam("now"))
                       .returning(Assignment.swapped))
        self.reopen_expired = (update(Assignment).where(this_one, Assignment.status == "expired", enabled,
                                                        ~closed.exists())
                               .values(status="open", slot=bindparam("free_slot"), created_at=bindparam("now"))
                               .returning(Assignment.swapped))
        self.kind = select(Comparison.kind).where(Comparison.id == bindparam("item"))
        a, b = aliased(Response), aliased(Response)
        self.item = (select(Comparison.kind, Prompt.messages, a.text, b.text)
                     .join(Prompt, Prompt.id == Comparison.prompt_id).join(a, a.id == Comparison.response_a_id)
                     .join(b, b.id == Comparison.response_b_id).where(Comparison.id == bindparam("item")))
        # (votes and skips on every batch in scope; open items only where still served)
        mine = (select(func.count().filter(Assignment.status == "voted").label("voted"),
                       func.count().filter(Assignment.status == "skipped").label("skipped"),
                       func.count().filter(and_(Assignment.status == "open", servable)).label("open"))
                .join(Comparison, Comparison.id == Assignment.comparison_id)
                .where(Assignment.user_id == user_id, in_scope).subquery())
        self.my_progress = select(
            mine.c.voted, mine.c.skipped, mine.c.open,
            select(func.avg(Vote.seconds)).join(Comparison, Comparison.id == Vote.comparison_id)
            .where(Vote.user_id == user_id, in_scope).scalar_subquery().label("mean_seconds"))
        self.available = select(
            select(func.count()).where(open_for_me).scalar_subquery().label("train"),
            select(func.count()).where(gold_for_me).scalar_subquery().label("gold"),
            select(func.count()).select_from(Assignment).join(Comparison, Comparison.id == Assignment.comparison_id)
            .where(set_aside).scalar_subquery().label("set_aside"))


@dataclass
class Held:
    """An assignment as the queue needs it."""
    comparison_id: int
    swapped: bool
    status: str = "open"


class LabelQueue:
    def __init__(self, store: Store, overlap: int = 3, gold_rate: float = 0.1, batch: str | None = None,
                 timeout_minutes: float = 30.0, seed: int | None = None, expires_others: bool = True):
        """`expires_others`: the app's queue (which knows the configured timeout) expires anyone's stale items;
        a simulated or AI labeller's queue only its own labellers' (people's items are the app's to expire)."""
        self.store, self.overlap, self.gold_rate = store, overlap, gold_rate
        self.timeout = timedelta(minutes=timeout_minutes)
        self.expires_others, self.served = expires_others, set()
        self.rng = random.Random(seed)
        self.last_release = float("-inf")
        self.sql = Statements(overlap, batch)
        # Per labeller, the lowest comparison id that may still be open to them: everything older was full or
        # theirs when last looked at, and stays so until a slot is released (skip, expiry), which resets this.
        # It spares each query from re-reading the finished front of the queue.
        self.starts: dict[int, int] = {}
        self.counts: dict[int, tuple[int, int, int, float]] = {}  # see available()

    def rows(self, statement, **params) -> list:
        with self.store.engine.connect() as connection:
            return list(connection.execute(statement, params))

    def held(self, statement, **params) -> Held | None:
        rows = self.rows(statement, **params)
        return Held(*rows[0]) if rows else None

    # handing out items
    def next_item(self, user: User) -> Item | None:
        """The labeller's open item, or a newly assigned one; None when nothing is left for them."""
        self.served.add(user.id)
        self.release_stale()
        assignment = self.held(self.sql.open_assignment, labeller=user.id)
        if assignment is None and self.rng.random() < self.gold_chance(user):
            assignment = self.assign(user, self.sql.gold_candidates)
        if assignment is None:
            assignment = self.assign(user, self.sql.train_candidates)
        if assignment is None and self.gold_rate > 0:
            assignment = self.assign(user, self.sql.gold_candidates)
        if assignment is None:
            assignment = self.take_back(user)
        return None if assignment is None else self.item(assignment, user)

    def take_back(self, user: User) -> Held | None:
        """Once nothing else is left for the labeller, an item they skipped or let time out that still has a free
        slot (as Label Studio requeues skipped tasks): with no other labeller to take it, one person on a laptop
        say, it would wait for a vote for ever."""
        for (comparison_id,) in self.rows(self.sql.set_aside, labeller=user.id):
            if (held := self.reopened(user, comparison_id, self.sql.reopen)) is not None:
                return held
        return None

    def reopened(self, user: User, comparison_id: int, statement) -> Held | None:
        """The labeller's assignment on the item open again (as `statement` allows), on a slot still free."""
        slot = self.free_slot(comparison_id)
        if slot is None:
            return None
        try:
            with self.store.writing() as connection:
                row = connection.execute(statement, dict(labeller=user.id, item=comparison_id, free_slot=slot,
                                                         now=utcnow())).first()
        except IntegrityError:
            return None  # another labeller took that slot at the same moment
        return None if row is None else Held(comparison_id, row.swapped)

    def gold_chance(self, user: User) -> float:
        """`gold_rate`, or the share of gold among the items the labeller has left when that is larger (as last
        counted for their progress): gold left over for the end of a short queue would stand out."""
        if user.id not in self.counts or self.gold_rate == 0:
            return self.gold_rate
        train, gold, *_ = self.counts[user.id]
        return max(self.gold_rate, gold / max(train + gold, 1))

    def release_stale(self) -> None:
        """Expires items left open past the timeout; a write, so done at most once a minute. The per-labeller
        starts are forgotten at the same time, so a slot released by another process is found within a minute."""
        if time.monotonic() - self.last_release < 60:
            return
        self.last_release = time.monotonic()
        stale = update(Assignment).where(Assignment.status == "open", Assignment.created_at < utcnow() - self.timeout)
        if not self.expires_others:
            stale = stale.where(Assignment.user_id.in_(self.served))
        with self.store.writing() as connection:
            connection.execute(stale.values(status="expired", slot=None))
        self.starts.clear()

    def assign(self, user: User, candidates_query) -> Held | None:
        """Takes a slot on one of the candidates, (comparison, slot to try) rows; gold ones need no slot. A lost
        race for a slot is tried again with the slots as they are now, so every failure means another labeller
        made progress."""
        candidates = []
        for _ in range(ATTEMPTS):
            if not candidates:
                candidates = [tuple(row) for row in self.rows(candidates_query, labeller=user.id,
                                                              start=self.starts.get(user.id, 0))]
                if not candidates:
                    return None
                if candidates_query is self.sql.train_candidates:
                    self.starts[user.id] = candidates[0][0]
                self.rng.shuffle(candidates)
            comparison_id, slot = candidates.pop()
            swapped = self.rng.random() < 0.5
            try:
                with self.store.writing() as connection:
                    connection.execute(self.sql.new_assignment, dict(
                        comparison_id=comparison_id, user_id=user.id, slot=slot, swapped=swapped, status="open",
                        created_at=utcnow()))
                return Held(comparison_id, swapped)
            except IntegrityError:
                mine = self.held(self.sql.open_assignment, labeller=user.id)
                if mine is not None:
                    return mine  # this labeller's other tab took an item at the same moment: show that one
                if (free := self.free_slot(comparison_id)) is not None:
                    candidates.append((comparison_id, free))
        return None

    def free_slot(self, comparison_id: int) -> int | None:
        taken = {slot for (slot,) in self.rows(self.sql.slots, item=comparison_id)}
        return min(set(range(self.overlap)) - taken, default=None)

    def item(self, assignment: Held, user: User) -> Item:
        kind, prompt, a_text, b_text = self.rows(self.sql.item, item=assignment.comparison_id)[0]
        left, right = (b_text, a_text) if assignment.swapped else (a_text, b_text)
        item = Item(assignment.comparison_id, prompt, left, right, assignment.swapped, kind)
        answers = [text for (text,) in self.rows(self.sql.ranking_answers, item=assignment.comparison_id)]
        if answers:
            item.order = shown_order(assignment.comparison_id, user.id, len(answers))
            item.answers = [answers[position] for position in item.order]
        return item

    # answers
    def vote(self, user: User, comparison_id: int, shown_choice: str, strength: str | None = None,
             note: str | None = None, seconds: float | None = None, written: str | None = None) -> None:
        """Stores the vote for the item as shown ("a" = left), undoing the swap, and closes the assignment; with
        the answer the labeller wrote, when they wrote one. A strength belongs to an a or b vote only ("clear" when
        none is given)."""
        check_vote(shown_choice, strength, note)
        written = check_written(written)
        strength = vote_strength(shown_choice, strength)
        if self.rows(self.sql.is_ranking, item=comparison_id)[0][0]:
            raise StoreError(f"comparison {comparison_id} is a ranking item: it takes a ranking, not a vote")

        def store_vote(connection, swapped: bool) -> None:
            connection.execute(self.sql.new_vote, dict(
                comparison_id=comparison_id, user_id=user.id, choice=unswap(shown_choice, swapped),
                strength=strength, note=note or None, seconds=seconds, swapped=swapped, created_at=utcnow()))
            if written:
                connection.execute(self.sql.new_written, dict(comparison_id=comparison_id, user_id=user.id,
                                                              text=written, created_at=utcnow()))
        self.answer(user, comparison_id, store_vote, "voted on")

    def rank(self, user: User, comparison_id: int, shown_ranks: list[int], note: str | None = None,
             seconds: float | None = None) -> None:
        """Stores the ranking of a ranking item's answers as shown to this labeller (1 the best, ties equal), in
        the item's own order, and closes the assignment."""
        answers = len(self.rows(self.sql.ranking_answers, item=comparison_id))
        check_ranking(comparison_id, shown_ranks, answers)
        check_note(note)
        ranks = unshuffle(list(shown_ranks), shown_order(comparison_id, user.id, answers))

        def store_ranking(connection, swapped: bool) -> None:
            connection.execute(self.sql.new_ranking, dict(comparison_id=comparison_id, user_id=user.id, ranks=ranks,
                                                          note=note or None, seconds=seconds, created_at=utcnow()))
        self.answer(user, comparison_id, store_ranking, "ranked")

    def answer(self, user: User, comparison_id: int, store_answer, done: str) -> None:
        """Closes the labeller's open assignment and stores their answer (`store_answer(connection, swapped)`) in
        one transaction. An item that timed out on them while they were still on it (writing a long answer, say)
        is taken back first when it still has a free slot: the answer counts instead of being lost."""
        for retry in (False, True):
            try:
                with self.store.writing() as connection:
                    hold_close_lock(connection)  # a batch closing now waits for this answer
                    swapped = self.close(connection, self.sql.close_voted, user, comparison_id)
                    if swapped is not None:
                        store_answer(connection, swapped)
            except IntegrityError:
                raise DuplicateVote(f"{user.name} has already {done} comparison {comparison_id}") from None
            if swapped is not None:
                return
            if retry or not self.retaken(user, comparison_id):
                raise self.refusal(user, comparison_id)

    def retaken(self, user: User, comparison_id: int) -> bool:
        """The labeller's expired assignment on a training item open to them again, on a slot still free."""
        kind = self.rows(self.sql.kind, item=comparison_id)
        if not kind or kind[0].kind == "gold":
            return False
        return self.reopened(user, comparison_id, self.sql.reopen_expired) is not None

    def skip(self, user: User, comparison_id: int) -> None:
        """Gives the item's slot to someone else; it comes back to this labeller only when nothing else is left
        for them and it still has a free slot (`take_back`)."""
        with self.store.writing() as connection:
            swapped = self.close(connection, self.sql.close_skipped, user, comparison_id)
        if swapped is None:
            raise self.refusal(user, comparison_id)
        self.starts.clear()

    def close(self, connection, statement, user: User, comparison_id: int) -> bool | None:
        """Closes the labeller's assignment if it is still open, and returns whether its sides were swapped; None
        if it was not open (a concurrent vote, skip or expiry), in which case nothing changes."""
        row = connection.execute(statement, {"labeller": user.id, "item": comparison_id}).first()
        return None if row is None else row.swapped

    def refusal(self, user: User, comparison_id: int) -> StoreError:
        if self.rows(self.sql.is_disabled, labeller=user.id)[0][0]:
            return self.store.disabled(user.name)
        state = self.rows(self.sql.assignment_status, labeller=user.id, item=comparison_id)
        if state and state[0].status == "voted":
            return DuplicateVote(f"{user.name} has already voted on comparison {comparison_id}")
        if closed := self.rows(self.sql.closed_at, item=comparison_id):
            return BatchClosed(f"comparison {comparison_id}'s batch was closed at {shown_utc(closed[0][0])} and "
                               "takes no more answers")
        if not state:
            return ItemGone(f"comparison {comparison_id} is not assigned to {user.name}")
        return ItemGone(f"comparison {comparison_id} was {state[0].status} and is no longer {user.name}'s")

    # progress
    def progress(self, user: User) -> dict:
        """This labeller's votes and skips, and how many more items the queue could give them now."""
        mine = self.rows(self.sql.my_progress, labeller=user.id)[0]
        answered = mine.voted + mine.skipped
        remaining = mine.open + self.available(user, answered)
        return {"votes": mine.voted, "skipped": mine.skipped, "remaining": remaining,
                "mean_seconds": mine.mean_seconds}

    def available(self, user: User, answered: int) -> int:
        """Items the queue could still hand this labeller. Counting them reads every open comparison, the
        costliest query here, so the count is redone every PROGRESS_REFRESH seconds; in between it goes down
        by the labeller's own answers (others' progress shows at the next count)."""
        train, gold, answered_then, at = self.counts.get(user.id, (0, 0, 0, float("-inf")))
        if time.monotonic() - at > PROGRESS_REFRESH:
            row = self.rows(self.sql.available, labeller=user.id, start=self.starts.get(user.id, 0))[0]
            train, gold, answered_then = row.train + row.set_aside, (row.gold if self.gold_rate > 0 else 0), answered
            self.counts[user.id] = (train, gold, answered_then, time.monotonic())
        return max(0, train + gold - (answered - answered_then))
