"""Data contracts: the canonical rows every stage reads and writes, and the checks that guard them.

Canonical rows are plain dicts in TRL's conversational form, so they go into a `datasets.Dataset` and a TRL
trainer as they are:

- SFT example:      {"id", "category", "messages": [{"role", "content"}, ..., assistant]}
- prompt:           {"id", "category", "prompt": [{"role", "content"}, ..., user]}
- preference pair:  {"id", "prompt": [...], "chosen": [assistant], "rejected": [assistant],
                     "tie": bool, "both_bad": bool, "margin": float | None, "labeller": str | None,
                     "labeller_votes": [{"labeller", "verdict": chosen|rejected|tie|both_bad,
                                         "strength": slight|clear, null for tie and both_bad and
                                                     for a verdict read from a ranking}],
                     and for the pairs of a k-wise ranking: "ranking": str | None, "pair_weight": float}
- gold comparison:  {"id", "category", "prompt": [...], "a": str, "b": str, "expected": one of VOTE_CHOICES}

The functions here turn one raw row (in any of the accepted layouts) into its canonical form, or raise
`RowProblem(field, problem)`; `rlhf.datasets` adds the file and line.
"""
import hashlib
import json
import math
from decimal import Decimal

ROLES = ("system", "user", "assistant")
DEFAULT_CATEGORY = "general"

# The label vocabulary, defined once: the store, the labelling UI and the export all use these.
VOTE_CHOICES = ("a", "b", "tie", "both_bad")
VOTE_STRENGTHS = ("slight", "clear")  # how much better: votes for a or b only
PREFERENCE_CHOICES = ("a", "b")
# A vote in a preference pair's own terms (the export turns a/b into chosen/rejected).
PAIR_VERDICTS = ("chosen", "rejected", "tie", "both_bad")


