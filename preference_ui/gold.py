"""`rlhf label gold FILE`: comparisons with a known answer, mixed into every labeller's queue.

Gold items measure each labeller (their accuracy shows in `rlhf label stats` and the admin tab) and never enter
the exported training pairs. Rows: {"id", "prompt", "a", "b", "expected": a|b|tie|both_bad}. Importing the same
file again changes nothing; a different file into a batch that already has items is refused.
"""
from rlhf.datasets import load_rows
from rlhf.errors import UserError
from rlhf.store import Store, check_prompt_widths

GOLD_MODEL = "gold"


def comparison_key(prompt: list[dict], a: str, b: str, expected: str) -> tuple:
    return (tuple((m["role"], m["content"]) for m in prompt), a, b, expected)


def import_gold(store: Store, source: str, batch: str = "gold", rows: list[dict] | None = None) -> dict:
    """The gold rows of `source` (or `rows`, already read from it) as gold comparisons in `batch`."""
    rows = load_rows(source, "gold") if rows is None else rows
    wanted = {comparison_key(row["prompt"], row["a"], row["b"], row["expected"]) for row in rows}
    existing = store.comparisons(batch)
    if existing:
        stored = {comparison_key(c["prompt"], c["a"], c["b"], c["expected"]) for c in existing}
        if stored == wanted and all(c["kind"] == "gold" for c in existing):
            return {"batch": batch, "items": len(existing), "unchanged": True}
        raise UserError(f"batch '{batch}' already holds different comparisons; import {source} under another "
                        "--batch")
    ids = {f"{batch}/{row['id']}": row["prompt"] for row in rows}
    check_prompt_widths(ids, [row["category"] for row in rows], source)
    store.check_prompt_ids(ids, source)
    pairs = []
    for row in rows:
        prompt = store.add_prompt(f"{batch}/{row['id']}", row["category"], row["prompt"])
        pairs.append((store.add_response(prompt, row["a"], GOLD_MODEL, {}),
                      store.add_response(prompt, row["b"], GOLD_MODEL, {})))
    # the comparisons in one transaction: a killed import leaves none, and the next one starts afresh
    store.add_comparisons(pairs, batch=batch, kind="gold", expected=[row["expected"] for row in rows])
    return {"batch": batch, "items": len(rows), "unchanged": False}
