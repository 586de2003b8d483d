"""`rlhf eval`: the run's policies (PPO, DPO, any folder) against its SFT model on held-out prompts.

    rlhf eval --config configs/default.yaml [--eval.policies ppo,dpo] [--eval.judge builtin:length] [--eval.human true]

Every policy, and the baseline, answers the same prompts (greedy by default). Each answer is scored by the reward
model (normalised by the scale its stage stored, as PPO trains on it) and by the judge; each policy gets its KL to
the baseline along its own answers, its answer length, repetition (distinct 4-grams) and stop-token rate, and its
win rate against the baseline under the reward model and under the judge, with bootstrap intervals over prompts. A
judge that checks answers against the prompts' reference answers (`builtin:final_number`) also gives each policy its
accuracy. Writes `runs/<name>/eval/` (results.json, answers.jsonl, plots) and the run's report,
`runs/<name>/report.md`.
"""
import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from evaluation.config import EvalStageConfig
from evaluation.metrics import answer_kl, bootstrap_interval, distinct_ngram_share, win_rate
from evaluation.report import write_report
from preference_ui.stats import stats
from rlhf import models
from rlhf.config import RunConfig
from rlhf.datasets import first_rows, load_rows
from rlhf.errors import ConfigError, MissingInputError, UserError
from rlhf.generation import answer_prompts
from rlhf.judges import check_judge_settings, judge_sources, load_judge
from rlhf.reward_model import load_reward_model, reward_record, reward_tokenizer, score
from rlhf.runs import RunDir, atomic_write_json, atomic_write_text, hash_config, input_hashes, run_report
from rlhf.store import NoStoreYet, Store, check_batch_name, check_prompt_widths, run_store_url
from rlhf.stage import (Inputs, Outcome, Stage, check_language_model, published_reward_model, run_stage, start_partial,
                        starting_model)
from rlhf.verifiable import check_references, judge_scores, probe_judge

STAGE = "eval"
POLICY_STAGES = ("ppo", "dpo")
BASELINE = "sft"
OTHER_INPUTS = (BASELINE, "reward_model", "prompts", "judge")  # the inputs beside the policies, by name


def policy_folders(config: EvalStageConfig, run_dir: RunDir) -> dict[str, str]:
    """{name: model folder} of the policies to compare with the baseline."""
    if not config.policies:
        found = {stage: str(run_dir.stage_path(stage)) for stage in POLICY_STAGES
                 if (run_dir.stage_path(stage) / "config.json").exists()}
        if not found:
            raise MissingInputError(f"no policy to evaluate in {run_dir.path}: run `rlhf ppo --config ...` or "
                                    "`rlhf dpo --config ...` first, or set --eval.policies NAME=FOLDER")
        return found
    found = {}
    for item in config.policies.split(","):
        name, _, folder = item.strip().partition("=")
        if name in found or name in OTHER_INPUTS:
            raise ConfigError(f"eval.policies: '{name}' " + ("is named twice" if name in found else
                                                             f"names another input ({', '.join(OTHER_INPUTS)})"))
        if not folder and name not in POLICY_STAGES:
            raise ConfigError(f"eval.policies: '{name}' is neither a policy stage ({', '.join(POLICY_STAGES)}) "
                              "nor NAME=FOLDER")
        folder = folder or str(run_dir.stage_path(name))
        if not (Path(folder) / "config.json").exists():
            made_by = f"run `rlhf {name} --config ...` first" if name in POLICY_STAGES else "check the path"
            raise MissingInputError(f"no model for policy '{name}' at {folder}: {made_by}")
        check_language_model(folder, f"eval.policies: '{name}'")
        found[name] = folder
    return found


def inputs(config: EvalStageConfig, run: RunConfig) -> dict:
    run_dir = run.directory()
    found = Inputs()
    found.add(BASELINE, lambda: starting_model(STAGE, config.baseline, run_dir, field="baseline"))
    if config.reward_model != "none":
        found.add("reward_model", lambda: published_reward_model(run_dir, config.reward_model,
                                                                 "--eval.reward_model (none: no reward scores)"))
    found.add("policies", lambda: policy_folders(config, run_dir))
    found.add("prompts", config.prompts)
    found.add("judges", judge_sources(judge=config.judge))
    return found.found()


def main(config: EvalStageConfig, run: RunConfig) -> dict:
    return run_stage(EVAL_STAGE, config, run)


def check(config: EvalStageConfig, run: RunConfig, found: dict) -> tuple[list[dict], object, list | None]:
    """(the prompts, the judge, the prompts' reference answers when the judge checks against them), read and
    checked."""
    prompts, judge, references = files(config, run)
    check_same_tokenizer(found)
    if config.human:
        check_prompts_for_people(config, run, prompts)
    return prompts, judge, references


