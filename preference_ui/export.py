"""`rlhf label export`: the store's votes as a preference dataset for TRL (conversational form).

One row per comparison with at least `min_votes` votes: the majority choice decides chosen and rejected; when `a`
and `b` draw, or `tie` wins, the row is a tie; when `both_bad` wins, the row says so (the reward stage decides what
to do with ties and both-bad rows). `margin` is the mean strength of the majority's votes (slight 0.5, clear 1.0),
`agreement` the share of votes that agree with the majority. Votes are stored in the comparison's own a/b terms
(the UI undoes its side swap before storing), so aggregation never needs `swapped`.

The export is deterministic: the same votes give the same rows in the same order and the same content hash, kept
in `export.json` beside the saved dataset. Exporting into a folder that holds a different export is refused.
"""
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import datasets

from rlhf.errors import UserError
from rlhf.runs import atomic_write_json, hash_config
from rlhf.store import Store

STRENGTH_MARGIN = {"slight": 0.5, "clear": 1.0}
MANIFEST = "export.json"


def aggregate(store: Store, batch: str | None = None, min_votes: int = 1, kinds=("train",)) -> list[dict]:
    votes_by_comparison: dict[int, list] = {}
    for vote in store.votes():
        votes_by_comparison.setdefault(vote.comparison_id, []).append(vote)
    rows = []
    for comparison in store.comparisons(batch):
        votes = votes_by_comparison.get(comparison["id"], [])
        if comparison["kind"] in kinds and len(votes) >= max(1, min_votes):
            rows.append(preference_row(comparison, votes))
    return rows


def majority(counts: Counter) -> str:
    top = max(counts.values())
    leaders = sorted(choice for choice, count in counts.items() if count == top)
    if len(leaders) == 1:
        return leaders[0]
    return "both_bad" if leaders == ["both_bad"] else "tie"  # a draw between different verdicts is a tie


def preference_row(comparison: dict, votes: list) -> dict:
    counts = Counter(vote.choice for vote in votes)
    verdict = majority(counts)
    chosen, rejected = (comparison["b"], comparison["a"]) if verdict == "b" else (comparison["a"], comparison["b"])
    agreeing = [vote for vote in votes if vote.choice == verdict]
    margin = sum(STRENGTH_MARGIN[vote.strength] for vote in agreeing) / len(agreeing) if agreeing else 0.0
    return {"id": f"cmp-{comparison['id']}", "batch": comparison["batch"], "prompt": comparison["prompt"],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "tie": verdict == "tie", "both_bad": verdict == "both_bad", "margin": round(margin, 4),
            "votes": len(votes), **{f"votes_{choice}": counts.get(choice, 0) for choice in ("a", "b", "tie", "both_bad")},
            "agreement": round(len(agreeing) / len(votes), 4)}


def export(store: Store, out, batch: str | None = None, min_votes: int = 1) -> dict:
    """Writes the dataset to `out` (atomically) and returns its manifest; an identical export is left as is."""
    rows = aggregate(store, batch, min_votes)
    if not rows:
        raise UserError(f"nothing to export: no comparisons{f' in batch {batch}' if batch else ''} with at least "
                        f"{min_votes} vote(s)")
    manifest = {"content_hash": hash_config(rows), "rows": len(rows), "batch": batch, "min_votes": min_votes,
                "ties": sum(r["tie"] for r in rows), "both_bad": sum(r["both_bad"] for r in rows)}
    out = Path(out)
    if out.exists():
        existing = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {}
        if existing.get("content_hash") == manifest["content_hash"]:
            return {**existing, "unchanged": True}
        raise UserError(f"{out} holds a different export (content hash {existing.get('content_hash', 'none')}, "
                        f"this one {manifest['content_hash']}); choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(staging))
        atomic_write_json(staging / MANIFEST, manifest)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
