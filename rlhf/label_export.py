"""`rlhf label export`: the store's votes as a preference dataset for TRL (conversational form).

One row per comparison with at least `min_votes` votes: the majority choice decides chosen and rejected; when `a`
and `b` draw, or `tie` wins, the row is a tie; when `both_bad` wins, the row says so (the reward stage decides what
to do with ties and both-bad rows). `margin` is the mean strength of the majority's votes (slight 0.5, clear 1.0),
`agreement` the share of votes that agree with the majority. `labeller_votes` keeps every vote in the row's own
terms (chosen, rejected, tie, both_bad), so the reward stage can weight labellers and measure the human ceiling;
`export.json` holds each labeller's gold record (answered, correct). Votes are stored in the comparison's own a/b terms
(the UI undoes its side swap before storing), so aggregation never needs `swapped`.

A ranking item (rlhf/rankings.py) gives one row per pair of its answers, decided like a comparison by its
labellers' verdicts on that pair as their rankings order it (no strength: margin 0). Such rows carry the item's
`ranking` id and `pair_weight` 1 / (its number of pairs), so the reward stage counts a ranking once however many
answers it orders; when an export holds rankings, its pairwise rows carry `ranking` None and `pair_weight` 1.

An answer a labeller wrote for an item (`written_answers`) becomes a pair that prefers it to the answer the votes
chose (to both answers after a tie or both-bad verdict), as from that labeller with a clear strength (ids
`written-<n>-<i>`); `rlhf label export --demonstrations FILE` writes the written answers as SFT demonstrations
(JSONL `messages`, the item's prompt then the written answer), which `--sft.train_data` takes.

The export is deterministic: the same votes give the same rows in the same order and the same content hash, kept
in `export.json` beside the saved dataset. Exporting into a folder that holds a different export is refused.
"""
import itertools
import json
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import datasets

from rlhf.errors import UserError
from rlhf.rankings import pair_weight
from rlhf.runs import atomic_write_json, atomic_write_text, hash_config
from rlhf.schema import PREFERENCE_CHOICES, VOTE_CHOICES
from rlhf.store import Store

STRENGTH_MARGIN = {"slight": 0.5, "clear": 1.0}
MANIFEST = "export.json"


def aggregate(comparisons: list[dict], votes: list, names: dict, batch: str | None = None, min_votes: int = 1,
              kinds=("train",), rankings: list = (), written: list = ()) -> list[dict]:
    judgements: dict[int, list] = {}
    for judgement in (*votes, *rankings):
        judgements.setdefault(judgement.comparison_id, []).append(judgement)
    written_for: dict[int, list] = {}
    for answer in written:
        written_for.setdefault(answer.comparison_id, []).append(answer)
    rows = []
    for comparison in comparisons:
        item_judgements = judgements.get(comparison["id"], [])
        if (batch is not None and comparison["batch"] != batch) or comparison["kind"] not in kinds \
                or len(item_judgements) < max(1, min_votes):
            continue
        if comparison.get("answers"):
            rows += ranking_rows(comparison, item_judgements, names)
        elif comparison["a"] != comparison["b"] and comparison["a"].strip() and comparison["b"].strip():
            # two answers of the same text, or an empty one, carry no preference row, whatever the votes (a store
            # from before `label sample` stopped comparing them may hold some)
            row = preference_row(comparison, item_judgements, names)
            rows.append(row)
            for answer in written_for.get(comparison["id"], []):
                rows += written_pairs(row, comparison, answer, names)
    if any("ranking" in row for row in rows):  # one set of columns for every row of the dataset
        rows = [{**row, "ranking": row.get("ranking"), "pair_weight": row.get("pair_weight", 1.0)} for row in rows]
    return rows


def ranking_rows(item: dict, rankings: list, names: dict) -> list[dict]:
    """A ranking item's rows, one per pair of answers with different texts: each labeller's verdict on the pair
    is read from their ranking and the majority decides, as for a comparison's votes."""
    answers, rows = item["answers"], []
    for i, j in itertools.combinations(range(len(answers)), 2):
        if answers[i] == answers[j] or not (answers[i].strip() and answers[j].strip()):
            continue
        verdicts = [SimpleNamespace(user_id=ranking.user_id, strength=None,
                                    choice=pair_choice(ranking.ranks[i], ranking.ranks[j])) for ranking in rankings]
        pair = {**item, "a": answers[i], "b": answers[j]}
        rows.append({**preference_row(pair, verdicts, names), "id": f"rank-{item['id']}-{i}-{j}",
                     "ranking": f"rank-{item['id']}", "pair_weight": pair_weight(len(answers))})
    return rows


