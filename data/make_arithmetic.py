"""Writes data/arithmetic_train.jsonl and data/arithmetic_eval.jsonl: short arithmetic and word problems, each with
its answer, for training on a verifiable reward (`--ppo.reward_function builtin:final_number`).

    python data/make_arithmetic.py

Every problem comes from one of our templates below with small numbers drawn from a seeded generator, so the files
are the same on every run (a test checks the committed files against this script). One or two steps each, whole
numbers only: the bundled 135M model gets some of them right, so a policy has something to raise. The first 320
items are for training, the last 80 are held out; a template's items are spread over both, and no held-out item is
a training problem under other names or with its numbers in another order.
"""
import json
import random
import re
from pathlib import Path

SEED, TRAIN, HELD_OUT = 7, 320, 80
NAMES = ("Maya", "Tom", "Aisha", "Leo", "Priya", "Sam", "Lena", "Omar", "Jun", "Rosa", "Ben", "Ines")
THINGS = ("apples", "stickers", "marbles", "books", "pencils", "stamps", "shells", "cards")


def plain_sum(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is {a} + {b}?", a + b


def plain_difference(rng):
    a, b = rng.randint(20, 99), rng.randint(1, 19)
    return f"What is {a} - {b}?", a - b


def plain_product(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", a * b


def two_steps(rng):
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    return f"Compute {a} * {b} + {c}.", a * b + c


def gets_more(rng):
    name, thing, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(3, 40), rng.randint(2, 30)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b


def gives_away(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    return f"{name} had {a} {thing} and gave {b} of them to a friend. How many {thing} are left?", a - b


def cost(rng):
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    return f"A notebook costs {price} dollars. How many dollars do {count} notebooks cost?", price * count


def equal_groups(rng):
    groups, size = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{groups * size} students are split into {groups} equal teams. How many students are in each team?",
            size)


def distance(rng):
    speed, hours = rng.randint(3, 20) * 5, rng.randint(2, 6)
    return f"A train travels {speed} km each hour. How many km does it travel in {hours} hours?", speed * hours


def area(rng):
    width, length = rng.randint(2, 15), rng.randint(2, 15)
    return f"A rectangle is {width} cm wide and {length} cm long. What is its area in square cm?", width * length


def pages(rng):
    name, per_day, days = rng.choice(NAMES), rng.randint(5, 30), rng.randint(2, 7)
    return f"{name} reads {per_day} pages a day. How many pages does {name} read in {days} days?", per_day * days


def change(rng):
    price = rng.randint(1, 19)
    paid = rng.choice([p for p in (5, 10, 20, 50) if p > price])
    return f"A sandwich costs {price} dollars and you pay with a {paid} dollar note. How much change do you get?", \
        paid - price


def percent(rng):
    share, whole = rng.choice((10, 20, 25, 50)), rng.randint(1, 20) * 20
    return f"What is {share}% of {whole}?", share * whole // 100


def weeks(rng):
    count = rng.randint(2, 40)
    return f"How many days are there in {count} weeks?", count * 7


TEMPLATES = (plain_sum, plain_difference, plain_product, two_steps, gets_more, gives_away, cost, equal_groups,
             distance, area, pages, change, percent, weeks)


def problems() -> list[dict]:
    """TRAIN + HELD_OUT distinct problems, the templates taken in turn, in a seeded shuffled order."""
    rng, seen, items = random.Random(SEED), set(), []
    for _ in range(100 * (TRAIN + HELD_OUT)):  # a template with too few distinct problems cannot loop for ever
        if len(items) == TRAIN + HELD_OUT:
            break
        template = TEMPLATES[len(items) % len(TEMPLATES)]
        question, answer = template(rng)
        if question in seen:
            continue
        seen.add(question)
        items.append({"category": template.__name__, "prompt": question,
                      "answer": str(answer)})
    if len(items) < TRAIN + HELD_OUT:
        raise RuntimeError(f"only {len(items)} distinct problems: widen the templates' number ranges")
    rng.shuffle(items)
    items = items[:TRAIN] + unseen(items[TRAIN:], {problem_key(item) for item in items[:TRAIN]})
    return [{"id": f"arith-{i + 1:04d}", **item} for i, item in enumerate(items)]


def problem_key(item: dict) -> tuple:
    """What makes two problems one: the template and its numbers, whoever reads or whatever is counted, in any
    order ("Omar reads 7 pages a day ... in 3 days" is "Jun reads 7 pages a day ... in 3 days")."""
    return item["category"], tuple(sorted(int(number) for number in re.findall(r"\d+", item["prompt"])))


def unseen(held_out: list[dict], trained: set) -> list[dict]:
    """The held-out items, each one that is a trained problem under other names (or repeats an earlier held-out
    one) drawn again from its template with a generator of its own, until it is new; the others as they were."""
    rng, taken, kept = random.Random(SEED + 1), set(trained), []
    by_name = {template.__name__: template for template in TEMPLATES}
    for item in held_out:
        while problem_key(item) in taken:
            question, answer = by_name[item["category"]](rng)
            item = {"category": item["category"], "prompt": question, "answer": str(answer)}
        taken.add(problem_key(item))
        kept.append(item)
    return kept


def write(folder: Path) -> None:
    items = problems()
    for name, rows in (("arithmetic_train.jsonl", items[:TRAIN]), ("arithmetic_eval.jsonl", items[TRAIN:])):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write(Path(__file__).resolve().parent)