def files(config: EvalStageConfig, run: RunConfig) -> tuple[list[dict], object, list | None]:
    """The prompts, the judge (tried on one made-up answer) and the prompts' reference answers when it checks
    against them."""
    check_judge_settings({"eval.judge": config.judge})
    prompts = first_rows(load_rows(config.prompts, "prompt"), config.num_prompts, config.prompts, "eval.num_prompts")
    judge = load_judge(config.judge) if config.judge else None
    references = check_references(prompts, config.prompts, config.judge)
    if judge:
        probe_judge(judge, prompts[0]["prompt"][-1]["content"], references[0] if references else None)
    return prompts, judge, references


def check_same_tokenizer(found: dict) -> None:
    """Each policy reads text with the baseline's vocabulary: a policy's KL is its answer's token ids read by both
    models (another vocabulary would crash or give a wrong KL)."""
    vocabulary = models.load_tokenizer(models.resolve(found[BASELINE])).get_vocab()
    for name in (name for name in found if name not in OTHER_INPUTS):
        if models.load_tokenizer(models.resolve(found[name])).get_vocab() != vocabulary:
            raise ConfigError(f"eval.policies: '{name}' ({found[name]}) has another tokenizer than the baseline "
                              f"({found[BASELINE]}): its KL to the baseline reads its token ids with both models; "
                              "compare models that share a tokenizer")


def check_prompts_for_people(config: EvalStageConfig, run: RunConfig, prompts: list[dict]) -> None:
    """The label store must not hold these prompts' ids with other text (`--eval.human` files the blind
    comparisons under them), nor can they be wider than its columns."""
    check_prompt_widths([p["id"] for p in prompts], [p.get("category") or "eval" for p in prompts], config.prompts)
    if config.human_batch:  # (empty: eval-KEY, named after the models and answers)
        check_batch_name(config.human_batch, "eval.human_batch", rounds=max(run.rounds, run.round))
    try:
        store = Store(run_store_url(run.output_root, run.name, config.db or None), create=False)
    except NoStoreYet:
        return  # made when the comparisons are queued (a URL that is no store, or a server not there: refused)
    store.check_prompt_ids({p["id"]: p["prompt"] for p in prompts}, config.prompts)