def written_pairs(row: dict, comparison: dict, answer, names: dict) -> list[dict]:
    """Pairs preferring a labeller's written answer to the one the votes chose, or to both answers when the votes
    chose neither (a tie, both bad); none against an answer of the same text."""
    decided = not (row["tie"] or row["both_bad"])
    beaten = [row["chosen"][0]["content"]] if decided else [comparison["a"], comparison["b"]]
    return [{**row, "id": f"written-{answer.id}-{i}", "chosen": [{"role": "assistant", "content": answer.text}],
             "rejected": [{"role": "assistant", "content": text}], "tie": False, "both_bad": False, "margin": 1.0,
             "votes": 1, **{f"votes_{choice}": int(choice == "a") for choice in VOTE_CHOICES}, "agreement": 1.0,
             "labeller_votes": [{"labeller": names[answer.user_id], "verdict": "chosen", "strength": "clear"}]}
            for i, text in enumerate(beaten) if text != answer.text and text.strip()]


def demonstration_rows(comparisons: list[dict], written: list, batch: str | None = None) -> list[dict]:
    """Each written answer to a training item as an SFT demonstration: the item's prompt, then the written answer.
    Answers written on gold or eval items stay in the store: their prompts must not become training data."""
    prompts = {c["id"]: c["prompt"] for c in comparisons
               if c["kind"] == "train" and (batch is None or c["batch"] == batch)}
    return [{"id": f"written-{answer.id}", "category": "written",
             "messages": [*prompts[answer.comparison_id], {"role": "assistant", "content": answer.text}]}
            for answer in written if answer.comparison_id in prompts]


def demonstrations(store: Store, batch: str | None = None) -> list[dict]:
    """The written answers as SFT demonstrations; none is an error."""
    rows = demonstration_rows(store.comparisons(), store.written_answers(), batch)
    if not rows:
        raise UserError(f"no written answers{f' in batch {batch}' if batch else ''} to export as demonstrations")
    return rows


def demonstrations_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def check_demonstrations_file(rows: list[dict], out: Path) -> None:
    """A file already at `out` is these demonstrations (written again unchanged), never anything else: it would be
    lost."""
    if out.is_file() and out.read_text(errors="replace") != demonstrations_text(rows):
        raise UserError(f"{out} exists and holds something else than these demonstrations; choose another "
                        "--demonstrations or remove it")


def write_demonstrations(rows: list[dict], out) -> None:
    atomic_write_text(out, demonstrations_text(rows))


def pair_choice(rank_a: int, rank_b: int) -> str:
    return "a" if rank_a < rank_b else "b" if rank_b < rank_a else "tie"


def gold_records(comparisons: list[dict], votes: list, names: dict) -> dict:
    """Each labeller's answers on gold comparisons, whatever their batch: {name: {"answered", "correct"}}."""
    expected = {c["id"]: c["expected"] for c in comparisons if c["kind"] == "gold"}
    records: dict[str, dict] = {}
    for vote in votes:
        if vote.comparison_id in expected:
            record = records.setdefault(names[vote.user_id], {"answered": 0, "correct": 0})
            record["answered"] += 1
            record["correct"] += vote.choice == expected[vote.comparison_id]
    return dict(sorted(records.items()))


def majority(counts: dict) -> str:
    """The verdict with the most votes (or the most vote weight); a draw between different verdicts is a tie."""
    top = max(counts.values())
    leaders = sorted(choice for choice, count in counts.items() if math.isclose(count, top))
    if len(leaders) == 1:
        return leaders[0]
    return "both_bad" if leaders == ["both_bad"] else "tie"  # a draw between different verdicts is a tie


