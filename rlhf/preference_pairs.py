"""Where a preference-trained stage's pairs come from (a label export, a preference file, or the label store itself,
exported first), and the rules the reward and DPO stages share: gold-weighted votes, and which rows are usable
(both-bad rows say nothing about order; ties are dropped or kept as "equal")."""
import atexit
import json
import shutil
import statistics
import tempfile
from collections import Counter
from pathlib import Path

from rlhf.datasets import cut_long_texts, load_rows
from rlhf.errors import DataError, MissingInputError
from rlhf.label_export import STRENGTH_MARGIN, build_export, majority, read_manifest as read_export_manifest, \
    write_export
from rlhf.runs import RunDir
from rlhf.store import Store

TIE_POLICIES = ("drop", "equal")
SELECTIONS = ("all", "best_worst")
# A label store's export that is not in the run folder yet: {runs/<name>/exports/<hash>: (rows, manifest)}, and
# where it was written outside the run folder for reading before the stage starts (only when read)
PENDING_EXPORTS: dict[str, tuple[list[dict], dict]] = {}
READABLE_COPIES: dict[str, Path] = {}


def preference_source(stage: str, preferences: str, batch: str, min_votes: int, run_dir: RunDir) -> dict:
    """{"preferences": a path to read pairs from, and what the manifest records about it}. A label store URL is
    exported first, into runs/<name>/exports/<content hash>; empty means the run's own export,
    runs/<name>/preferences."""
    source = preferences or str(run_dir.stage_path("preferences"))
    if "://" in source:
        store = Store(source, create=False)  # a mistyped URL is an error, not a new empty store
        folder, content_hash = store_export(stage, store, run_dir.path / "exports", batch or None, min_votes)
        return {"preferences": str(folder), "export_hash": content_hash}
    if not Path(source).exists() and not preferences:
        raise MissingInputError(f"no preference pairs at {source}: run `rlhf preferences --config ...` first, or "
                                f"set --{stage}.preferences")
    export_manifest = read_export_manifest(source) if Path(source).is_dir() else None
    return {"preferences": source, **({"export_hash": export_manifest["content_hash"]} if export_manifest else {})}


def store_export(stage: str, store: Store, exports: Path, batch: str | None, min_votes: int) -> tuple[Path, str]:
    """(the folder `exports/<content hash>` that the store's votes export to, the hash). A new export is kept in
    memory, so that a stage stopped by another input leaves the run folder as it was: `publish_pending_exports`
    writes it there once the stage holds its lock."""
    rows, manifest = build_export(store, batch, min_votes)
    folder = exports / manifest["content_hash"]
    if not folder.exists():
        PENDING_EXPORTS[str(folder)] = rows, manifest
    print(f"[{stage}] exported {manifest['rows']} pairs from {store.engine.url} to {folder}")
    return folder, manifest["content_hash"]


def readable(source: str) -> str:
    """Where a preference source's files are now: an export not yet in the run folder is written outside it the
    first time it is read (the stage's checks, and processes other than the main one, read it there)."""
    source = str(source)
    if source not in PENDING_EXPORTS:
        return source
    if source not in READABLE_COPIES:
        outside = Path(tempfile.mkdtemp(prefix="rlhf-export-"))
        atexit.register(shutil.rmtree, outside, True)
        write_export(*PENDING_EXPORTS[source], outside / Path(source).name)
        READABLE_COPIES[source] = outside / Path(source).name
    return str(READABLE_COPIES[source])


def publish_pending_exports() -> None:
    """Writes the store exports this process's stage found into the run folder (with its lock held)."""
    for folder, (rows, manifest) in list(PENDING_EXPORTS.items()):
        try:
            write_export(rows, manifest, Path(folder))  # a folder of the same hash already there is kept
        except OSError:
            if not Path(folder).is_dir():  # else another stage, under its own lock, wrote the same export first
                raise
        del PENDING_EXPORTS[folder]


def load_pairs(source: str, weight_by_gold: bool) -> list[dict]:
    """Every preference row, re-decided by gold-weighted votes when asked, with its loss weight."""
    try:
        rows = load_rows(readable(source), "preference")
    except DataError as err:  # a store's export not yet in the run folder is read from a copy: named as the export
        raise DataError(source, err.line, err.field, err.problem) from None
    if weight_by_gold:
        manifest = read_export_manifest(readable(source)) if Path(readable(source)).is_dir() else None
        if not manifest or "labeller_gold" not in manifest:
            raise DataError(source, None, "labeller_gold", "weight_by_gold needs a label export (rlhf label "
                                                            "export), whose export.json holds each labeller's gold "
                                                            "record")
        weights = labeller_weights(manifest["labeller_gold"])
        rows = [gold_weighted(row, weights) for row in rows]
    else:
        rows = [{**row, "weight": 1.0} for row in rows]
    # the pairs of one ranking share the weight of one observation (rlhf/label_export.py)
    return [{**row, "weight": row["weight"] * (row.get("pair_weight") or 1.0)} for row in rows]


