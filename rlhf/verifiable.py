"""Verifiable rewards: an answer checked against its prompt's reference, 1.0 when right and 0.0 when not.

A reward function (or judge) that takes a third argument named `references` is given each prompt row's `answer`
field (`data/arithmetic_train.jsonl` and `data/arithmetic_eval.jsonl` carry one): `builtin:final_number` here, or
your own `module:function(prompts, responses, references)`. The others take `(prompts, responses)` as before.
"""
import inspect
import math
import re

from rlhf.datasets import line_of
from rlhf.errors import DataError, UserError

# a number as people write it: a sign (ASCII or the Unicode minus), digits with optional thousands commas, an
# optional decimal part; a fraction a/b is read as one number
NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:\s*/\s*(\d+))?(?![\d])")
# where an answer says "this is the result": the number after the last of these is the answer; a bare "=" counts
# only where there is none of them (a check after "the answer is 26", "26 + 16 = 42", does not override it). Whole
# words: not "the answer isn't 25", not "subtotal: 3"
STATED = re.compile(r"\banswer\s*(?:is(?![\w'\u2019])|:|=)|\bresult\s*(?:is(?![\w'\u2019])|:)"
                    r"|\btotal\s*(?:is(?![\w'\u2019])|:)|####|\\boxed\{", re.IGNORECASE)
EQUALS = re.compile(r"=")
ARITHMETIC = re.compile(r"[\d\s.,+\-*/×÷x()$%^=\u2212]*")
UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
         "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
        "ninety": 90}
NUMBER_WORD = re.compile(r"\b(" + "|".join(TENS) + r")(?:[-\s](" + "|".join(list(UNITS)[1:10]) + r"))?\b|\b("
                         + "|".join(UNITS) + r")\b", re.IGNORECASE)


SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def digit_numbers(text: str) -> list[tuple[int, float]]:
    """(position, value) of every number in `text` written in digits, in order."""
    found = []
    for match in NUMBER.finditer(text):
        sign, whole, decimals, denominator = match.groups()
        value = float(whole.replace(",", "") + (f".{decimals}" if decimals else ""))
        if denominator and int(denominator):
            value /= int(denominator)
        found.append((match.start(), -value if sign else value))
    return found


def word_numbers(text: str) -> list[tuple[int, float]]:
    """(position, value) of every number in words up to ninety-nine, in order."""
    found = []
    for match in NUMBER_WORD.finditer(text):
        tens, unit, alone = (group.lower() if group else None for group in match.groups())
        found.append((match.start(), float(UNITS[alone] if alone else TENS[tens] + (UNITS[unit] if unit else 0))))
    return found


def final_number_of(text: str) -> float | None:
    """The number an answer gives as its result: the first after its last stated marker ("the answer is",
    "####", "\\boxed{", ...), or after the "=" that ends a sum stated there ("the answer is 26 + 16 = 42"); else
    the first after its last "="; else its last number; None when it has none. In digits first: a number in words
    ("one" is too common a word to outrank a digit) only where the marker's sentence has no digits ("3 + 9 =
    twelve"), or the answer none at all. "$1,250.00", "-7", "3/4", "25%" and "forty-two" all read as numbers."""
    digits, words = digit_numbers(text), word_numbers(text)
    if not digits and not words:
        return None
    for markers in (STATED, EQUALS):
        found = list(markers.finditer(text))
        if not found:
            continue
        start = found[-1].end()
        sentence_end = next((end.start() for end in SENTENCE_END.finditer(text, start)), len(text))
        # an "=" that ends the stated answer's own sum ("the answer is 26 + 16 = 42"), not one in a reason given
        # after it ("the answer is 7, because 2 * 3 = 6 plus 1")
        start = max([start] + [equals.end() for equals in EQUALS.finditer(text, start, sentence_end)
                               if ARITHMETIC.fullmatch(text, start, equals.start())])
        for end in (sentence_end, len(text)):
            for numbers in (digits, words):
                after = [value for position, value in numbers if start <= position < end]
                if after:
                    return after[0]
    return (digits or words)[-1][1]