def preference_row(comparison: dict, votes: list, names: dict) -> dict:
    """The comparison's row; its labellers' votes in the order of their names, not of when they voted (a
    stage interrupted and resumed stores the same votes in another order, and its export must be the same)."""
    votes = sorted(votes, key=lambda vote: names[vote.user_id])
    counts = Counter(vote.choice for vote in votes)
    verdict = majority(counts)
    chosen, rejected = (comparison["b"], comparison["a"]) if verdict == "b" else (comparison["a"], comparison["b"])
    in_row_terms = {"a": "rejected" if verdict == "b" else "chosen", "b": "chosen" if verdict == "b" else "rejected",
                    "tie": "tie", "both_bad": "both_bad"}
    agreeing = [vote for vote in votes if vote.choice == verdict]
    decided = agreeing and verdict in PREFERENCE_CHOICES  # only a preference has a strength, and so a margin
    margin = (sum(STRENGTH_MARGIN.get(vote.strength, 0.0) for vote in agreeing) / len(agreeing)  # a ranking: none
              if decided else 0.0)
    return {"id": f"cmp-{comparison['id']}", "batch": comparison["batch"], "prompt": comparison["prompt"],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "tie": verdict == "tie", "both_bad": verdict == "both_bad", "margin": round(margin, 4),
            "votes": len(votes), **{f"votes_{choice}": counts.get(choice, 0) for choice in VOTE_CHOICES},
            "agreement": round(len(agreeing) / len(votes), 4),
            "labeller_votes": [{"labeller": names[vote.user_id], "verdict": in_row_terms[vote.choice],
                                "strength": vote.strength} for vote in votes]}


def build_export(store: Store, batch: str | None = None, min_votes: int = 1) -> tuple[list[dict], dict]:
    """The rows and manifest of an export of the store as it is now."""
    # Labellers may be voting meanwhile. Read in this order, so that what one read finds the later ones have: a
    # written answer is committed with its vote, and a vote, ranking or written answer comes from a stored user.
    comparisons = store.comparisons()
    written, rankings = store.written_answers(), store.rankings()
    votes = store.votes()  # read once, for the rows and the gold records
    names = {user.id: user.name for user in store.users()}
    rows = aggregate(comparisons, votes, names, batch, min_votes, rankings=rankings, written=written)
    if not rows:
        raise UserError(f"nothing to export: no comparisons{f' in batch {batch}' if batch else ''} with at least "
                        f"{min_votes} vote(s)")
    gold = gold_records(comparisons, votes, names)
    manifest = {"content_hash": hash_config({"rows": rows, "gold": gold}), "rows": len(rows), "batch": batch,
                "min_votes": min_votes, "ties": sum(r["tie"] for r in rows),
                "both_bad": sum(r["both_bad"] for r in rows),
                "rankings": len({r["ranking"] for r in rows if r.get("ranking")}),
                "written": sum(r["id"].startswith("written-") for r in rows), "labeller_gold": gold}
    return rows, manifest


def export(store: Store, out, batch: str | None = None, min_votes: int = 1) -> dict:
    """Writes the dataset to `out` (atomically) and returns its manifest; an identical export is left as is."""
    rows, manifest = build_export(store, batch, min_votes)
    return write_export(rows, manifest, Path(out))


def read_manifest(folder) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_output(out: Path, option: str, folder: bool) -> None:
    """Before anything is written: `out` is not a file where a folder goes (or a folder where a file goes), and
    the nearest existing path above it is a folder to make it in."""
    out = Path(out)
    if out.exists() and out.is_dir() != folder:
        raise UserError(f"{out}: is a {'file' if folder else 'folder'}, and {option} names the "
                        f"{'folder an export is written to' if folder else 'file demonstrations are written to'}")
    above = out.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{out}: {above} is a file, so {option} cannot be made under it")


def existing_export(rows_manifest: dict, out: Path) -> dict:
    """The export already at `out` when it is this one (marked unchanged); any other folder there is an error."""
    existing = read_manifest(out)
    if existing is None:
        raise UserError(f"{out} is a folder that holds no export; choose another --out or remove it")
    if existing.get("content_hash") != rows_manifest["content_hash"]:
        raise UserError(f"{out} holds a different export (content hash {existing.get('content_hash')}, this one "
                        f"{rows_manifest['content_hash']}); choose another --out or remove it")
    return {**existing, "unchanged": True}


def write_export(rows: list[dict], manifest: dict, out: Path) -> dict:
    check_output(out, "--out", folder=True)
    if out.exists():
        return existing_export(manifest, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(staging))
        atomic_write_json(staging / MANIFEST, manifest)
        try:
            staging.rename(out)
        except OSError:  # another export (a second click, another command) put its folder there first
            if not out.is_dir():
                raise
            return existing_export(manifest, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
