"""The label store: users, prompts, responses, comparisons, assignments and votes in a real database.

SQLite (WAL) by default at `runs/labels.db`; PostgreSQL by URL (`postgresql+psycopg://...`, or `RLHF_DB_URL`).
The database itself enforces what must never break: one vote per labeller per comparison (a unique constraint),
and the vote vocabulary of `rlhf.schema` (check constraints), so two browser tabs or a retried request cannot
double-vote whatever the application does. The schema version is stored and checked on open.

A ranking item is a comparison whose labellers order 2 to 6 answers to its prompt instead of picking one of two
(rlhf/rankings.py): its answers are listed, in the order shown, in `comparison_answers` (the first two are also its
response a and b), and each labeller's order is one row of `rankings`, one per labeller per item like votes.
A labeller may also write the answer they wanted to an item's prompt (`written_answers`, one per labeller per
item): the export makes it an SFT demonstration and a pair that prefers it to the answer the votes chose.

Assignments hand comparisons to labellers: each non-gold comparison has `overlap` numbered slots, and a unique
(comparison, slot) constraint means two labellers racing for the last slot cannot both get it. A skipped or
expired assignment gives its slot back (slot NULL) but stays, so the same labeller never gets that item again.
"""
import base64
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, delete, event, false, func, inspect, select, text,
                        update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rlhf.errors import ConfigError, DataError, UserError
from rlhf.rankings import MAX_K, check_ranks
from rlhf.schema import PREFERENCE_CHOICES, VOTE_CHOICES, VOTE_STRENGTHS

SCHEMA_VERSION = 6
DEFAULT_URL = "sqlite:///runs/labels.db"
ROLES = ("labeller", "admin")
KINDS = ("train", "gold", "eval")
ASSIGNMENT_STATES = ("open", "voted", "skipped", "expired")
MAX_NOTE_CHARS = 2000
MAX_WRITTEN_CHARS = 8000
# scrypt parameters (RFC 7914): n=2**14, r=8, p=1 costs ~16 MiB and tens of milliseconds per check.
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


def quoted(values) -> str:
    return ", ".join(f"'{value}'" for value in values)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def shown_utc(moment: datetime) -> str:
    """A stored time as people read it, in UTC (SQLite gives it back without a zone, PostgreSQL in its session's)."""
    return f"{moment if moment.tzinfo is None else moment.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


PROMPT_ID_WIDTH, CATEGORY_WIDTH, USER_NAME_WIDTH, BATCH_WIDTH = 128, 64, 128, 128  # characters
ROUND_BATCH_SUFFIX = len("-round-99-0123abcd")  # what a later round adds to its batch's name (preference_ui/collect)


class StoreError(UserError):
    """A store that cannot be opened or a request it refuses."""


class NoStoreYet(StoreError):
    """A SQLite store asked for with create=False whose file does not exist."""


class DuplicateVote(StoreError):
    """The labeller has already voted on this comparison."""