class RowProblem(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def content_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_messages(value, field: str = "messages", last_role: str | None = None) -> list[dict]:
    """A non-empty conversation: an optional system turn, then user and assistant turns alternating."""
    messages = check_message_list(value, field)
    check_role_order(messages, field)
    if last_role and messages[-1]["role"] != last_role:
        raise RowProblem(f"{field}[{len(messages) - 1}].role",
                         f"the last message must be from the {last_role}, got {messages[-1]['role']}")
    return messages


def check_message_list(value, field: str) -> list[dict]:
    """Each message well formed; the order of roles is not checked here."""
    if not isinstance(value, list):
        raise RowProblem(field, f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise RowProblem(field, "is empty")
    return [check_message(message, f"{field}[{i}]") for i, message in enumerate(value)]


def check_message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise RowProblem(where, f"expected an object with 'role' and 'content', got {type_name(message)}")
    for key in ("role", "content"):
        if key not in message:
            raise RowProblem(f"{where}.{key}", "missing")
        if not isinstance(message[key], str):
            raise RowProblem(f"{where}.{key}", f"expected a string, got {type_name(message[key])}")
    if message["role"] not in ROLES:
        raise RowProblem(f"{where}.role", f"'{message['role']}' is not one of {', '.join(ROLES)}")
    if not message["content"].strip():
        raise RowProblem(f"{where}.content", "is empty")
    check_unicode(message["content"], f"{where}.content")
    return {"role": message["role"], "content": message["content"]}


def check_role_order(messages: list[dict], field: str) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowProblem(f"{field}[{i}].role",
                             f"roles out of order: expected {expected}, got {message['role']} "
                             "(an optional system message, then user and assistant alternating)")


def check_text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {type_name(value)}")
    if not value.strip():
        raise RowProblem(field, "is empty")
    check_unicode(value, field)
    return value


def check_unicode(text: str, field: str) -> None:
    """JSON readers accept an escaped lone surrogate ("\\ud800"), which no UTF-8 text can hold, and a NUL
    ("\\u0000"), which PostgreSQL's text columns refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowProblem(field, f"holds a lone surrogate at character {err.start + 1}: not Unicode text") from None
    if "\x00" in text:
        raise RowProblem(field, f"holds a NUL character (\\u0000) at character {text.index(chr(0)) + 1}: not text a "
                                "label store can keep")


def as_turns(value, field: str, role: str) -> list[dict]:
    """A plain string becomes one message of `role`; a list is checked message by message. Role order is checked
    once prompt and completion are joined: a completion such as [{"role": "assistant", ...}] starts mid-way."""
    if isinstance(value, str):
        return [{"role": role, "content": check_text(value, field)}]
    if isinstance(value, list):
        return check_message_list(value, field)
    raise RowProblem(field, f"expected a string or a list of messages, got {type_name(value)}")


def row_identity(row: dict, content) -> tuple[str, str]:
    row_id = row.get("id")
    if row_id is None or row_id == "":
        row_id = content_hash(content)[:12]
    elif not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise RowProblem("id", f"expected a string or an integer, got {type_name(row_id)}")
    category = row.get("category") or DEFAULT_CATEGORY
    if not isinstance(category, str):
        raise RowProblem("category", f"expected a string, got {type_name(category)}")
    check_unicode(str(row_id), "id")
    check_unicode(category, "category")
    return str(row_id), category


def absent(row: dict, key: str, expected: str = "") -> RowProblem:
    """A required column that is missing, or present and null."""
    if key in row:
        return RowProblem(key, "is null" + (f" ({expected})" if expected else ""))
    found = ", ".join(sorted(row)) or "none"
    return RowProblem(key, f"missing (found columns: {found}" + (f"; {expected})" if expected else ")"))


def sft_example(row: dict) -> dict:
    """Accepts TRL's conversational `messages`, or `prompt` + `completion` (plain strings or messages)."""
    if "messages" in row and row["messages"] is not None:
        messages = check_messages(row["messages"], "messages", last_role="assistant")
    elif "prompt" in row and "completion" in row:
        joined = as_turns(row["prompt"], "prompt", "user") + as_turns(row["completion"], "completion", "assistant")
        messages = check_messages(joined, "prompt+completion", last_role="assistant")
    elif "text" in row:
        raise RowProblem("text", "plain 'text' rows have no assistant turn to train on; "
                                 "give 'messages' or 'prompt' and 'completion'")
    else:
        raise absent(row, "messages", "expected 'messages' or 'prompt' and 'completion'")
    row_id, category = row_identity(row, messages)
    return {"id": row_id, "category": category, "messages": messages}


def prompt_row(row: dict) -> dict:
    """Accepts `prompt` as a string or as messages ending with the user, or `messages` ending with the user."""
    if "prompt" in row and row["prompt"] is not None:
        prompt = check_messages(as_turns(row["prompt"], "prompt", "user"), "prompt", last_role="user")
    elif "messages" in row and row["messages"] is not None:
        prompt = check_messages(row["messages"], "messages", last_role="user")
    else:
        raise absent(row, "prompt")
    row_id, category = row_identity(row, prompt)
    canonical = {"id": row_id, "category": category, "prompt": prompt}
    if row.get("answer") is not None:  # a reference answer, for verifiable rewards (rlhf/verifiable.py)
        canonical["answer"] = reference_answer(row["answer"])
    return canonical


def reference_answer(value) -> str:
    if (isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == ""
            or isinstance(value, float) and not math.isfinite(value)):
        raise RowProblem("answer", f"expected a non-empty string or a finite number, got {value!r}")
    check_unicode(str(value), "answer")
    # a number in plain digits: the answer checker reads "1e-05" as the number 5
    return format(Decimal(repr(value)), "f") if isinstance(value, float) else str(value)


def preference_pair(row: dict) -> dict:
    """Accepts TRL's preference layouts: explicit prompt (standard strings or conversational) or implicit prompt
    (`chosen` and `rejected` as whole conversations sharing their opening turns)."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise absent(row, key)
    if row.get("prompt") is not None:
        prompt = check_messages(as_turns(row["prompt"], "prompt", "user"), "prompt", last_role="user")
        chosen = as_turns(row["chosen"], "chosen", "assistant")
        rejected = as_turns(row["rejected"], "rejected", "assistant")
    else:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        check_messages(prompt + completion, f"prompt+{key}", last_role="assistant")
    if chosen == rejected:
        raise RowProblem("rejected", "is the same answer as 'chosen': a pair needs two different answers")
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "tie": optional_bool(row, "tie"), "both_bad": optional_bool(row, "both_bad"),
            "margin": optional_number(row, "margin"), "labeller": optional_text(row, "labeller"),
            "labeller_votes": labeller_votes(row.get("labeller_votes"))}
    if pair["tie"] and pair["both_bad"]:
        raise RowProblem("both_bad", "a pair is a tie or both bad, not both: 'tie' is true as well")
    if row.get("ranking") is not None or row.get("pair_weight") is not None:  # one pair of a k-wise ranking
        pair["ranking"], pair["pair_weight"] = optional_text(row, "ranking"), pair_weight(row)
    # without an id, a pair is named by its texts and its labeller: one row per vote is how some sets come
    pair["id"], _ = row_identity(row, [prompt, chosen, rejected] + ([pair["labeller"]] if pair["labeller"] else []))
    return pair


def pair_weight(row: dict) -> float:
    """A ranking's pairs share one observation's weight: 1 / its number of pairs, in (0, 1] (1 when not given)."""
    weight = optional_number(row, "pair_weight")
    if weight is not None and not 0 < weight <= 1:
        raise RowProblem("pair_weight", f"expected a number in (0, 1], got {weight}")
    return 1.0 if weight is None else weight


def labeller_votes(value) -> list[dict]:
    """The individual votes behind an aggregated pair (optional; a label export writes them)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowProblem("labeller_votes", f"expected a list, got {type_name(value)}")
    votes = []
    for i, vote in enumerate(value):
        where = f"labeller_votes[{i}]"
        if not isinstance(vote, dict) or not isinstance(vote.get("labeller"), str):
            raise RowProblem(where, "expected an object with a 'labeller' name")
        check_unicode(vote["labeller"], f"{where}.labeller")
        if vote.get("verdict") not in PAIR_VERDICTS:
            raise RowProblem(f"{where}.verdict", f"expected one of {', '.join(PAIR_VERDICTS)}, "
                                                 f"got {vote.get('verdict')!r}")
        preference = vote["verdict"] in ("chosen", "rejected")  # a tie or both_bad has no strength
        # a verdict read from a ranking has none either (null); one without the key is read as clear
        if preference and vote.get("strength", "clear") not in (*VOTE_STRENGTHS, None):
            raise RowProblem(f"{where}.strength", f"expected one of {', '.join(VOTE_STRENGTHS)}, or null")
        votes.append({"labeller": vote["labeller"], "verdict": vote["verdict"],
                      "strength": vote.get("strength", "clear") if preference else None})
    return votes


def split_implicit_prompt(chosen, rejected) -> tuple[list, list, list]:
    chosen = check_messages(chosen, "chosen", last_role="assistant")
    rejected = check_messages(rejected, "rejected", last_role="assistant")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or chosen[shared - 1]["role"] != "user":
        raise RowProblem("prompt", "missing, and 'chosen' and 'rejected' do not share opening turns ending "
                                   "with the user")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def optional_bool(row: dict, key: str) -> bool:
    value = row.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RowProblem(key, f"expected true or false, got {type_name(value)}")
    return value


def optional_number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(key, f"expected a number, got {type_name(value)}")
    if not math.isfinite(value):  # JSON readers take NaN and Infinity: one would poison a loss
        raise RowProblem(key, f"expected a finite number, got {value}")
    return float(value)


def optional_text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowProblem(key, f"expected a string, got {type_name(value)}")
    check_unicode(value, key)
    return value


def gold_comparison(row: dict) -> dict:
    """A comparison with a known answer, mixed into labellers' queues to measure their accuracy."""
    prompt = prompt_row(row)
    for key in ("a", "b", "expected"):
        if row.get(key) is None:
            raise absent(row, key)
    a, b = (check_text(row[key], key) for key in ("a", "b"))
    if a == b:
        raise RowProblem("b", "is the same text as 'a'")
    if row.get("expected") not in VOTE_CHOICES:
        raise RowProblem("expected", f"expected one of {', '.join(VOTE_CHOICES)}, got {row.get('expected')!r}")
    row_id, category = row_identity(row, [prompt["prompt"], a, b])
    return {"id": row_id, "category": category, "prompt": prompt["prompt"], "a": a, "b": b,
            "expected": row["expected"]}


ROW_KINDS = {"sft": sft_example, "prompt": prompt_row, "preference": preference_pair, "gold": gold_comparison}
