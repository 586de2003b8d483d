"""`rlhf reward`: a reward model trained on the labellers' pairwise votes with TRL's `RewardTrainer`.

Pairs come from reward/data.py (a label export, a preference file or the store); the loss is reward/loss.py's
tie-aware Bradley-Terry with margins and weights; the model is a sequence classifier (one head, or an ensemble of
heads) initialised from the SFT model. Held-out accuracy is measured before and after, reward/evaluate.py writes
eval.md and its plots, and the reward scale on SFT samples goes into `stage.json` for PPO. Publishes the model
and tokenizer to `runs/<name>/reward/`.
"""
import dataclasses
import json
import time

import datasets
import torch
import transformers

from rlhf import hardware, tracking
from rlhf.batching import longest_sequence, sequences_per_step
from rlhf.config import RunConfig
from rlhf.errors import ConfigError
from rlhf.stage import NoCheckpointAtTheEnd, Outcome, Stage, StepTimer, checkpoint_step, run_stage, started_everywhere
from reward.config import RewardStageConfig
from reward.data import STAGE, inputs, round_pairs
from reward.evaluate import evaluate, fmt, gold_items, log_evaluation
from reward.evaluate import main as evaluate_again
from reward.loss import PreferenceCollator, PreferenceRewardTrainer
from reward.probe import answer_index, probe
from rlhf.reward_model import (answer_start, check_layer_count, keep_first_layers, load_reward_model, reward_record,
                               reward_tokenizer, score, score_heads)


def pair_metrics(model, tokenizer, pairs: list[dict]) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin (chosen minus rejected) over decided pairs."""
    pairs = [p for p in pairs if not p.get("tie")]
    if not pairs:
        return {"accuracy": None, "margin": None}
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    return {"accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}


def new_round_metrics(model, tokenizer, previous: str, pairs: list[dict]) -> dict:
    """On the newest round's held-out pairs (answers of the policy the previous round trained): this model's
    accuracy, and the previous round's reward model's, which is how stale it had become."""
    stale_tokenizer = reward_tokenizer(previous)
    stale = load_reward_model(previous, stale_tokenizer).eval()
    return {"new_round_eval_pairs": len(pairs),
            "new_round_accuracy": pair_metrics(model, tokenizer, pairs)["accuracy"],
            "previous_model_new_round_accuracy": pair_metrics(stale, stale_tokenizer, pairs)["accuracy"]}


def reward_scale(rewards: torch.Tensor) -> dict:
    """Mean and standard deviation of the reward over the distinct responses in the pairs: samples of the SFT
    model, so PPO can normalise its scores to mean 0 and std 1 on what its starting policy writes."""
    std = rewards.std().item() if len(rewards) > 1 else 1.0
    return {"mean": rewards.mean().item(), "std": std if std > 0 else 1.0, "samples": len(rewards)}


def main(config: RewardStageConfig, run: RunConfig) -> dict:
    return run_stage(REWARD_STAGE, config, run)


def check(config: RewardStageConfig, run: RunConfig, found: dict) -> tuple[list, list, list]:
    """(train pairs, held-out pairs, gold items), read and checked; and the kept layer count and, when it starts
    from a reward model, its heads against the model's."""
    check_layer_count(found["model"], config.num_layers)
    check_same_split(config, run)
    heads = reward_record(found["model"]).get("heads")
    if heads is not None and heads != config.ensemble:  # it would train its own heads and be recorded with others
        raise ConfigError(f"reward.ensemble is {config.ensemble}, but {found['model']} is a reward model with {heads} "
                          f"head(s): set --reward.ensemble {heads}, or start from a language model (reward.model, "
                          "or reward.round_init sft in a later round)")
    return *round_pairs(found, config, run.round), files(config, run)


# what decides each round's held-out prompts (split by a hash of the seed and the prompt, of the prompts it keeps)
SPLIT_SETTINGS = ("seed", "eval_fraction", "ties", "selection")


def check_same_split(config: RewardStageConfig, run: RunConfig) -> None:
    """With round_init previous, a later round's model continues the previous round's, trained on the earlier
    rounds' pairs as that round split them: split otherwise, its held-out pairs would hold some it trained on."""
    if run.round > 1:
        earlier = run.directory().in_round(run.round - 1).stage_entry(STAGE) or {}
        refuse_another_split(config, earlier.get("config", {}), run.round)