def same_number(found: float | None, reference: str) -> bool:
    expected = final_number_of(reference)
    if found is None or expected is None:
        return False
    return abs(found - expected) <= 1e-6 * max(1.0, abs(expected))


def final_number(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """1.0 where the response's final number equals the reference's, else 0.0."""
    return [float(same_number(final_number_of(response), reference))
            for response, reference in zip(responses, references)]


def wants_references(function) -> bool:
    """Whether a judge or reward function checks answers against references (it has a `references` parameter)."""
    try:
        return "references" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def check_references(rows: list[dict], source, spec: str) -> list[str] | None:
    """The rows' reference answers when `spec`'s function wants them (None when it does not), every row having one;
    else a DataError naming the file, the row and the field, before anything is written."""
    from rlhf.judges import load_judge

    judge = load_judge(spec) if spec else None
    if judge is None or not wants_references(judge):
        return None
    for row in rows:
        if row.get("answer") is None:
            raise DataError(source, line_of(source, row["id"], "prompt"), "answer",
                            f"row '{row['id']}' has no reference answer, and {spec} checks each answer against its "
                            "prompt's")
        if judge is final_number and final_number_of(row["answer"]) is None:  # every answer would score 0
            raise DataError(source, line_of(source, row["id"], "prompt"), "answer",
                            f"row '{row['id']}': the reference answer '{row['answer'][:40]}' holds no number, and "
                            f"{spec} compares the final numbers")
    return [row["answer"] for row in rows]


def judge_scores(judge, prompts: list[str], responses: list[str], references: list[str] | None = None) -> list[float]:
    """The judge's scores, given the references when it checks against them. A judge that fails (the user's code)
    is told in a line, not a traceback."""
    wanted = wants_references(judge)
    if wanted and references is None:
        raise UserError("this judge checks answers against reference answers, and none were given here")
    try:
        scores = judge(prompts, responses, references) if wanted else judge(prompts, responses)
    except Exception as err:
        answers = "a made-up answer" if responses == [PROBE_ANSWER] else f"{len(responses)} answers"
        raise UserError(f"judge {judge_name(judge)} failed on {answers} ({type(err).__name__}: {err}); a judge is a "
                        "function of (prompts, answers) returning one number per answer") from None
    return checked_scores(judge, scores, len(responses))


PROBE_ANSWER = "A short made-up answer: 42."


def probe_judge(judge, prompt: str, reference: str | None = None) -> None:
    """Scores one made-up answer, so that a judge that fails on it, or returns no list of finite numbers, stops a
    stage before it writes anything rather than after its answers are generated."""
    judge_scores(judge, [prompt], [PROBE_ANSWER], None if reference is None else [reference])


def checked_scores(judge, scores, answers: int) -> list[float]:
    """A judge's scores as floats, one finite number per answer; else an error naming the judge (a short list
    would pair scores with the wrong answers, a NaN would lose every comparison)."""
    try:
        if isinstance(scores, (str, bytes)):
            raise TypeError("text")
        scores = list(scores)
        if any(isinstance(score, (str, bytes, bool)) for score in scores):
            raise TypeError("text or true/false among them")  # float("0.5") and float(True) read them as numbers
        values = [float(score) for score in scores]
    except (TypeError, ValueError) as err:
        raise UserError(f"judge {judge_name(judge)} returned {type(scores).__name__}, not a list of numbers "
                        f"({err})") from None
    if len(values) != answers:
        raise UserError(f"judge {judge_name(judge)} returned {len(values)} scores for {answers} answers")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise UserError(f"judge {judge_name(judge)} scored answer {i + 1} of {answers} {value}: scores must be "
                            "finite numbers")
    return values


def judge_name(judge) -> str:
    """As the user named it: builtin:NAME or module:function."""
    from rlhf.judges import BUILTIN_JUDGES

    builtin = [name for name, function in BUILTIN_JUDGES.items() if function is judge]
    return (f"builtin:{builtin[0]}" if builtin else
            f"{getattr(judge, '__module__', '?')}:{getattr(judge, '__qualname__', type(judge).__name__)}")
