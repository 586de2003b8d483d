"""K-wise rankings (issue 19): a labeller orders k answers to one prompt, ties allowed. A ranking is stored as one
rank per answer, 1 the best; equal ranks are a tie ([1, 2, 2, 3]: the first best, the middle two tied, the last
worst). Only the order matters, so [1, 3, 3, 7] is the same ranking.

Three readings of a ranking:

- **pairs**: every pair of its answers, the better first, or a tie where the ranks are equal: k(k - 1) / 2 pairs
  from one read of the prompt. They are not independent observations, so each carries weight 1 / (number of
  pairs) and a ranking counts once in the loss however large k is (InstructGPT trains on all of a ranking's pairs
  as one batch element for the same reason).
- **Plackett-Luce** (`rlhf.preference_loss.plackett_luce_loss`): the probability of the whole order under
  rewards r, choosing the best of the answers left, then the best of the rest, and so on:
  P = prod_t exp(r_(t)) / sum_{j still left at t} exp(r_j). Tied answers are each chosen against every answer not
  yet placed (Breslow's approximation), so a tie at the bottom still asks for rewards close together, and without
  ties this is the exact Plackett-Luce likelihood.
- **agreement**: Kendall's tau-b between two labellers' rankings of the same answers (ties corrected), averaged
  over every pair of labellers on every item ranked more than once.
"""
import itertools
import re

MAX_K = 6


def check_ranks(ranks: list[int]) -> list[int]:
    """The ranks as given, if they rank 2 to MAX_K answers with whole numbers from 1; else ValueError."""
    if not 2 <= len(ranks) <= MAX_K:
        raise ValueError(f"a ranking orders 2 to {MAX_K} answers, got {len(ranks)}")
    if any(not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 for rank in ranks):
        raise ValueError(f"ranks are whole numbers from 1 (the best), got {ranks}")
    return list(ranks)


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int, bool]]:
    """(better, worse, tied) answer positions for every pair of the ranking; for a tie, the earlier position
    first."""
    check_ranks(ranks)
    pairs = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if ranks[i] == ranks[j]:
            pairs.append((i, j, True))
        else:
            pairs.append((i, j, False) if ranks[i] < ranks[j] else (j, i, False))
    return pairs


def ranks_in_order(order: list[int], scores: list[float], tie_margin: float) -> list[int]:
    """Ranks (1 the best) of answers placed in `order`, best first: an answer whose score is within `tie_margin` of
    the one placed just before it shares that one's rank (equal scores always do)."""
    ranks, rank = [0] * len(order), 0
    for place, answer in enumerate(order):
        tied = place > 0 and abs(scores[answer] - scores[order[place - 1]]) < max(tie_margin, 1e-12)
        rank = rank if tied else place + 1
        ranks[answer] = rank
    return ranks


def pair_weight(answers: int) -> float:
    """The weight of each pair of a ranking of `answers` answers: together its pairs count as one observation."""
    return 1.0 / (answers * (answers - 1) // 2)


def kendall_tau_b(ranks_a: list[int], ranks_b: list[int]) -> float | None:
    """Kendall's tau-b of two rankings of the same answers; None where one of them ties every answer."""
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"the two rankings order {len(ranks_a)} and {len(ranks_b)} answers")
    concordant = discordant = tied_a = tied_b = 0
    for i, j in itertools.combinations(range(len(ranks_a)), 2):
        a, b = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
        tied_a += a == 0
        tied_b += b == 0
        concordant += a * b > 0
        discordant += a * b < 0
    pairs = len(ranks_a) * (len(ranks_a) - 1) // 2
    denominator = ((pairs - tied_a) * (pairs - tied_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def ranking_agreement(units: list[list[list[int]]]) -> float | None:
    """Mean Kendall's tau-b over every pair of rankings of the same item (`units`: per item, its labellers'
    rankings); None when no item was ranked twice."""
    taus = [tau for rankings in units for a, b in itertools.combinations(rankings, 2)
            if (tau := kendall_tau_b(a, b)) is not None]
    return sum(taus) / len(taus) if taus else None


def ranks_from_order(order: str, answers: int) -> list[int]:
    """Ranks of the answers shown 1..`answers` from a labeller's order, best first: their numbers separated by
    spaces, with `=` between tied ones ("3 1=4 2": the third best, the first and fourth tied next, the second
    last; spaces around `=` are allowed). Every answer must appear once; else ValueError."""
    order = re.sub(r"\s*=\s*", "=", order.replace(",", " "))
    tiers = [tier.split("=") for tier in order.split()]
    ranks = [0] * answers
    for place, tier in enumerate(tiers, start=1):
        for number in tier:
            if not number.isdigit() or not 1 <= int(number) <= answers:
                raise ValueError(f"'{number}' is not an answer's number (1 to {answers})")
            if ranks[int(number) - 1]:
                raise ValueError(f"answer {number} is in the order twice")
            ranks[int(number) - 1] = place
    missing = [str(i + 1) for i, rank in enumerate(ranks) if not rank]
    if missing:
        raise ValueError(f"the order leaves out answer{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return ranks
