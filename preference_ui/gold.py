"""`rlhf label gold FILE`: comparisons with a known answer, mixed into every labeller's queue.

Gold items measure each labeller (their accuracy shows in `rlhf label stats` and the admin tab) and never enter
the exported training pairs. Rows: {"id", "prompt", "a", "b", "expected": a|b|tie|both_bad}. Importing the same
file again changes nothing; a different file into a batch that already has items is refused.
"""
from rlhf.datasets import load_rows
from rlhf.errors import UserError
from rlhf.store import Store, check_prompt_widths, shown_url

GOLD_MODEL = "gold"


def comparison_key(prompt: list[dict], a: str, b: str, expected: str) -> tuple:
    return (tuple((m["role"], m["content"]) for m in prompt), a, b, expected)


def import_gold(store: Store, source: str, batch: str = "gold", rows: list[dict] | None = None,
                fix: str = "import it under another --batch") -> dict:
    """The gold rows of `source` (or `rows`, already read from it) as gold comparisons in `batch`."""
    rows = load_rows(source, "gold") if rows is None else rows
    existing = check_gold(store, source, rows, batch, fix)
    if existing:
        return {"batch": batch, "items": existing, "unchanged": True}
    pairs = []
    for row in rows:
        prompt = store.add_prompt(f"{batch}/{row['id']}", row["category"], row["prompt"])
        pairs.append((store.add_response(prompt, row["a"], GOLD_MODEL, {}),
                      store.add_response(prompt, row["b"], GOLD_MODEL, {})))
    # the comparisons in one transaction: a killed import leaves none, and the next one starts afresh
    store.add_comparisons(pairs, batch=batch, kind="gold", expected=[row["expected"] for row in rows])
    return {"batch": batch, "items": len(rows), "unchanged": False}


def check_gold(store: Store, source: str, rows: list[dict], batch: str = "gold",
               fix: str = "import it under another --batch") -> int:
    """Reads only: how many gold items of these rows `batch` holds already (0: none, to import), or a UserError
    when the batch holds other comparisons or a prompt id of the rows is in the store with other text. `fix`:
    what the user can do about a batch holding another file's items."""
    existing = store.comparisons(batch)
    if existing:
        wanted = {comparison_key(row["prompt"], row["a"], row["b"], row["expected"]) for row in rows}
        stored = {comparison_key(c["prompt"], c["a"], c["b"], c["expected"]) for c in existing}
        if stored == wanted and all(c["kind"] == "gold" for c in existing):
            return len(existing)
        raise UserError(f"batch '{batch}' of {shown_url(store.url)} already holds different comparisons than "
                        f"{source}: {fix}")
    ids = {f"{batch}/{row['id']}": row["prompt"] for row in rows}
    check_prompt_widths(ids, [row["category"] for row in rows], source)
    store.check_prompt_ids(ids, source)
    return 0