def evaluate(config: EvalStageConfig, run: RunConfig, found: dict, checked: tuple, tracker, record) -> Outcome:
    prompts, judge, references = checked
    run_dir = run.directory()
    started = time.time()
    messages = [p["prompt"] for p in prompts]
    names = [BASELINE] + [name for name in found if name not in OTHER_INPUTS]

    # 1. answers, and each policy's KL to the baseline along its own answers
    device = config.hardware.device
    baseline, tokenizer = models.load_causal_lm(found[BASELINE], config.hardware.dtype, device)
    answers, kls = {BASELINE: answer(baseline, tokenizer, messages, config, BASELINE)}, {}
    kls[BASELINE] = [0.0] * len(prompts)
    for name in names[1:]:
        policy, policy_tokenizer = models.load_causal_lm(found[name], config.hardware.dtype, device)
        answers[name] = answer(policy, policy_tokenizer, messages, config, name)
        kls[name] = answer_kl(policy, baseline, policy_tokenizer, messages, [a.ids for a in answers[name]],
                              config.score_batch_size)
        del policy
    del baseline

    # 2. scores: the reward model's and the judge's
    texts = {name: [a.text for a in answers[name]] for name in names}
    rewards = reward_scores(found.get("reward_model"), messages, texts, config.score_batch_size,
                            config.hardware.dtype, device)
    questions = [m[-1]["content"] for m in messages]
    judged = {name: judge_scores(judge, questions, texts[name], references) for name in names} if judge else {}

    # 3. per-policy results, win rates against the baseline; a checking judge's mean score is the accuracy
    results = {name: policy_results(name, answers[name], kls[name], rewards, judged, config) for name in names}
    if references:
        for name in names:
            results[name]["accuracy"] = statistics.fmean(judged[name])
    rows = [{"id": p["id"], "prompt": m[-1]["content"],
             **{f"{name}_{key}": value for name in names
                for key, value in (("answer", texts[name][i]), ("kl", kls[name][i]),
                                   ("reward", rewards[name][i] if rewards else None),
                                   ("judge", judged[name][i] if judged else None))}}
            for i, (p, m) in enumerate(zip(prompts, messages))]

    if config.human:
        hashes = record.input_hashes if record is not None else input_hashes(found)  # (main process: recorded)
        config = dataclasses.replace(config, human_batch=human_batch(config, run, names, hashes, texts))
        store = Store(run_store_url(run.output_root, run.name, config.db or None))
        queued = queue_human_comparisons(store, config, run, prompts, texts)
        add_human_win_rates(results, store, config, run)
    # 4. the folder (results, answers, plots, report), published whole; then the run's copy of the report
    partial = run_dir.partial_path(STAGE)
    staged = partial / "final"
    start_partial(STAGE, partial, resume=False)  # a killed attempt's files (plots this one may not draw) removed
    staged.mkdir()
    atomic_write_json(staged / "results.json", {"prompts": len(prompts), "policies": results})
    atomic_write_text(staged / "answers.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    write_report(staged, results, run_dir, config, {"rewards": rewards, "kls": kls, "judged": judged}, found[BASELINE])
    metrics = {f"{name}/{key}": value for name, result in results.items() for key, value in result.items()
               if isinstance(value, (int, float))}
    if config.human:
        metrics["human_comparisons"] = queued
    tracker.log({f"eval/{key}": value for key, value in metrics.items()})
    tracker.log_table("eval_answers", list(rows[0]), [list(row.values()) for row in rows])
    tracker.log_images({f"eval/{plot.stem}": plot for plot in sorted(staged.glob("*.png"))})
    print(headline(results))
    return Outcome({"prompts": len(prompts), **metrics}, staged, partial, time.time() - started,
                   f"report {run_dir.path / 'report.md'}", artifact="report", returned=metrics,
                   after_publishing=lambda: report_of_the_run(run_dir))  # once what it links to is there


def report_of_the_run(run_dir: RunDir) -> None:
    """The run's report.md from this eval's, unless a later round's eval is published: the run's report stays the
    newest round's (an earlier round's eval run again replaced it)."""
    newest = run_dir.round
    while (run_dir.in_round(newest + 1).stage_path(STAGE) / "report.md").exists():
        newest += 1
    if newest > run_dir.round:
        print(f"[{STAGE}] {run_dir.path / 'report.md'} stays round {newest}'s, the newest", flush=True)
        return
    run_report(run_dir)


def human_batch(config: EvalStageConfig, run: RunConfig, names: list[str], hashes: dict, texts: dict) -> str:
    """`eval.human_batch` (in a later online round, `-round-R` after it: each round asks about its own policies),
    else `eval-KEY`: KEY stands for the compared models' and the prompts' contents and the answers themselves, so
    the votes read back are on these answers (a batch of retrained policies' older answers, or of answers cut at
    another length or drawn from fewer prompts, would be reported as theirs)."""
    if config.human_batch:
        return config.human_batch + (f"-round-{run.round}" if run.round > 1 else "")
    return f"eval-{hash_config({**{name: hashes.get(name) for name in [*names, 'prompts']}, 'answers': texts})[:8]}"


def queue_human_comparisons(store: Store, config: EvalStageConfig, run: RunConfig, prompts: list[dict],
                            texts: dict) -> int:
    """Blind baseline-vs-policy comparisons in the label store, batch `human_batch`, kind `eval`: each response
    knows which side it is (its sampling record's `eval_role`), labellers see neither name nor side. Prompts whose
    two answers are the same text are not asked. A batch that already holds comparisons is left as it is."""
    held = store.comparisons(config.human_batch)
    if held:
        if asked_answers(held) != these_answers(run, prompts, texts):  # its votes would be reported as these
            raise UserError(f"eval.human_batch '{config.human_batch}' holds comparisons of other answers than these "
                            "(retrained policies, other prompts or settings): name a new batch, or leave "
                            "eval.human_batch empty for one named after the answers")
        print(f"[{STAGE}] batch '{config.human_batch}' already holds these comparisons: nothing queued")
        return 0
    rng = random.Random(config.seed)
    sampling = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
    pairs = []
    for i, prompt in enumerate(prompts):
        stored = store.add_prompt(prompt["id"], prompt.get("category") or "eval", prompt["prompt"])
        baseline = store.add_response(stored, texts[BASELINE][i], f"{run.name}/{BASELINE}",
                                      {**sampling, "eval_role": "baseline"})
        for name in texts:
            if name == BASELINE or texts[name][i] == texts[BASELINE][i]:
                continue
            policy = store.add_response(stored, texts[name][i], f"{run.name}/{name}",
                                        {**sampling, "eval_role": "policy"})
            pairs.append((baseline, policy) if rng.random() < 0.5 else (policy, baseline))
    # in one transaction: a killed stage leaves none of them, and its rerun queues them all
    queued = store.add_comparisons(pairs, batch=config.human_batch, kind="eval")
    print(f"[{STAGE}] queued {queued} blind comparisons in batch '{config.human_batch}' of {store.engine.url}: "
          f"`rlhf label serve --batch {config.human_batch}` to label them, `rlhf label stats --batch "
          f"{config.human_batch}` for the human win rates")
    return queued


def these_answers(run: RunConfig, prompts: list[dict], texts: dict) -> set[tuple]:
    """(prompt, model, answer) of every answer this eval asks people about (none where a policy's answer is the
    baseline's)."""
    answers = set()
    for i, prompt in enumerate(prompts):
        asked = [name for name in texts if name != BASELINE and texts[name][i] != texts[BASELINE][i]]
        answers |= {(json.dumps(prompt["prompt"]), f"{run.name}/{name}", texts[name][i])
                    for name in ([BASELINE] + asked if asked else [])}
    return answers


def asked_answers(comparisons: list[dict]) -> set[tuple]:
    """(prompt, model, answer) of every answer a batch's comparisons hold."""
    return {(json.dumps(c["prompt"]), c[f"{side}_model"], c[side]) for c in comparisons for side in ("a", "b")}


def add_human_win_rates(results: dict, store: Store, config: EvalStageConfig, run: RunConfig) -> None:
    """The people's votes so far on the blind comparisons (`rlhf label stats --batch` reads the same), into each
    policy's results: win rate against the baseline with its interval, and the votes counted (0 before any)."""
    rates = stats(store, config.human_batch)["human_win_rates"]
    for name, result in results.items():
        if name == BASELINE:
            continue
        rate = rates.get(f"{run.name}/{name}")
        result["human_votes"] = rate["votes"] if rate else 0
        if rate:
            result.update(win_rate_human=rate["win_rate"], win_rate_human_low=rate["low"],
                          win_rate_human_high=rate["high"])


def answer(model, tokenizer, messages: list[list[dict]], config: EvalStageConfig, name: str):
    if config.temperature > 0:
        torch.manual_seed(config.seed)
    return answer_prompts(model, tokenizer, messages, config.max_new_tokens, config.batch_size,
                          do_sample=config.temperature > 0, temperature=config.temperature or 1.0,
                          progress=f"[{STAGE}] {name} answering {len(messages)} prompts")


def reward_scores(reward_path: str | None, messages: list, texts: dict, batch_size: int, dtype,
                  device: str = "cpu") -> dict:
    """{policy: [normalised reward per prompt]}; empty without a reward model. Every policy's answers are scored
    in one pass, which scores each distinct conversation once: two policies' identical answers get the same score
    (a tie), not two readings in differently padded batches."""
    if not reward_path:
        return {}
    tokenizer = reward_tokenizer(reward_path)
    model = load_reward_model(reward_path, tokenizer, dtype=dtype).to(device).eval()
    scale = reward_record(reward_path).get("scale") or {"mean": 0.0, "std": 1.0}
    conversations = [m + [{"role": "assistant", "content": t}] for answers in texts.values()
                     for m, t in zip(messages, answers)]
    rewards = [(r - scale["mean"]) / scale["std"] for r in score(model, tokenizer, conversations, batch_size)]
    by_policy = {name: rewards[i * len(messages):(i + 1) * len(messages)] for i, name in enumerate(texts)}
    for name, scores in by_policy.items():  # a NaN would lose every comparison it is in, silently
        bad = [i for i, value in enumerate(scores) if not math.isfinite(value)]
        if bad:
            raise UserError(f"the reward model {reward_path} scored {len(bad)} of {name}'s answers {scores[bad[0]]} "
                            f"(the first: prompt {bad[0] + 1}): a diverged reward model, or fp16 overflowing (try "
                            "--eval.precision fp32 or bf16); scores must be finite to compare")
    return by_policy


def policy_results(name: str, answers: list, kls: list[float], rewards: dict, judged: dict,
                   config: EvalStageConfig) -> dict:
    result = {"kl": statistics.fmean(kls), "tokens": statistics.fmean(len(a.ids) for a in answers),
              "distinct_4grams": statistics.fmean(distinct_ngram_share(a.ids) for a in answers),
              "eos_rate": statistics.fmean(a.ended for a in answers)}
    for kind, scores in (("reward", rewards), ("judge", judged)):
        if not scores:
            continue
        result[kind] = statistics.fmean(scores[name])
        if name != BASELINE:
            result[f"win_rate_{kind}"] = win_rate(scores[name], scores[BASELINE])
            low, high = bootstrap_interval(scores[name], scores[BASELINE], config.bootstrap, config.confidence,
                                           config.seed)
            result[f"win_rate_{kind}_low"], result[f"win_rate_{kind}_high"] = low, high
    return result


def headline(results: dict) -> str:
    lines = [f"[{STAGE}] {len(results)} policies"]
    for name, result in results.items():
        parts = [f"{key} {value:.3f}" for key, value in result.items() if not key.endswith(("_low", "_high"))]
        lines.append(f"  {name:8} " + ", ".join(parts))
    return "\n".join(lines)


EVAL_STAGE = Stage("eval", "policies against the SFT model on held-out prompts, and the run's report", EvalStageConfig,
                   inputs, check, evaluate, files=files)