class LabellerDisabled(StoreError):
    """The labeller's account was disabled: it votes, ranks and writes no more (checked in the write's own
    transaction, so an account disabled while a simulated or AI labeller runs stops it at its next vote)."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(f"role IN ({quoted(ROLES)})", name="user_role"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(USER_NAME_WIDTH), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(PROMPT_ID_WIDTH), unique=True)
    category: Mapped[str] = mapped_column(String(CATEGORY_WIDTH))
    messages: Mapped[list] = mapped_column(JSON)


class Response(Base):
    __tablename__ = "responses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(512))
    sampling: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Comparison(Base):
    __tablename__ = "comparisons"
    __table_args__ = (
        CheckConstraint(f"kind IN ({quoted(KINDS)})", name="comparison_kind"),
        CheckConstraint(f"expected IS NULL OR expected IN ({quoted(VOTE_CHOICES)})", name="comparison_expected"),
        CheckConstraint("response_a_id <> response_b_id", name="comparison_two_responses"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    response_b_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))
    batch: Mapped[str] = mapped_column(String(BATCH_WIDTH), index=True)
    kind: Mapped[str] = mapped_column(String(8), default="train")
    expected: Mapped[str | None] = mapped_column(String(16), nullable=True)  # the right answer, for gold items
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ComparisonAnswer(Base):
    """One answer of a ranking item, at its place in the order shown."""
    __tablename__ = "comparison_answers"
    __table_args__ = (UniqueConstraint("comparison_id", "position", name="one_answer_per_position"),
                      UniqueConstraint("comparison_id", "response_id", name="each_answer_once"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"))


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("comparison_id", "user_id", name="one_assignment_per_labeller"),
        UniqueConstraint("comparison_id", "slot", name="one_labeller_per_slot"),
        CheckConstraint(f"status IN ({quoted(ASSIGNMENT_STATES)})", name="assignment_status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)  # NULL: gold, skipped or expired
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)  # shown with B on the left
    status: Mapped[str] = mapped_column(String(8), default="open", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("comparison_id", "user_id", name="one_vote_per_labeller"),
        CheckConstraint(f"choice IN ({quoted(VOTE_CHOICES)})", name="vote_choice"),
        # a strength says how much better the chosen answer is: a or b only, none for tie or both_bad
        CheckConstraint(f"(choice IN ({quoted(PREFERENCE_CHOICES)}) AND strength IN ({quoted(VOTE_STRENGTHS)})) OR "
                        f"(choice NOT IN ({quoted(PREFERENCE_CHOICES)}) AND strength IS NULL)", name="vote_strength"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))
    strength: Mapped[str | None] = mapped_column(String(16), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)  # whether the UI showed B on the left
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Ranking(Base):
    """A labeller's order of a ranking item's answers: one rank per answer in the order shown, 1 the best, equal
    ranks tied."""
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("comparison_id", "user_id", name="one_ranking_per_labeller"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    ranks: Mapped[list] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WrittenAnswer(Base):
    """The answer a labeller wrote, or edited from one shown, for an item's prompt."""
    __tablename__ = "written_answers"
    __table_args__ = (UniqueConstraint("comparison_id", "user_id", name="one_written_answer_per_labeller"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClosedBatch(Base):
    """A batch whose votes a stage has exported, or that an admin closed (`rlhf label close`): the queue serves none
    of its items and takes no more answers on them (they would never be exported). A stage that collects an exported
    batch again reopens it; one closed by hand stays closed until `rlhf label reopen`."""
    __tablename__ = "closed_batches"
    batch: Mapped[str] = mapped_column(String(BATCH_WIDTH), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    by_hand: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


# Closing a batch against the answers under way. On PostgreSQL (READ COMMITTED) an answer's statement begun before a
# close committed could itself commit after the close, and after the export read: each answer's transaction takes
# this lock shared before its statements, a close takes it exclusively, so a close waits for the answers under way
# and an answer after it sees the batch closed. (SQLite transactions are serial already.)
CLOSE_LOCK = 0x726C6866


def hold_close_lock(connection, exclusive: bool = False) -> None:
    """Takes the close lock until the end of `connection`'s transaction (on PostgreSQL; a no-op elsewhere)."""
    if connection.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        connection.execute(text(f"SELECT {function}(:key)"), {"key": CLOSE_LOCK})


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


@functools.cache
def unknown_user_hash() -> str:
    """Checked against when the name is unknown or disabled, so that answer costs the same KDF work as a wrong
    password for a real account and does not tell which names exist."""
    return hash_password(secrets.token_hex(16))


def password_matches(password: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32)
    return hmac.compare_digest(candidate.hex(), digest)


def vote_strength(choice: str, strength: str | None) -> str | None:
    """The strength to store: for a or b the one given ("clear" when none is), for tie and both_bad none."""
    if choice not in PREFERENCE_CHOICES:
        if strength is not None:
            raise StoreError(f"a '{choice}' vote has no strength (only a and b do), got '{strength}'")
        return None
    return strength or "clear"


def check_vote(choice: str, strength: str | None, note: str | None) -> None:
    """A clear refusal before the database's own checks would turn the vote down."""
    if choice not in VOTE_CHOICES:
        raise StoreError(f"choice must be one of {', '.join(VOTE_CHOICES)}, got '{choice}'")
    if strength not in (*VOTE_STRENGTHS, None):
        raise StoreError(f"strength must be one of {', '.join(VOTE_STRENGTHS)}, got '{strength}'")
    check_note(note)


def check_note(note: str | None) -> None:
    if note and len(note) > MAX_NOTE_CHARS:
        raise StoreError(f"note is {len(note)} characters; the limit is {MAX_NOTE_CHARS}")


def check_written(text: str | None) -> str | None:
    """The written answer to store (stripped, NUL characters dropped; None when blank); too long a one is
    refused."""
    text = (text or "").replace("\x00", "").strip()
    if len(text) > MAX_WRITTEN_CHARS:
        raise StoreError(f"the written answer is {len(text)} characters; the limit is {MAX_WRITTEN_CHARS}")
    return text or None


def check_ranking_item(responses: list, kind: str) -> None:
    if not 2 <= len(responses) <= MAX_K:
        raise StoreError(f"a ranking item has 2 to {MAX_K} answers, got {len(responses)}")
    if len({response.prompt_id for response in responses}) != 1:
        raise StoreError("a ranking item needs answers to the same prompt")
    if len({response.id for response in responses}) != len(responses):
        raise StoreError("a ranking item lists each answer once")
    if kind not in ("train", "eval"):
        raise StoreError(f"a ranking item is train or eval, got '{kind}' (gold items are pairwise)")


def check_ranking(comparison_id: int, ranks: list, answers: int) -> None:
    """A clear refusal of a ranking that does not order the item's answers."""
    if not answers:
        raise StoreError(f"comparison {comparison_id} is pairwise: it takes a vote, not a ranking")
    try:
        check_ranks(ranks)
    except ValueError as err:
        raise StoreError(f"ranking of comparison {comparison_id}: {err}") from None
    if len(ranks) != answers:
        raise StoreError(f"comparison {comparison_id} has {answers} answers to rank, got {len(ranks)} ranks")


def database_url(url: str | None = None) -> str:
    return url or os.environ.get("RLHF_DB_URL") or DEFAULT_URL


def check_database_url(url: str) -> None:
    """Refuses, before anything is written, a label store URL that is not a database URL, or one of a SQLite
    database in memory (everything stored would be gone when the command ends)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"label store '{url}': not a database URL (sqlite:///PATH or "
                         "postgresql+psycopg://USER@HOST/DATABASE)") from None
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise StoreError(f"label store '{url}': a SQLite database in memory keeps nothing; give a file, "
                         "sqlite:///PATH")


def ours_by_its_meta(connection: sqlite3.Connection) -> bool:
    """Whether a database's `meta` table is a label store's (a common table name): ours has exactly the columns
    key and value. (Not by its schema_version row: a store another process is making has the table first.)"""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(meta)")}
    return columns == {"key", "value"}


def check_sqlite_label_store(path: Path) -> None:
    """An existing file opened as a label store is one (or empty): a mistyped --db naming another program's
    database must not be changed (tables added, its journal switched to WAL), nor a text file read as one. Read
    with a read-only connection of Python's own driver, before the store's engine (and its pragmas) touch it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            ours = "meta" in tables and ours_by_its_meta(connection)
    except sqlite3.DatabaseError as err:
        raise StoreError(f"label store {path}: cannot open it ({err})") from None
    if tables and not ours:
        raise StoreError(f"{path} is a SQLite database but not a label store (its tables: "
                         f"{', '.join(sorted(tables)[:5])}): check --db")


def shown_url(url: str) -> str:
    """A label store URL as manifests and logs show it: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def check_prompt_widths(ids, categories, source) -> None:
    """Prompt ids and categories the store's columns can hold (PostgreSQL enforces the widths; SQLite does not)."""
    for field, values, width in (("id", ids, PROMPT_ID_WIDTH), ("category", categories, CATEGORY_WIDTH)):
        for value in values:
            if len(value) > width:
                raise DataError(source, None, field, f"'{value[:40]}...' is {len(value)} characters, more than the "
                                                     f"label store holds ({width})")


def check_batch_name(batch: str, setting: str = "preferences.batch, else run.name", rounds: int = 1) -> None:
    """A batch name (from `setting`) the store's column can hold, with room for the round suffix when a run has
    later rounds, and not blank or padded (it would list as another batch's name, or as nothing)."""
    if not batch.strip() or batch != batch.strip():
        raise ConfigError(f"batch name {batch!r} ({setting}): not empty, and no spaces around it")
    room = BATCH_WIDTH - (ROUND_BATCH_SUFFIX if rounds > 1 else 0)
    if len(batch) > room:
        raise ConfigError(f"batch name '{batch[:40]}...' ({setting}) is {len(batch)} characters; the label store "
                          f"holds {room}" + (" in a run of several rounds, whose later rounds add a suffix"
                                             if rounds > 1 else "") + ": choose a shorter one")


def hidden(char: str) -> bool:
    """A control, surrogate or format character (a bidirectional override, a zero-width space), except the joiners
    that names and emoji are written with (ZWJ, ZWNJ)."""
    return unicodedata.category(char) in ("Cc", "Cs", "Cf") and char not in "\u200c\u200d"


def check_new_user(name: str, role: str, password: str) -> None:
    if role not in ROLES:
        raise StoreError(f"role must be one of {', '.join(ROLES)}, got '{role}'")
    if not name.strip() or len(password) < 8:
        raise StoreError("a user needs a name and a password of at least 8 characters")
    if name != name.strip() or any(hidden(char) for char in name):
        # " alice" beside "alice" reads as one account in every list, and the admin tab strips what it is given
        raise StoreError(f"user name {name!r}: no spaces around it and no control or invisible characters")
    if len(name) > USER_NAME_WIDTH:
        raise StoreError(f"a user name holds at most {USER_NAME_WIDTH} characters, got {len(name)}")


def run_store_url(output_root, run_name: str, url: str | None = None) -> str:
    """The label store of a run: `url` when given, else $RLHF_DB_URL (a team's server), else the run's own SQLite
    file, <output_root>/<name>/labels.db. `rlhf run`, every `rlhf label` command given the run's --config and
    `rlhf eval --eval.human` use it."""
    own = (Path(output_root) / run_name / "labels.db").resolve()
    return url or os.environ.get("RLHF_DB_URL") or f"sqlite:///{own}"


class Store:
    def __init__(self, url: str | None = None, create: bool = True):
        """`create`: make a SQLite store that does not exist yet (`created` says so); otherwise that is an error
        (a mistyped --db would be a new, empty store)."""
        self.url = database_url(url)
        check_database_url(self.url)
        path = Path(self.url.removeprefix("sqlite:///")) if self.url.startswith("sqlite:///") else None
        self.created = path is not None and not path.exists()
        if self.created and not create:
            raise NoStoreYet(f"no label store at {path}: `rlhf label sample` or `rlhf run` makes one (check --db "
                             "and --config)")
        if path is not None:
            check_sqlite_label_store(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        sqlite = self.url.startswith("sqlite")
        try:
            self.engine = create_engine(self.url, pool_pre_ping=not sqlite)  # a server may drop idle connections
            if sqlite:
                event.listen(self.engine, "connect", sqlite_pragmas)
            self.sessions = sessionmaker(self.engine, expire_on_commit=False)
            # SQLite has one writer at a time; a writer that finds the lock taken sleeps in growing steps (up to
            # 100 ms). Queueing this process's writers on a lock instead keeps a busy app's latency flat.
            self.write_lock = threading.Lock() if sqlite else contextlib.nullcontext()
            self.check_schema()
        except (DatabaseError, ArgumentError, NoSuchModuleError, ImportError) as err:  # no server, no driver, ...
            cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise StoreError(f"label store {shown_url(self.url)}: cannot open it ({cause})") from None

    @contextlib.contextmanager
    def transaction(self):
        """A session in a transaction that commits on success and rolls back on an error."""
        with self.write_lock, self.sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def writing(self):
        """The same for SQLAlchemy Core statements: a connection in a transaction, without the ORM's bookkeeping
        (for the labelling app's hot path)."""
        with self.write_lock, self.engine.begin() as connection:
            yield connection

    def check_schema(self) -> None:
        self.upgrade_from_version_1()
        self.upgrade_from_version_2()
        self.upgrade_from_version_3()
        self.upgrade_from_version_4()
        self.upgrade_from_version_5()
        Base.metadata.create_all(self.engine)
        with self.transaction() as session:
            version = session.get(Meta, "schema_version")
            if version is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif version.value != str(SCHEMA_VERSION):
                raise StoreError(f"{shown_url(self.url)}: label store schema "
                                 f"version {version.value}, this code reads version {SCHEMA_VERSION}")
        self.label_key = self.item_label_key()

    def item_label_key(self) -> bytes:
        """The store's secret for item labels, made on first use (two processes racing to make it agree on the
        one stored first)."""
        for _ in range(2):
            with self.sessions() as session:
                key = session.get(Meta, "item_label_key")
            if key is not None:
                return bytes.fromhex(key.value)
            try:
                with self.transaction() as session:
                    session.add(Meta(key="item_label_key", value=secrets.token_hex(16)))
            except IntegrityError:
                pass
        raise StoreError("could not read or make the store's item label key")

    def item_label(self, comparison_id: int) -> str:
        """What labellers see instead of the comparison's id: the same for everyone, unguessable without the
        store, so neither an id's size nor its order tells gold items (imported first) from the rest."""
        digest = hmac.new(self.label_key, str(comparison_id).encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:5]).decode()

    @contextlib.contextmanager
    def upgrading(self, version: str):
        """A connection in the transaction that upgrades the store from `version`, or None when it is not at that
        version. On SQLite the transaction is begun explicitly, with the write lock (BEGIN IMMEDIATE): Python's
        driver runs DROP and CREATE outside any transaction, so an upgrade cut short lost the votes table's rows
        and the next open finished it on the empty table; a second process opening the store at the same moment
        waits, then finds it upgraded."""
        if self.schema_version() != version:  # read first: opening an upgraded store takes no lock
            yield None
            return
        with self.write_lock, self.engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection if self.schema_version(connection) == version else None

    def schema_version(self, connection=None) -> str | None:
        if connection is None:
            with self.engine.connect() as connection:
                return self.schema_version(connection)
        if not inspect(connection).has_table("meta"):
            return None
        return connection.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()

    def upgrade_from_version_1(self) -> None:
        """Version 1 had an assignments table that nothing wrote to; version 2 gives it slots and states."""
        with self.upgrading("1") as connection:
            unused = connection is not None and not connection.execute(select(func.count()).select_from(Assignment)
                                                                       ).scalar()
            if unused:
                Assignment.__table__.drop(connection)
                Assignment.__table__.create(connection)
                connection.execute(update(Meta).where(Meta.key == "schema_version").values(value="2"))

    def upgrade_from_version_2(self) -> None:
        """Version 2 stored a strength with every vote, and a sticky strength in the labelling app wrote the last
        one picked into ties and both-bad votes too; version 3 stores none for them. The votes table is rebuilt
        with the new rule (a table constraint cannot be altered in SQLite): every vote kept, the strengths of tie
        and both_bad votes cleared. The strengths of a and b votes are kept as stored."""
        with self.upgrading("2") as connection:
            if connection is None:
                return
            votes = [dict(row) for row in connection.execute(select(Vote.__table__)).mappings()]
            for vote in votes:
                vote["strength"] = vote["strength"] if vote["choice"] in PREFERENCE_CHOICES else None
            Vote.__table__.drop(connection)
            Vote.__table__.create(connection)
            if votes:
                connection.execute(Vote.__table__.insert(), votes)
            if votes and connection.dialect.name == "postgresql":  # the new table's id sequence starts after them
                connection.execute(text("SELECT setval(pg_get_serial_sequence('votes', 'id'), "
                                        "(SELECT max(id) FROM votes))"))
            connection.execute(update(Meta).where(Meta.key == "schema_version").values(value="3"))

    def upgrade_from_version_3(self) -> None:
        """Version 4 adds ranking items and written answers: three new tables (made by `create_all`), nothing in
        the old ones changes."""
        self.new_tables_only("3", "4")

    def upgrade_from_version_4(self) -> None:
        """Version 5 closes exported batches: one new table (made by `create_all`). Batches exported before stay
        open (the store never said which were)."""
        self.new_tables_only("4", "5")

    def upgrade_from_version_5(self) -> None:
        """Version 6 says which batches an admin closed by hand (a stage keeps those closed): a column added, the
        batches closed before it read as exported (a rerun with votes missing reopens them, as version 5 did). A store
        upgraded from an older version has no such table yet: `create_all` makes it with the column."""
        with self.upgrading("5") as connection:
            if connection is not None:
                tables = inspect(connection)
                # (IF NOT EXISTS on PostgreSQL: a second process upgrading at the same moment read version 5 before
                # the first committed, and its ALTER waits for the first's, then finds the column there)
                if tables.has_table("closed_batches") and "by_hand" not in {
                        column["name"] for column in tables.get_columns("closed_batches")}:
                    if_new = "IF NOT EXISTS " if connection.dialect.name == "postgresql" else ""
                    connection.execute(text(f"ALTER TABLE closed_batches ADD COLUMN {if_new}by_hand BOOLEAN NOT NULL "
                                            "DEFAULT FALSE"))
                connection.execute(update(Meta).where(Meta.key == "schema_version").values(value="6"))

    def new_tables_only(self, version: str, next_version: str) -> None:
        """An upgrade that only adds tables: the version number moves on."""
        with self.upgrading(version) as connection:
            if connection is not None:
                connection.execute(update(Meta).where(Meta.key == "schema_version").values(value=next_version))

    # users
    def add_user(self, name: str, role: str, password: str) -> User:
        check_new_user(name, role, password)
        try:
            with self.transaction() as session:
                user = User(name=name, role=role, password_hash=hash_password(password))
                session.add(user)
            return user
        except IntegrityError:
            raise StoreError(f"user '{name}' already exists") from None

    def authenticate(self, name: str, password: str) -> User | None:
        """The user, if the name and password match and the account is not disabled. Every call does the same
        KDF work, whether or not the name exists."""
        with self.sessions() as session:
            user = session.scalar(select(User).where(User.name == name))
        usable = user is not None and not user.disabled
        matches = password_matches(password, user.password_hash if usable else unknown_user_hash())
        return user if usable and matches else None

    def disable_user(self, name: str) -> None:
        self.set_disabled(name, True)

    def set_disabled(self, name: str, disabled: bool) -> User:
        with self.transaction() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                raise StoreError(f"no user '{name}'")
            user.disabled = disabled
        return user

    def users(self) -> list[User]:
        with self.sessions() as session:
            return list(session.scalars(select(User).order_by(User.name)))

    # items to compare
    def add_prompt(self, external_id: str, category: str, messages: list[dict]) -> Prompt:
        """The prompt of this id, stored once; an id the store holds with other text is refused (answers to the
        new text would be shown and exported under the old one)."""
        with self.transaction() as session:
            prompt = session.scalar(select(Prompt).where(Prompt.external_id == external_id))
            if prompt is None:
                prompt = Prompt(external_id=external_id, category=category, messages=messages)
                session.add(prompt)
            elif prompt.messages != messages:
                raise StoreError(f"prompt id '{external_id}' is in the label store with other text")
        return prompt

    def check_prompt_ids(self, prompts: dict[str, list[dict]], source) -> None:
        """Refuses, before anything is stored, prompts ({id: messages}) whose ids the store holds with other text:
        a DataError naming `source`, the file they come from. (Their widths: `check_prompt_widths`, before the
        store is opened.)"""
        with self.sessions() as session:
            stored = session.execute(select(Prompt.external_id, Prompt.messages)
                                     .where(Prompt.external_id.in_(list(prompts))))
            clashes = sorted(external_id for external_id, messages in stored if messages != prompts[external_id])
        if clashes:
            raise DataError(source, None, "id", f"{len(clashes)} prompt id(s) are in the label store "
                            f"{shown_url(self.url)} with other text (first: '{clashes[0]}'): give these prompts ids "
                            "of their own")

    def add_response(self, prompt: Prompt, text: str, model: str, sampling: dict) -> Response:
        with self.transaction() as session:
            response = Response(prompt_id=prompt.id, text=text, model=model, sampling=sampling)
            session.add(response)
        return response

    def add_comparison(self, a: Response, b: Response, batch: str, kind: str = "train",
                       expected: str | None = None) -> Comparison:
        if a.prompt_id != b.prompt_id:
            raise StoreError("a comparison needs two responses to the same prompt")
        if (kind == "gold") != (expected is not None):
            raise StoreError("gold comparisons, and only they, carry the expected answer")
        with self.transaction() as session:
            comparison = Comparison(prompt_id=a.prompt_id, response_a_id=a.id, response_b_id=b.id, batch=batch,
                                    kind=kind, expected=expected)
            session.add(comparison)
        return comparison

    def add_comparisons(self, pairs: list[tuple[Response, Response]], batch: str, kind: str = "train",
                        expected: list[str] | None = None) -> int:
        """Several comparisons in one transaction: a killed sampler leaves all of them or none. `expected`: the
        gold comparisons' expected answers, one per pair."""
        if any(a.prompt_id != b.prompt_id for a, b in pairs):
            raise StoreError("a comparison needs two responses to the same prompt")
        if (kind == "gold") != (expected is not None):
            raise StoreError("gold comparisons, and only they, carry the expected answer")
        expected = expected or [None] * len(pairs)
        with self.transaction() as session:
            session.add_all([Comparison(prompt_id=a.prompt_id, response_a_id=a.id, response_b_id=b.id, batch=batch,
                                        kind=kind, expected=answer) for (a, b), answer in zip(pairs, expected)])
        return len(pairs)

    def add_ranking_item(self, responses: list[Response], batch: str, kind: str = "train") -> Comparison:
        """An item whose labellers order the answers (2 to MAX_K to one prompt), shown in the order given."""
        return self.add_ranking_items([responses], batch, kind)[0]

    def add_ranking_items(self, items: list[list[Response]], batch: str, kind: str = "train") -> list[Comparison]:
        """Several ranking items in one transaction: a killed sampler leaves all of them or none."""
        for responses in items:
            check_ranking_item(responses, kind)
        added = []
        with self.transaction() as session:
            for responses in items:
                item = Comparison(prompt_id=responses[0].prompt_id, response_a_id=responses[0].id,
                                  response_b_id=responses[1].id, batch=batch, kind=kind)
                session.add(item)
                session.flush()
                session.add_all([ComparisonAnswer(comparison_id=item.id, position=position, response_id=response.id)
                                 for position, response in enumerate(responses)])
                added.append(item)
        return added

    def ranking_answers(self, comparison_id: int) -> list[int]:
        """A ranking item's response ids in the order shown; [] for a pairwise comparison."""
        with self.sessions() as session:
            return list(session.scalars(select(ComparisonAnswer.response_id)
                                        .where(ComparisonAnswer.comparison_id == comparison_id)
                                        .order_by(ComparisonAnswer.position)))

    def cast_ranking(self, comparison_id: int, user: User, ranks: list[int], note: str | None = None,
                     seconds: float | None = None) -> Ranking:
        check_ranking(comparison_id, ranks, len(self.ranking_answers(comparison_id)))
        check_note(note)
        try:
            with self.transaction() as session:
                self.check_enabled(session, user)
                ranking = Ranking(comparison_id=comparison_id, user_id=user.id, ranks=list(ranks), note=note or None,
                                  seconds=seconds)
                session.add(ranking)
            return ranking
        except IntegrityError as err:
            if any(ranking.user_id == user.id for ranking in self.rankings(comparison_id)):
                raise DuplicateVote(f"{user.name} has already ranked comparison {comparison_id}") from None
            raise StoreError(f"ranking refused by the database: {err.orig}") from None

    def write_answer(self, comparison_id: int, user: User, text: str) -> WrittenAnswer:
        """Stores the answer a labeller wrote for the item's prompt; a second one from them is DuplicateVote."""
        text = check_written(text)
        if text is None:
            raise StoreError("the written answer is empty")
        try:
            with self.transaction() as session:
                self.check_enabled(session, user)
                written = WrittenAnswer(comparison_id=comparison_id, user_id=user.id, text=text)
                session.add(written)
            return written
        except IntegrityError as err:
            if any(w.user_id == user.id for w in self.written_answers(comparison_id)):
                raise DuplicateVote(f"{user.name} has already written an answer for comparison "
                                    f"{comparison_id}") from None
            raise StoreError(f"written answer refused by the database: {err.orig}") from None

    def written_answers(self, comparison_id: int | None = None) -> list[WrittenAnswer]:
        with self.sessions() as session:
            query = select(WrittenAnswer).order_by(WrittenAnswer.id)
            if comparison_id is not None:
                query = query.where(WrittenAnswer.comparison_id == comparison_id)
            return list(session.scalars(query))

    def rankings(self, comparison_id: int | None = None) -> list[Ranking]:
        with self.sessions() as session:
            query = select(Ranking).order_by(Ranking.id)
            if comparison_id is not None:
                query = query.where(Ranking.comparison_id == comparison_id)
            return list(session.scalars(query))

    # votes
    def cast_vote(self, comparison_id: int, user: User, choice: str, strength: str | None = None,
                  note: str | None = None, seconds: float | None = None, swapped: bool = False) -> Vote:
        check_vote(choice, strength, note)
        strength = vote_strength(choice, strength)
        if self.ranking_answers(comparison_id):
            raise StoreError(f"comparison {comparison_id} is a ranking item: it takes a ranking, not a vote")
        try:
            with self.transaction() as session:
                self.check_enabled(session, user)
                vote = Vote(comparison_id=comparison_id, user_id=user.id, choice=choice, strength=strength,
                            note=note or None, seconds=seconds, swapped=swapped)
                session.add(vote)
            return vote
        except IntegrityError as err:
            if self.has_voted(comparison_id, user):
                raise DuplicateVote(f"{user.name} has already voted on comparison {comparison_id}") from None
            raise StoreError(f"vote refused by the database: {err.orig}") from None

    def check_enabled(self, session: Session, user: User) -> None:
        if session.scalar(select(User.disabled).where(User.id == user.id)):
            raise self.disabled(user.name)

    def disabled(self, name: str) -> LabellerDisabled:
        return LabellerDisabled(f"labeller '{name}' is disabled in {shown_url(self.url)}: `rlhf label users enable "
                                f"{name}` lets it vote again")

    def has_voted(self, comparison_id: int, user: User) -> bool:
        with self.sessions() as session:
            return session.scalar(select(Vote.id).where(Vote.comparison_id == comparison_id,
                                                        Vote.user_id == user.id)) is not None

    def gold_passed(self) -> list[int]:
        """The user id of each gold item a labeller skipped or let time out (one entry per item): the queue does
        not hand gold back, so these are gold items that labeller never answers."""
        with self.sessions() as session:
            return list(session.scalars(
                select(Assignment.user_id).join(Comparison, Comparison.id == Assignment.comparison_id)
                .where(Comparison.kind == "gold", Assignment.status.in_(("skipped", "expired")))))

    def votes(self, comparison_id: int | None = None) -> list[Vote]:
        with self.sessions() as session:
            query = select(Vote).order_by(Vote.id)
            if comparison_id is not None:
                query = query.where(Vote.comparison_id == comparison_id)
            return list(session.scalars(query))

    def vote_counts(self, batch: str) -> dict[int, int]:
        """{comparison id: number of votes or rankings} for every comparison of the batch."""
        counts = {}
        with self.sessions() as session:
            for judgement in (Vote, Ranking):
                query = (select(Comparison.id, func.count(judgement.id))
                         .outerjoin(judgement, judgement.comparison_id == Comparison.id)
                         .where(Comparison.batch == batch).group_by(Comparison.id))
                for comparison_id, count in session.execute(query):
                    counts[comparison_id] = counts.get(comparison_id, 0) + count
        return counts

    def batches(self) -> list[str]:
        with self.sessions() as session:
            return sorted(session.scalars(select(Comparison.batch).distinct()))

    def batch_kinds(self, batch: str) -> set[str]:
        """The kinds (train, gold, eval) of the batch's comparisons."""
        with self.sessions() as session:
            return set(session.scalars(select(Comparison.kind).where(Comparison.batch == batch).distinct()))

    def close_batch(self, batch: str, by_hand: bool = False) -> None:
        """No more items of the batch served, no more answers on them taken (its votes exported, or closed by hand).
        Closing by hand a batch its export closed marks it closed by hand; an export never unmarks one."""
        try:
            with self.transaction() as session:
                hold_close_lock(session.connection(), exclusive=True)
                closed = session.get(ClosedBatch, batch)
                if closed is None:
                    session.add(ClosedBatch(batch=batch, by_hand=by_hand))
                elif by_hand:
                    closed.by_hand = True
        except IntegrityError:
            pass  # closed by another process at the same moment

    def reopen_batch(self, batch: str) -> None:
        with self.transaction() as session:
            session.execute(delete(ClosedBatch).where(ClosedBatch.batch == batch))

    def closed_batches(self) -> dict[str, datetime]:
        with self.sessions() as session:
            return dict(session.execute(select(ClosedBatch.batch, ClosedBatch.closed_at)).all())

    def closing(self, batch: str) -> ClosedBatch | None:
        """How the batch was closed (when, and whether by hand), or None while it is open."""
        with self.sessions() as session:
            return session.get(ClosedBatch, batch)

    def closed_by_hand(self) -> set[str]:
        """The batches an admin closed (`rlhf label close`), not a stage's export."""
        with self.sessions() as session:
            return set(session.scalars(select(ClosedBatch.batch).where(ClosedBatch.by_hand)))

    def check_batch(self, batch: str | None, to_label: bool = False) -> None:
        """A batch named on the command line must be in the store (a mistyped one would read as empty); one to
        label (`to_label`) must not be closed (none of its items would be served)."""
        batches = self.batches()
        if batch is not None and batch not in batches:
            raise StoreError(f"no batch '{batch}' in {shown_url(self.url)}; its batches: "
                             f"{', '.join(batches) or 'none yet'}")
        closed = self.closing(batch) if to_label else None
        if closed is not None and closed.by_hand:
            raise StoreError(f"batch '{batch}' was closed by hand at {shown_utc(closed.closed_at)}: none of its items "
                             f"is served (`rlhf label reopen {batch}` serves them again)")
        if closed is not None:
            raise StoreError(f"batch '{batch}' was exported and closed at {shown_utc(closed.closed_at)}: none of its "
                             "items is served (its preferences stage reopens it when it runs again, with "
                             f"preferences.min_votes raised say; or `rlhf label reopen {batch}`)")

    def batch_sampling(self, batch: str) -> dict:
        """The sampling record of the batch's first answer: the keys the batch was made under (`drawn_from`,
        `labelled_by`: preference_ui/collect.py) where stored, and the sampling settings."""
        with self.sessions() as session:
            first = session.scalar(select(Comparison).where(Comparison.batch == batch).order_by(Comparison.id))
            answer = session.get(Response, first.response_a_id) if first else None
            return dict(answer.sampling) if answer is not None else {}

    def comparisons(self, batch: str | None = None) -> list[dict]:
        """Each comparison with its prompt messages, both response texts and models (and, for `rlhf eval --human`
        comparisons, which side is the baseline and which the policy), oldest first. A ranking item's `answers`
        are all its answers' texts in the order shown (None for a pairwise comparison)."""
        with self.sessions() as session:
            query = select(Comparison).order_by(Comparison.id)
            if batch is not None:
                query = query.where(Comparison.batch == batch)
            answers: dict[int, list[str]] = {}
            for item_id, answer in session.execute(select(ComparisonAnswer.comparison_id, Response.text)
                                                  .join(Response, Response.id == ComparisonAnswer.response_id)
                                                  .order_by(ComparisonAnswer.comparison_id,
                                                            ComparisonAnswer.position)):
                answers.setdefault(item_id, []).append(answer)
            rows = []
            for comparison in session.scalars(query):
                prompt = session.get(Prompt, comparison.prompt_id)
                a, b = session.get(Response, comparison.response_a_id), session.get(Response, comparison.response_b_id)
                rows.append({"id": comparison.id, "batch": comparison.batch, "kind": comparison.kind,
                             "expected": comparison.expected, "prompt": prompt.messages, "a": a.text, "b": b.text,
                             "a_model": a.model, "b_model": b.model,
                             "a_role": a.sampling.get("eval_role"), "b_role": b.sampling.get("eval_role"),
                             "answers": answers.get(comparison.id)})
            return rows

    def user(self, name: str) -> User | None:
        with self.sessions() as session:
            return session.scalar(select(User).where(User.name == name))

    def machine_labeller(self, name: str) -> User:
        """A simulated or AI labeller's account, made on first use; one an admin has disabled votes no more."""
        user = self.user(name)
        if user is not None and user.disabled:
            raise self.disabled(name)
        return user or self.add_user(name, "labeller", secrets.token_hex(16))

    def session(self) -> Session:
        return self.sessions()


def sqlite_pragmas(connection, _record) -> None:
    """WAL lets labellers read while one writes; foreign keys are off in SQLite unless asked for; the busy
    timeout makes concurrent writers wait for the lock instead of failing at once. With WAL, synchronous=NORMAL
    skips the fsync on each commit: the database stays intact through any crash, and only an operating-system
    crash or power cut can lose the last moments of votes (PostgreSQL is the store for stronger guarantees)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
