"""`rlhf label stats`: progress, throughput and agreement of the labelling so far.

Agreement is measured two ways over comparisons with at least two votes: pairwise agreement (the share of pairs
of votes on the same item that agree) and Krippendorff's alpha for nominal data, which corrects for the agreement
expected by chance from how often each choice is used (1: perfect, 0: chance, below 0: systematic disagreement).
Ranking items are measured by Kendall's tau-b between two labellers' rankings of the same answers, averaged over
every pair of labellers on every item ranked at least twice (rlhf/rankings.py). Each labeller's agreement with the
others is the share of their votes that match the majority of the other votes on the same item (a draw counts as a
tie), over the items someone else voted on too: for an AI labeller (`rlhf label ai`), its agreement with people.
"""
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import permutations

from rlhf.rankings import ranking_agreement
from rlhf.store import Store, shown_utc


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


@dataclass
class Labels:
    """Everything the statistics read, loaded from the store once."""
    comparisons: dict  # id -> comparison row (store.comparisons())
    votes: list
    names: dict  # user id -> name
    rankings: list = ()
    gold_passed: list = ()  # a user id per gold item that user skipped or let time out
    closed: dict = field(default_factory=dict)  # batch -> when it was closed (its votes exported, or by hand)
    closed_by_hand: set = field(default_factory=set)


def load_labels(store: Store) -> Labels:
    """Votes and rankings first, then the comparisons and users they refer to: labelling goes on between the reads,
    and a comparison or user never goes away, so every vote read finds its comparison and labeller."""
    votes, rankings, gold_passed = store.votes(), store.rankings(), store.gold_passed()
    return Labels({c["id"]: c for c in store.comparisons()}, votes, {user.id: user.name for user in store.users()},
                  rankings, gold_passed, store.closed_batches(), store.closed_by_hand())


def stats(store: Store, batch: str | None = None) -> dict:
    return summarise(load_labels(store), batch)


def summarise(labels: Labels, batch: str | None = None) -> dict:
    """Progress and agreement over the batch's votes (no batch: every batch's, the gold items left out: built to
    be easy and given to everyone, they would raise the agreement); each labeller's gold accuracy over every gold
    item they answered, whichever batch holds it (gold items are mixed into every queue)."""
    all_comparisons, all_votes, names = labels.comparisons, labels.votes, labels.names
    in_batch = {i for i, c in all_comparisons.items()
                if c["batch"] == batch or (batch is None and c["kind"] != "gold")}
    votes = [vote for vote in all_votes if vote.comparison_id in in_batch]
    by_item, by_user, item_votes = defaultdict(list), defaultdict(list), defaultdict(list)
    for vote in votes:
        by_item[vote.comparison_id].append(vote.choice)
        by_user[vote.user_id].append(vote)
        item_votes[vote.comparison_id].append(vote)
    gold_by_user = defaultdict(list)
    for vote in all_votes:
        if all_comparisons[vote.comparison_id]["kind"] == "gold":
            gold_by_user[vote.user_id].append(vote.choice == all_comparisons[vote.comparison_id]["expected"])
    ranked = defaultdict(list)
    for ranking in labels.rankings:
        if ranking.comparison_id in in_batch:
            ranked[ranking.comparison_id].append(ranking.ranks)
            by_user[ranking.user_id].append(ranking)  # a ranking is one judgement, as a vote is
    units = [choices for choices in by_item.values() if len(choices) >= 2]
    gold_passed = Counter(labels.gold_passed)
    return {"batch": batch or "(all)", "comparisons": len(in_batch), "voted": len(by_item) + len(ranked),
            "votes": len(votes), "choices": dict(Counter(vote.choice for vote in votes)),
            "krippendorff_alpha": krippendorff_alpha(units), "pairwise_agreement": pairwise_agreement(units),
            "rankings": sum(map(len, ranked.values())), "ranked_twice": sum(len(r) >= 2 for r in ranked.values()),
            "kendall_tau": ranking_agreement(list(ranked.values())),
            "human_win_rates": human_win_rates(all_comparisons, votes),
            "labellers": {names[user_id]: labeller_stats(user_votes, gold_by_user[user_id],
                                                         agreement_with_others(user_id, item_votes),
                                                         gold_passed[user_id])
                          for user_id, user_votes in sorted(by_user.items(), key=lambda item: names[item[0]])}}


def agreement_with_others(user_id: int, item_votes: dict) -> float | None:
    """The share of the labeller's votes that match the majority of the other votes on the same item."""
    matches = []
    for votes in item_votes.values():
        mine = [vote.choice for vote in votes if vote.user_id == user_id]
        others = Counter(vote.choice for vote in votes if vote.user_id != user_id)
        if mine and others:
            top = max(others.values())
            leaders = [choice for choice, count in others.items() if count == top]
            matches.append(mine[0] == (leaders[0] if len(leaders) == 1 else "tie"))
    return sum(matches) / len(matches) if matches else None


