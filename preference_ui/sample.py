"""`rlhf label sample`: k sampled responses per prompt, stored with their comparisons in a named batch.

Every pair of a prompt's responses is a candidate comparison, its a/b order drawn at random so that position says
nothing about sampling order. With `feedback: ranking` a prompt's different answers are instead one ranking item,
in a random order. With `select: uncertain` only the candidates a reward model is least sure about are
queued (active learning): for an ensemble, the largest spread of the reward gap across its heads; for one head,
the smallest gap. A batch name is used once: sampling into an existing batch is refused.
"""
import itertools
import random
from pathlib import Path

import torch

from rlhf import hardware, models
from rlhf.config import RunConfig
from rlhf.datasets import first_rows, load_rows
from rlhf.errors import MissingInputError, UserError
from rlhf.generation import generate_responses
from rlhf.reward_model import load_reward_model, reward_tokenizer, score_heads
from rlhf.stage import check_language_model, published_model
from rlhf.store import Store, check_batch_name, check_prompt_widths, shown_url
from preference_ui.config import PreferencesStageConfig


def model_spec(config: PreferencesStageConfig, run: RunConfig) -> str:
    if config.model:
        check_language_model(config.model, "preferences.model")
        return config.model
    sft = run.directory().stage_path("sft")
    if not (sft / "config.json").exists():
        raise MissingInputError(f"no SFT model at {sft}: run `rlhf sft --config ... --run.name {run.name}` first, "
                                "or set --preferences.model")
    return str(sft)


def main(config: PreferencesStageConfig, run: RunConfig, prompts: list[dict] | None = None,
         keys: dict | None = None) -> dict:
    """`prompts`: the rows of `config.prompts` when the caller has read them already. `keys`: what the batch is
    made under (the model, prompts and settings the answers are drawn from; the machine labellers that vote on it),
    stored with each answer: the preferences stage checks them when a rerun finds its batch."""
    prompts = load_rows(config.prompts, "prompt") if prompts is None else prompts
    prompts = first_rows(prompts, config.num_prompts, config.prompts, "preferences.num_prompts")
    check_prompt_widths([row["id"] for row in prompts], [row["category"] for row in prompts], config.prompts)
    spec, batch = model_spec(config, run), config.batch or run.name
    check_batch_name(batch)
    scorer = (published_model(run.directory(), "reward", "reward model", config.reward_model,
                              "--reward-model DIR") if config.select == "uncertain" else None)
    store = Store(config.db or None)
    if store.created:
        print(f"[label sample] created the label store {shown_url(store.url)}")
    if store.comparisons(batch):
        raise UserError(f"batch '{batch}' already has comparisons in the store; choose another --preferences.batch")
    store.check_prompt_ids({row["id"]: row["prompt"] for row in prompts}, config.prompts)
    answers = sample_answers(config, store, prompts, spec, keys)
    rng = random.Random(config.seed)
    if config.feedback == "ranking":
        items = ranking_items(answers, rng)
        store.add_ranking_items(items, batch=batch)
        candidates, chosen = items, items
    else:
        candidates = pair_candidates(answers, rng)
        chosen = select_uncertain(candidates, scorer, config.select_count, config.hardware.device) if scorer \
            else candidates
        store.add_comparisons([(a, b) for a, b, _ in chosen], batch=batch)
    summary = {"batch": batch, "prompts": len(prompts), "responses": len(prompts) * config.responses_per_prompt,
               "candidates": len(candidates), "comparisons": len(chosen), "select": config.select,
               "feedback": config.feedback, "model": spec, "store": str(store.engine.url)}
    made = (f"{len(chosen)} ranking items" if config.feedback == "ranking" else
            f"{len(chosen)} comparisons ({config.select} of {len(candidates)} candidates)")
    print(f"[label sample] {made} from {summary['prompts']} prompts in batch '{batch}' ({Path(spec).name})")
    return summary


def pair_candidates(answers: list[tuple], rng: random.Random) -> list[tuple]:
    """Every pair of different answers to a prompt as (a, b, prompt messages), a and b in a random order. An empty
    answer (the model ended at once) is compared with nothing: no preference row can hold it."""
    candidates = []
    for responses, prompt in answers:
        for first, second in itertools.combinations(responses, 2):
            if first.text == second.text or not (first.text.strip() and second.text.strip()):
                continue  # the same answer sampled twice, or an empty one: nothing to compare
            a, b = (first, second) if rng.random() < 0.5 else (second, first)
            candidates.append((a, b, prompt))
    return candidates


def ranking_items(answers: list[tuple], rng: random.Random) -> list[list]:
    """Each prompt's different answers (the first of any sampled twice; empty ones left out), in a random order; a
    prompt with fewer than two different answers has nothing to rank."""
    items = []
    for responses, _ in answers:
        different, texts = [], set()
        for response in responses:
            if response.text not in texts and response.text.strip():
                texts.add(response.text)
                different.append(response)
        if len(different) >= 2:
            rng.shuffle(different)
            items.append(different)
    return items


def sample_answers(config: PreferencesStageConfig, store: Store, prompts: list[dict], spec: str,
                   keys: dict | None = None) -> list[tuple]:
    """Stores k sampled responses per prompt; returns (the prompt's stored responses, its messages) per prompt."""
    # Sampling in the hardware's dtype: on a CPU with native bf16 it generates ~1.8 times faster than fp32
    # (docs/benchmarks.md, "Generation").
    model, tokenizer = models.load_causal_lm(spec, config.hardware.dtype)
    model.to(config.hardware.device)
    hardware.log_decision("label sample", config.hardware)
    torch.manual_seed(config.seed)
    sampling = {"temperature": config.temperature, "top_k": 0, "top_p": 1.0, "max_new_tokens": config.max_new_tokens,
                "seed": config.seed, **(keys or {})}
    k = config.responses_per_prompt
    texts = generate_responses(model, tokenizer, [p["prompt"] for p in prompts for _ in range(k)],
                               config.max_new_tokens, config.batch_size, do_sample=True,
                               temperature=config.temperature, progress=f"sampling {k} responses per prompt")
    answers = []
    for i, row in enumerate(prompts):
        stored_prompt = store.add_prompt(row["id"], row["category"], row["prompt"])
        responses = [store.add_response(stored_prompt, text, spec, sampling) for text in texts[i * k:(i + 1) * k]]
        answers.append((responses, row["prompt"]))
    return answers


def select_uncertain(candidates: list[tuple], reward_model: str, count: int, device: str = "cpu") -> list[tuple]:
    """The `count` candidates (default half) the reward model is least sure about, in their original order."""
    tokenizer = reward_tokenizer(reward_model)
    model = load_reward_model(reward_model, tokenizer).to(device).eval()  # fp32 scores, on the GPU when there
    conversations = {response.id: prompt + [{"role": "assistant", "content": response.text}]
                     for a, b, prompt in candidates for response in (a, b)}
    rewards = dict(zip(conversations, score_heads(model, tokenizer, list(conversations.values()))))
    uncertainty = [pair_uncertainty(rewards[a.id] - rewards[b.id]) for a, b, _ in candidates]
    keep = count or max(1, len(candidates) // 2)
    ranked = sorted(range(len(candidates)), key=lambda i: -uncertainty[i])[:keep]
    return [candidates[i] for i in sorted(ranked)]


def pair_uncertainty(gap_per_head: torch.Tensor) -> float:
    """How unsure the reward model is about a pair: the heads' spread of the gap, or with one head -|gap|."""
    if gap_per_head.numel() > 1:
        return gap_per_head.std().item()
    return -abs(gap_per_head.item())
