"""Simulated labellers: automatic judges that vote through the same store API as people.

A judge is any callable `(prompts: list[str], responses: list[str]) -> list[float]` (higher is better), named
`builtin:NAME` or `module:function`. A simulated labeller turns the two scores of a comparison into a vote:
both_bad when both fall below a floor, tie when they differ by less than a margin, otherwise a Bradley-Terry draw,
P(a) = sigmoid((score_a - score_b) / temperature) (temperature 0: always the better one); then, with probability
`noise`, the vote is replaced by a uniformly random choice. Each labeller is a user named `sim/<judge>/<i>`.
"""
import importlib
import math
import random
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from rlhf.errors import UserError
from rlhf.schema import VOTE_CHOICES
from rlhf.store import DuplicateVote, Store

Judge = Callable[[list[str], list[str]], list[float]]
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
STOPWORDS = frozenset("the a an and or of to in on for with is are was were be this that it as at by from what "
                      "how why which who your you can please write give make list explain about into".split())


def readability(prompts: list[str], responses: list[str]) -> list[float]:
    """Flesch reading ease (higher reads more easily), syllables counted by pyphen's hyphenation (offline)."""
    import pyphen

    dictionary = pyphen.Pyphen(lang="en_US")

    def flesch(text: str) -> float:
        words = WORD.findall(text)
        if not words:
            return 0.0
        sentences = max(1, len(SENTENCE_END.findall(text)))
        syllables = sum(len(dictionary.positions(word)) + 1 for word in words)
        return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)

    return [flesch(response) for response in responses]


def length(prompts: list[str], responses: list[str], target_words: int = 60) -> list[float]:
    """1 at the target word count, falling linearly to 0 at twice (or none of) it."""
    return [max(0.0, 1.0 - abs(len(WORD.findall(r)) - target_words) / target_words) for r in responses]


def keywords(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the prompt's content words (longer than three letters, not stop words) the response uses."""
    scores = []
    for prompt, response in zip(prompts, responses):
        wanted = {w.lower() for w in WORD.findall(prompt) if len(w) > 3 and w.lower() not in STOPWORDS}
        used = {w.lower() for w in WORD.findall(response)}
        scores.append(len(wanted & used) / len(wanted) if wanted else 0.0)
    return scores


BUILTIN_JUDGES = {"readability": readability, "length": length, "keywords": keywords}


def load_judge(spec: str) -> Judge:
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_JUDGES:
            raise UserError(f"judge '{spec}': no such built-in; built-ins: {', '.join(BUILTIN_JUDGES)}")
        return BUILTIN_JUDGES[name]
    module, _, function = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"judge '{spec}': cannot load ({err}); use builtin:NAME or module:function") from None


@dataclass(frozen=True)
class LabellerModel:
    temperature: float = 1.0  # of the Bradley-Terry draw, in score units; 0 picks the better response
    tie_margin: float = 0.0  # score differences below this are ties
    both_bad_floor: float | None = None  # both scores below this: both_bad
    noise: float = 0.0  # probability of replacing the vote by a uniformly random choice


def decide(score_a: float, score_b: float, model: LabellerModel, rng: random.Random) -> tuple[str, str]:
    """(choice, strength) for one comparison."""
    gap = score_a - score_b
    if model.both_bad_floor is not None and max(score_a, score_b) < model.both_bad_floor:
        choice = "both_bad"
    elif abs(gap) < model.tie_margin or gap == 0:
        choice = "tie"
    elif model.temperature == 0:
        choice = "a" if gap > 0 else "b"
    else:
        choice = "a" if rng.random() < 1 / (1 + math.exp(-gap / model.temperature)) else "b"
    if rng.random() < model.noise:
        choice = rng.choice(VOTE_CHOICES)
    strength = "clear" if abs(gap) >= 2 * max(model.tie_margin, model.temperature, 1e-9) else "slight"
    return choice, strength


def simulate(store: Store, judge_spec: str, labellers: int, model: LabellerModel, batch: str | None = None,
             seed: int = 0) -> dict:
    """Every simulated labeller votes once on every comparison of `batch` it has not voted on yet."""
    judge = load_judge(judge_spec)
    comparisons = store.comparisons(batch)
    prompts = [c["prompt"][-1]["content"] for c in comparisons]
    scores_a, scores_b = judge(prompts, [c["a"] for c in comparisons]), judge(prompts, [c["b"] for c in comparisons])
    name = judge_spec.removeprefix("builtin:")
    counts = {choice: 0 for choice in VOTE_CHOICES} | {"skipped": 0}
    for i in range(labellers):
        user = store.user(f"sim/{name}/{i}") or store.add_user(f"sim/{name}/{i}", "labeller", secrets.token_hex(16))
        rng = random.Random(f"{seed}:{name}:{i}")
        for comparison, a, b in zip(comparisons, scores_a, scores_b):
            choice, strength = decide(a, b, model, rng)
            try:
                store.cast_vote(comparison["id"], user, choice, strength)
                counts[choice] += 1
            except DuplicateVote:
                counts["skipped"] += 1
    return counts