def human_win_rates(comparisons: dict, votes: list) -> dict:
    """For blind policy-vs-baseline comparisons (`rlhf eval --human`): per policy model, the share of its
    comparisons its answer wins, each comparison counting once as the mean of its votes (a vote for the policy 1,
    a tie or both-bad one half), with a Wilson 95% interval over the comparisons (the normal approximation's
    shrinks to nothing at a rate of 0 or 1: [1, 1] after one vote). Over comparisons, not votes: the labellers of
    one comparison agree far more than votes on different ones, and counting each of them would narrow the
    interval by up to the square root of the overlap."""
    outcomes = defaultdict(lambda: defaultdict(list))
    for vote in votes:
        comparison = comparisons[vote.comparison_id]
        if comparison["kind"] != "eval" or {comparison["a_role"], comparison["b_role"]} != {"policy", "baseline"}:
            continue
        policy_side = "a" if comparison["a_role"] == "policy" else "b"
        policy = comparison[f"{policy_side}_model"]
        outcomes[policy][vote.comparison_id].append(
            1.0 if vote.choice == policy_side else 0.5 if vote.choice in ("tie", "both_bad") else 0.0)
    rates = {}
    for policy, by_comparison in sorted(outcomes.items()):
        means = [sum(values) / len(values) for values in by_comparison.values()]
        rate = sum(means) / len(means)
        low, high = wilson_interval(rate, len(means))
        rates[policy] = {"votes": sum(map(len, by_comparison.values())), "comparisons": len(means),
                         "win_rate": rate, "low": low, "high": high}
    return rates


def wilson_interval(rate: float, count: int, z: float = 1.96) -> tuple[float, float]:
    centre = (rate + z * z / (2 * count)) / (1 + z * z / count)
    half_width = z / (1 + z * z / count) * (rate * (1 - rate) / count + z * z / (4 * count * count)) ** 0.5
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def labeller_stats(votes: list, gold_correct: list[bool], with_others: float | None = None,
                   gold_passed: int = 0) -> dict:
    """`gold_passed`: gold items skipped or let time out, beside the accuracy over those answered (skipping the
    hard ones would raise it unseen)."""
    seconds = [vote.seconds for vote in votes if vote.seconds is not None]
    return {"votes": len(votes), "mean_seconds": sum(seconds) / len(seconds) if seconds else None,
            "gold_votes": len(gold_correct),
            "gold_accuracy": sum(gold_correct) / len(gold_correct) if gold_correct else None,
            "gold_passed": gold_passed, "agreement_with_others": with_others}


def batch_rows(labels: Labels) -> list[list]:
    """One row per batch for the admin tab: [batch, comparisons, voted, votes and rankings, alpha, pairwise
    agreement, closed] (a ranking counts one, as in the labellers' rows; closed: when a stage exported the batch
    and closed it, or an admin closed it ("by hand" after the time), empty while the app serves it)."""
    rows = []
    for batch in sorted({c["batch"] for c in labels.comparisons.values()}):
        report = summarise(labels, batch)
        rows.append([batch, report["comparisons"], report["voted"], report["votes"] + report["rankings"],
                     rounded(report["krippendorff_alpha"]), rounded(report["pairwise_agreement"]),
                     closed_when(labels, batch)])
    return rows


def closed_when(labels: Labels, batch: str) -> str:
    closed = labels.closed.get(batch)
    if closed is None:
        return ""
    return f"{shown_utc(closed)} (by hand)" if batch in labels.closed_by_hand else shown_utc(closed)


def labeller_rows(report: dict) -> list[list]:
    """[labeller, votes and rankings, mean seconds per one, gold votes, gold accuracy, gold skipped or timed out]
    for the admin tab."""
    return [[name, row["votes"], rounded(row["mean_seconds"], 1), row["gold_votes"], rounded(row["gold_accuracy"]),
             row["gold_passed"]] for name, row in report["labellers"].items()]


def rounded(value, digits: int = 3):
    return None if value is None else round(value, digits)


def number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_stats(report: dict) -> str:
    lines = [f"batch {report['batch']}: {report['voted']}/{report['comparisons']} comparisons voted, "
             f"{report['votes']} votes {report['choices']}",
             f"agreement: Krippendorff's alpha {number(report['krippendorff_alpha'], '.3f')}, pairwise "
             f"{number(report['pairwise_agreement'], '.3f')}"]
    if report["rankings"]:
        lines.append(f"rankings: {report['rankings']}; agreement: Kendall's tau-b "
                     f"{number(report['kendall_tau'], '.3f')} over {report['ranked_twice']} items ranked twice or more")
    for name, row in report["labellers"].items():
        lines.append(f"  {name:24} {row['votes']:5} votes  {number(row['mean_seconds'], '.1f')} s/vote  "
                     f"gold accuracy {number(row['gold_accuracy'], '.2f')} ({row['gold_passed']} passed)  "
                     f"agrees with the others {number(row['agreement_with_others'], '.2f')}")
    for policy, row in report["human_win_rates"].items():
        lines.append(f"human win rate of {policy} against the baseline: {row['win_rate']:.3f} "
                     f"[{row['low']:.3f}, {row['high']:.3f}] over {row['comparisons']} comparisons "
                     f"({row['votes']} votes)")
    return "\n".join(lines)
