"""Automatic judges: any callable `(prompts: list[str], responses: list[str]) -> list[float]` (higher is
better), named `builtin:NAME` or `module:function`. Simulated labellers vote with them, PPO can train on one as a
programmatic reward, and evaluation scores policies with them."""
import functools
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Callable

from rlhf.errors import UserError
from rlhf.verifiable import final_number

Judge = Callable[[list[str], list[str]], list[float]]
# a word in any alphabet ("café", "Привет"), with its apostrophe, straight or curly ("don't", "don’t")
WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?")
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


@functools.cache
def afinn_lexicon():
    from afinn import Afinn

    return Afinn(language="en")


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """AFINN valence per ten words: the sum of the valences (-5 to +5) of the lexicon's words and phrases in the
    response, times 10 over its word count (at least 10, so a one-word reply is not scored as ten of them). A
    plain lexicon: no negation ("not good" counts as good), no sarcasm."""
    lexicon = afinn_lexicon()
    return [10 * lexicon.score(r.replace("\u2019", "'")) / max(len(WORD.findall(r)), 10) for r in responses]


# final_number checks each answer against its prompt's reference (rlhf/verifiable.py)
BUILTIN_JUDGES = {"readability": readability, "length": length, "keywords": keywords, "sentiment": sentiment,
                  "final_number": final_number}


def check_judge_settings(settings: dict[str, str]) -> None:
    """Each judge a stage is given ({setting: spec}, empty ones left out) loaded, a failure naming the setting:
    several settings take a judge, and the message alone did not say which one was wrong."""
    for setting, spec in settings.items():
        if spec:
            try:
                load_judge(spec)
            except UserError as error:
                raise UserError(f"{setting}: {error}") from None


def load_judge(spec: str) -> Judge:
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_JUDGES:
            raise UserError(f"judge '{spec}': no such built-in; built-ins: {', '.join(BUILTIN_JUDGES)}")
        return BUILTIN_JUDGES[name]
    module, _, function = spec.partition(":")
    try:
        judge = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"judge '{spec}': cannot load ({err}); use builtin:NAME or module:function") from None
    if not callable(judge):
        raise UserError(f"judge '{spec}': a {type(judge).__name__}, not a function of (prompts, answers)")
    return judge


def judge_sources(**specs: str) -> dict[str, str]:
    """{name: the file of its module} for the `module:function` judges among `specs` (empty and built-in ones
    left out): a stage records them as inputs, so that editing a judge's code reruns what it scored."""
    sources = {}
    for name, spec in specs.items():
        if not spec or spec.startswith("builtin:"):
            continue
        try:
            found = importlib.util.find_spec(spec.partition(":")[0])
        except (ImportError, ValueError):
            continue  # the stage's check names it
        if found is not None and found.origin and Path(found.origin).is_file():
            sources[name] = found.origin
    return sources