def refuse_another_split(config: RewardStageConfig, earlier: dict, round: int) -> None:
    """`earlier`: the previous round's reward settings (those it recorded)."""
    if config.round_init != "previous":
        return
    for name in SPLIT_SETTINGS:
        if name in earlier and earlier[name] != getattr(config, name):
            raise ConfigError(f"reward.{name} is {getattr(config, name)!r} in round {round} and was "
                              f"{earlier[name]!r} in round {round - 1}: with reward.round_init previous the model "
                              f"continues round {round - 1}'s, and another split would hold out pairs it trained "
                              f"on; set it as round {round - 1} did")


def files(config: RewardStageConfig, run: RunConfig) -> list[dict]:
    """The gold items (the pairs are an earlier stage's)."""
    return gold_items(config)


def tokens_per_step(tokenizer, train_pairs: list[dict], config: RewardStageConfig) -> int:
    """At most the tokens a step runs: with batches of whole prompts each distinct answer once, each padded to the
    longest (it counted both answers of every pair: on the default run five times too many, so that the stage
    checkpointed its activations, and then ran without sharing the prompt, for memory it did not need)."""
    return (sequences_per_step(config.per_device_train_batch_size, train_pairs, config.group_by_prompt) *
            longest_sequence(tokenizer, train_pairs, config.max_length))


