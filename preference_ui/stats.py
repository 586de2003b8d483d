"""`rlhf label stats`: progress, throughput and agreement of the labelling so far.

Agreement is measured two ways over comparisons with at least two votes: pairwise agreement (the share of pairs
of votes on the same item that agree) and Krippendorff's alpha for nominal data, which corrects for the agreement
expected by chance from how often each choice is used (1: perfect, 0: chance, below 0: systematic disagreement).
"""
from collections import Counter, defaultdict
from itertools import permutations

from rlhf.store import Store, User


def krippendorff_alpha(units: list[list[str]]) -> float | None:
    """Nominal alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k, where o is the coincidence matrix
    (each ordered pair of values within a unit of m values adds 1 / (m - 1)). None when it is undefined: fewer
    than two pairable values, or a single value used throughout (no expected disagreement)."""
    coincidences = Counter()
    for values in units:
        if len(values) < 2:
            continue
        for c, k in permutations(values, 2):
            coincidences[c, k] += 1 / (len(values) - 1)
    totals = Counter()
    for (c, _), weight in coincidences.items():
        totals[c] += weight
    n = sum(totals.values())
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if n < 2 or expected == 0:
        return None
    observed = sum(weight for (c, k), weight in coincidences.items() if c != k)
    return 1 - (n - 1) * observed / expected


def pairwise_agreement(units: list[list[str]]) -> float | None:
    agree = pairs = 0
    for values in units:
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                pairs += 1
                agree += values[i] == values[j]
    return agree / pairs if pairs else None


def stats(store: Store, batch: str | None = None) -> dict:
    comparisons = {c["id"]: c for c in store.comparisons(batch)}
    votes = [vote for vote in store.votes() if vote.comparison_id in comparisons]
    names = {user.id: user.name for user in store.users()}
    by_item, by_user = defaultdict(list), defaultdict(list)
    for vote in votes:
        by_item[vote.comparison_id].append(vote.choice)
        by_user[vote.user_id].append(vote)
    units = [choices for choices in by_item.values() if len(choices) >= 2]
    return {"batch": batch or "(all)", "comparisons": len(comparisons), "voted": len(by_item), "votes": len(votes),
            "choices": dict(Counter(vote.choice for vote in votes)),
            "krippendorff_alpha": krippendorff_alpha(units), "pairwise_agreement": pairwise_agreement(units),
            "labellers": {names[user_id]: labeller_stats(user_votes, comparisons)
                          for user_id, user_votes in sorted(by_user.items(), key=lambda item: names[item[0]])}}


def labeller_stats(votes: list, comparisons: dict) -> dict:
    seconds = [vote.seconds for vote in votes if vote.seconds is not None]
    gold = [vote for vote in votes if comparisons[vote.comparison_id]["kind"] == "gold"]
    return {"votes": len(votes), "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
            "gold_accuracy": (sum(vote.choice == comparisons[vote.comparison_id]["expected"] for vote in gold)
                              / len(gold)) if gold else None}


def number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_stats(report: dict) -> str:
    lines = [f"batch {report['batch']}: {report['voted']}/{report['comparisons']} comparisons voted, "
             f"{report['votes']} votes {report['choices']}",
             f"agreement: Krippendorff's alpha {number(report['krippendorff_alpha'], '.3f')}, pairwise "
             f"{number(report['pairwise_agreement'], '.3f')}"]
    for name, row in report["labellers"].items():
        lines.append(f"  {name:24} {row['votes']:5} votes  {number(row['mean_seconds'], '.1f')} s/vote  "
                     f"gold accuracy {number(row['gold_accuracy'], '.2f')}")
    return "\n".join(lines)
