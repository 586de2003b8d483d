"""AI labellers (issue 19): a local chat model, given a written constitution (data/constitution.md), says which of
two answers follows it better, and votes through the same queue as people, as the user `ai/<model>` (`ai_account`).

The model is asked once with the answers in each order ("Answer A" first, then the same pair swapped) and reads
its next-token probabilities of the letters A and B, renormalised over the two: P(first better) in each order.
Averaging P(a better) over the two orders removes position bias exactly: the preference of (b, a) is one minus
that of (a, b), whatever the model's own leaning towards the first or the second letter. The vote is a or b
when that average is more than `tie_margin` from one half, else a tie; its strength is clear beyond twice the
margin from one half, else slight.

A ranking item is ordered the same way: every pair of its answers asked in both orders, each answer scored by its
summed P(better) against the others (a Borda count in probabilities), ranked by that score, with answers less than
`tie_margin` apart tied.
"""
import itertools
from pathlib import Path

import torch

from preference_ui.queue import BatchClosed, LabelQueue, unswap
from rlhf import models
from rlhf.errors import MissingInputError
from rlhf.hardware import detect_device
from rlhf.rankings import ranks_in_order
from rlhf.runs import hash_path
from rlhf.schema import VOTE_CHOICES
from rlhf.store import Store

DEFAULT_CONSTITUTION = "data/constitution.md"
QUESTION = ("Here is a question and two answers to it.\n\nQuestion:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n"
            "{second}\n\nWhich answer follows the principles better? Reply with the single letter A or B.")


def question_of(messages: list[dict]) -> str:
    """The prompt as the AI labeller is shown it: a lone user turn as it is; a conversation (a system turn, earlier
    exchanges) whole, turn by turn, as people see it in the app: its last turn alone would be another task."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{message['role']}]\n{message['content']}" for message in messages)


def comparison_messages(constitution: str, prompt: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": constitution},
            {"role": "user", "content": QUESTION.format(prompt=prompt, first=first, second=second)}]


@torch.no_grad()
def first_better(model, tokenizer, conversations: list[list[dict]]) -> list[float]:
    """For each conversation, P(A) / (P(A) + P(B)) of the model's next token after the assistant turn opens."""
    letters = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in ("A", "B")]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the next token's logits are then the last position's in every row
    try:
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        logits = model(**batch).logits[:, -1, letters].float()
    finally:
        tokenizer.padding_side = side
    return torch.softmax(logits, dim=-1)[:, 0].tolist()


def prefer_a(model, tokenizer, constitution: str, prompt: str, a: str, b: str) -> float:
    """P(a is better), averaged over the two orders of showing the answers."""
    a_first, b_first = first_better(model, tokenizer, [comparison_messages(constitution, prompt, a, b),
                                                       comparison_messages(constitution, prompt, b, a)])
    return (a_first + (1 - b_first)) / 2


def ai_vote(preference: float, tie_margin: float) -> tuple[str, str | None]:
    """(choice, strength) from P(a is better)."""
    lead = preference - 0.5
    if abs(lead) <= tie_margin:
        return "tie", None
    return ("a" if lead > 0 else "b"), ("clear" if abs(lead) > 2 * tie_margin else "slight")


def ai_ranking(model, tokenizer, constitution: str, prompt: str, answers: list[str], tie_margin: float) -> list[int]:
    """Ranks of the answers (1 the best): each scored by its mean P(better) against the others, both orders
    asked for every pair; an answer less than 2 x `tie_margin` below the one ranked just above is tied with it (as
    a pair vote ties within `tie_margin` of 0.5: its two answers' means are then 2 x tie_margin apart at most)."""
    wins = [0.0] * len(answers)
    for i, j in itertools.combinations(range(len(answers)), 2):
        preference = prefer_a(model, tokenizer, constitution, prompt, answers[i], answers[j])
        wins[i] += preference
        wins[j] += 1 - preference
    means = [total / (len(answers) - 1) for total in wins]
    return ranks_in_order(sorted(range(len(answers)), key=lambda i: -means[i]), means, 2 * tie_margin)


def check_ai_inputs(model_spec: str, constitution_path: str) -> None:
    """The constitution and the model are there: checked before anything is written."""
    if not Path(constitution_path).is_file():
        raise MissingInputError(f"no constitution at {constitution_path}: the AI labeller needs a text file of "
                                "principles (--constitution, preferences.ai_constitution)")
    models.resolve(model_spec)


def ai_model_input(model_spec: str) -> str | None:
    """The AI labeller's model folder, for the preferences stage to record (hashed by content) as an input: retrained
    weights then rerun the stage and key its votes anew. None for a bundled name or a hub id."""
    folder = Path(model_spec).expanduser()
    return str(folder) if folder.is_dir() else None


def ai_account(model_spec: str) -> str:
    """The AI labeller's user name: `ai/<bundled name or hub id>`, or for a model folder `ai/<folder name>-<the
    first 8 hex digits of its content hash>`: two folders named `sft` (two runs' SFT models) are two labellers, each
    with its own votes and queue places, and retrained weights vote as a new labeller."""
    folder = ai_model_input(model_spec)
    return f"ai/{model_spec}" if folder is None else f"ai/{Path(folder).resolve().name}-{hash_path(folder)[:8]}"


def ai_label(store: Store, model_spec: str, constitution_path: str = DEFAULT_CONSTITUTION, batch: str | None = None,
             tie_margin: float = 0.05, overlap: int = 1, gold_rate: float = 0.0, seed: int = 0) -> dict:
    """The AI labeller takes items from the queue until it has none left for it, and votes on (or ranks) each.
    Returns the count of each choice (as stored), and of rankings where there were any."""
    constitution = Path(constitution_path).read_text()
    user = store.machine_labeller(ai_account(model_spec))
    model, tokenizer = models.load_causal_lm(model_spec, device=detect_device())
    model.eval()
    queue = LabelQueue(store, overlap, gold_rate, batch, seed=seed, expires_others=False)
    counts = {choice: 0 for choice in VOTE_CHOICES}
    while (item := queue.next_item(user)) is not None:
        try:
            ai_answer(queue, user, item, model, tokenizer, constitution, tie_margin, counts)
        except BatchClosed:  # exported by another process meanwhile: its items are no longer served
            continue
    return counts


def ai_answer(queue: LabelQueue, user, item, model, tokenizer, constitution: str, tie_margin: float,
              counts: dict) -> None:
    """Ranks or votes on the item as the AI labeller reads it, counting the choice stored."""
    if item.answers:
        queue.rank(user, item.comparison_id, ai_ranking(model, tokenizer, constitution,
                                                        question_of(item.prompt), item.answers, tie_margin))
        counts["ranked"] = counts.get("ranked", 0) + 1
        return
    preference = prefer_a(model, tokenizer, constitution, question_of(item.prompt), item.left, item.right)
    choice, strength = ai_vote(preference, tie_margin)
    queue.vote(user, item.comparison_id, choice, strength)
    counts[unswap(choice, item.swapped)] += 1