def labeller_weights(gold: dict) -> dict:
    """A labeller's vote weight: their gold accuracy with one pseudo-answer right and one wrong (0.5 unseen)."""
    return {name: (record["correct"] + 1) / (record["answered"] + 2) for name, record in gold.items()}


def gold_weighted(row: dict, weights: dict) -> dict:
    """The row decided by a weighted majority of its votes. Its loss weight is the agreeing votes' total weight
    over the number of votes: a pair backed by accurate labellers who agree counts most."""
    votes = row["labeller_votes"]
    if not votes:
        return {**row, "weight": 1.0}
    totals = {}
    for vote in votes:
        totals[vote["verdict"]] = totals.get(vote["verdict"], 0.0) + weights.get(vote["labeller"], 0.5)
    verdict = majority(totals)
    row = {**row, "tie": verdict == "tie", "both_bad": verdict == "both_bad"}
    if verdict == "rejected":  # the weighted majority overturns the head count
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        flip = {"chosen": "rejected", "rejected": "chosen"}
        votes = [{**vote, "verdict": flip.get(vote["verdict"], vote["verdict"])} for vote in votes]
        row["labeller_votes"], verdict = votes, "chosen"
    agreeing = [vote for vote in votes if vote["verdict"] == verdict]
    if agreeing and verdict == "chosen":
        row["margin"] = sum(STRENGTH_MARGIN.get(vote["strength"], 0.0) for vote in agreeing) / len(agreeing)
    row["weight"] = sum(weights.get(vote["labeller"], 0.5) for vote in agreeing) / len(votes)
    return row


def usable_pairs(source: str, ties: str, weight_by_gold: bool, selection: str = "all", max_length: int | None = None,
                 stage: str = "") -> list[dict]:
    """The rows a preference loss can learn from, each with `weight`: both-bad rows dropped, ties dropped unless
    `ties` is "equal"; with `selection` best_worst, one pair per prompt (best_vs_worst). Refuses a source with no
    decided pair left. Text past what `max_length` tokens can cover is cut (rlhf.datasets.cut_long_texts). The
    weights are scaled to a mean of 1 over the rows kept (all 1 when they are equal), so that the losses' mean over
    a batch (rlhf.preference_loss) keeps each pair's weight relative to the whole data set."""
    rows = load_pairs(source, weight_by_gold)
    usable = [row for row in rows if not row["both_bad"] and (ties == "equal" or not row["tie"])]
    if selection == "best_worst":
        usable = best_vs_worst(usable)
    if not any(not row["tie"] for row in usable):
        both_bad = sum(row["both_bad"] for row in rows)
        tied = sum(row["tie"] and not row["both_bad"] for row in rows)
        raise DataError(source, None, "rows", f"no decided pair to learn from: of its {len(rows)} rows {tied} are "
                                              f"ties and {both_bad} both bad")
    return cut_long_texts(weights_of_mean_one(usable), max_length, source, stage)


def weights_of_mean_one(rows: list[dict]) -> list[dict]:
    weights = [row["weight"] for row in rows]
    if max(weights) == min(weights):
        return [{**row, "weight": 1.0} for row in rows]
    mean = statistics.fmean(weights)
    return [{**row, "weight": row["weight"] / mean} for row in rows]


def best_vs_worst(rows: list[dict]) -> list[dict]:
    """One decided pair per prompt: the one whose chosen answer outranks its rejected answer by the most, answers
    ranked by their share of wins over all of the prompt's pairs (a tie is half a win). With every pair of k
    answers compared, that is the best answer against the worst, unless the labellers put the worst above the
    best in that very comparison. The first such row wins a draw, so the choice is deterministic."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(json.dumps(row["prompt"]), []).append(row)
    selected = []
    for group in by_prompt.values():
        wins, games = Counter(), Counter()
        for row in group:
            chosen, rejected = answer_text(row, "chosen"), answer_text(row, "rejected")
            games.update([chosen, rejected])
            wins.update({chosen: 0.5, rejected: 0.5} if row["tie"] else {chosen: 1.0})
        share = {answer: wins[answer] / games[answer] for answer in games}
        decided = [row for row in group if not row["tie"]]
        if decided:
            selected.append(max(decided, key=lambda row: share[answer_text(row, "chosen")]
                                - share[answer_text(row, "rejected")]))
    return selected


def answer_text(row: dict, side: str) -> str:
    return row[side][-1]["content"]


def pair_margin(row: dict) -> float:
    """The margin a decided pair asks for (0 for a tie or a row without one)."""
    return 0.0 if row["tie"] else row.get("margin") or 0.0