def train(config: RewardStageConfig, run: RunConfig, found: dict, checked: tuple, tracker, record) -> Outcome:
    train_pairs, eval_pairs, gold = checked
    model_path = found["model"]
    run_dir = run.directory()
    partial = run_dir.partial_path(STAGE)
    resume_from = started_everywhere(STAGE, partial, config.resume, record, config.process_index == 0)

    # 1. model, data and the hardware decisions
    tokenizer = reward_tokenizer(model_path)
    transformers.set_seed(config.seed)  # the new score heads start the same way every time
    model = load_reward_model(model_path, tokenizer, config.ensemble, pooling=config.pooling)
    if config.num_layers:
        keep_first_layers(model, config.num_layers)
    checkpointing = (bool(config.gradient_checkpointing) if not config.gradient_checkpointing_auto else
                     hardware.needs_gradient_checkpointing(model, tokens_per_step(tokenizer, train_pairs, config),
                                                           config.hardware.device))
    hardware.log_decision(STAGE, config.hardware, checkpointing)
    args = dataclasses.replace(config, output_dir=str(partial), report_to="none",
                               gradient_checkpointing=checkpointing)
    columns = ["prompt", "chosen", "rejected", "tie", "weight"] + (["margin"] if config.use_margin else [])
    rows = [{k: p[k] for k in columns} for p in train_pairs]
    if config.ranking_loss == "plackett_luce":  # each ranking item by number, -1 for a pair of its own
        numbers = {name: i for i, name in enumerate(sorted({p["ranking"] for p in train_pairs} - {""}))}
        rows = [{**row, "ranking": numbers.get(pair["ranking"], -1)} for row, pair in zip(rows, train_pairs)]
    if config.group_by_prompt:
        rows = [{**row, "group": json.dumps(row["prompt"])} for row in rows]
    if config.pooling == "answer_mean":  # each prompt's answer start, tokenized once per prompt
        starts = {json.dumps(row["prompt"]): row["prompt"] for row in rows}
        starts = {key: answer_start(tokenizer, prompt) for key, prompt in starts.items()}
        rows = [{**row, "answer_start": starts[json.dumps(row["prompt"])]} for row in rows]
    train_data = datasets.Dataset.from_list(rows)

    # 2. accuracy before, the head fitted alone (not when resuming: the checkpoint holds it), training, accuracy after
    continued = run.round > 1 and config.round_init == "previous"  # the head is the previous round's, fitted already
    probed = (probe(model, tokenizer, train_pairs, eval_pairs, config)
              if config.probe_steps and not resume_from and not continued else {})
    before = probed.pop("before") if probed else pair_metrics(model, tokenizer, eval_pairs)
    if probed:
        print(f"[{STAGE}] head fitted alone on the frozen model: train accuracy "
              f"{fmt(probed['probe_train_accuracy'])}, held-out {fmt(probed['probe_eval_accuracy'])}")
    timer = StepTimer()
    trainer = PreferenceRewardTrainer(
        model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
        data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id,
                                         pad_to_multiple_of=config.pad_to_multiple_of,
                                         share_prompt=config.share_prompt and not checkpointing
                                         and config.world_size == 1),
        callbacks=[tracking.TrackingCallback(tracker), timer, NoCheckpointAtTheEnd()],
        tie_threshold=config.tie_threshold if config.ties == "equal" else 0.0, pooling=config.pooling)
    trained_pairs = len(trainer.train_dataset)  # TRL leaves out pairs longer than max_length: said, and counted
    if trained_pairs == 0:  # (an untrained model published as done would replace a finished one)
        raise ConfigError(f"reward: every one of the {len(rows)} training pairs is longer than reward.max_length "
                          f"({config.max_length} tokens): nothing to train on; raise reward.max_length")
    if trained_pairs < len(rows):
        print(f"[{STAGE}] {len(rows) - trained_pairs} of {len(rows)} training pairs are longer than max_length "
              f"({config.max_length} tokens) and were left out")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started
    metrics = {"train_loss": result.training_loss, "eval_accuracy_before": before["accuracy"],
               "eval_margin_before": before["margin"], "train_pairs": trained_pairs,
               "long_pairs_left_out": len(rows) - trained_pairs, "eval_pairs": len(eval_pairs),
               "global_step": trainer.state.global_step, "resumed_from_step": checkpoint_step(resume_from),
               "median_step_s": timer.median(), **probed}
    if timer.median():
        pairs_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        metrics["pairs_per_s"] = pairs_per_step / timer.median()
    if config.process_index != 0:
        return Outcome(metrics, None, partial, train_seconds, "")

    # 3. evaluation (held-out accuracy after training among it) and the reward scale, written into the folder
    #    before it is published
    staged = partial / "final"
    trainer.save_model(str(staged))
    tokenizer.save_pretrained(str(staged))
    # every distinct answer scored once, for the scale and the held-out pairs, by the weights as published: mixed
    # precision left the model's forward in a bf16 autocast, which no later reader of them runs under
    published = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    conversations, chosen, rejected = answer_index(train_pairs + eval_pairs)
    heads = score_heads(published, tokenizer, conversations)
    scale = reward_scale(heads.mean(-1))
    trained = len(train_pairs)
    report = evaluate(published, tokenizer, eval_pairs, gold, config, staged,
                      (heads[chosen[trained:]], heads[rejected[trained:]]))
    log_evaluation(tracker, report, staged)
    metrics.update(report, eval_accuracy=report["heldout_accuracy"], eval_margin=report["heldout_margin"])
    if run.round > 1:
        metrics.update(new_round_metrics(published, tokenizer, found["previous_reward_model"],
                                         [pair for pair in eval_pairs if pair["round"] == run.round]))
    reward_info = {"heads": config.ensemble, "pooling": config.pooling, "scale": scale, "ties": config.ties,
                   "tie_threshold": config.tie_threshold if config.ties == "equal" else 0.0}

    tracker.log({f"train/final_{k}": v for k, v in metrics.items() if k not in report and isinstance(v, (int, float))})
    summary = (f"{trained_pairs} pairs, train loss {metrics['train_loss']:.4f}, held-out accuracy "
               f"{fmt(before['accuracy'])} -> {fmt(metrics['eval_accuracy'])}, human ceiling "
               f"{fmt(report.get('human_ceiling'))}; report {run_dir.stage_path(STAGE) / 'eval.md'}")
    return Outcome(metrics, staged, partial, train_seconds, summary, extra={"reward": reward_info})


REWARD_STAGE = Stage("reward", "reward model on the label export (TRL RewardTrainer)", RewardStageConfig, inputs, check,
                     train, trains=True, files=files,
                     actions={"eval": (evaluate_again, "evaluates the published reward model again (eval.md and its "
                                                       "plots)")})
