"""`rlhf reward`: a reward model trained on the labellers' pairwise votes with TRL's `RewardTrainer`.

Reads pairs from a label export (or any preference file), drops both-bad rows and ties, passes each pair's
margin to the loss, and trains a one-output sequence classifier initialised from the SFT model. Accuracy on
held-out pairs is measured before and after. Publishes the model and tokenizer to `runs/<name>/reward/` with
`stage.json`.
"""
import dataclasses
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoModelForSequenceClassification
from trl import RewardTrainer

from rlhf import hardware, models, tracking
from rlhf.config import RunConfig
from rlhf.datasets import load_rows, split_train_eval
from rlhf.errors import DataError, MissingInputError, ModelError
from rlhf.runs import RunDir
from rlhf.stage import running_stage
from reward.config import RewardStageConfig
from sft.train import last_complete_checkpoint

STAGE = "reward"
# Special tokens that can stand in as padding when a tokenizer pads with its EOS token.
SPARE_PAD_TOKENS = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


def inputs(config: RewardStageConfig, run: RunConfig) -> tuple[str, str]:
    """(model path, preferences source), defaulting to this run's SFT model and label export."""
    run_dir = RunDir(run.output_root, run.name)
    preferences = config.preferences or str(run_dir.stage_path("preferences"))
    if not Path(preferences).exists() and not config.preferences:
        raise MissingInputError(f"no preference pairs at {preferences}: run `rlhf label export --out {preferences}` "
                                "first, or set --reward.preferences")
    if config.model:
        return models.resolve(config.model), preferences
    sft = run_dir.stage_path("sft")
    if not (sft / "config.json").exists():
        raise MissingInputError(f"no SFT model at {sft}: run `rlhf sft --config ... --run.name {run.name}` first, "
                                "or set --reward.model")
    return str(sft), preferences


def training_pairs(source: str, config: RewardStageConfig) -> list[dict]:
    """TRL preference rows from the usable pairs: both-bad rows say nothing about order, ties are dropped."""
    rows = load_rows(source, "preference")
    usable = [row for row in rows if not row["both_bad"] and not row["tie"]]
    if not usable:
        raise DataError(source, None, "rows", f"no usable pairs: all {len(rows)} rows are ties or both bad")
    pairs = []
    for row in usable:
        pair = {"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        if config.use_margin:
            pair["margin"] = row["margin"] or 0.0
        pairs.append(pair)
    return pairs


def reward_tokenizer(path: str):
    """The model's tokenizer with a pad token distinct from EOS: a sequence classifier scores the last token
    that is not padding, so padding with EOS would hide the end of every response."""
    tokenizer = models.load_tokenizer(path)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    vocab = tokenizer.get_vocab()
    spare = next((token for token in SPARE_PAD_TOKENS if token in vocab and vocab[token] != tokenizer.eos_token_id),
                 None)
    if spare is None:
        raise ModelError(f"{path}: the tokenizer pads with its EOS token and has no other special token to pad with "
                         f"(looked for {', '.join(SPARE_PAD_TOKENS)}); add a pad token to the tokenizer")
    tokenizer.pad_token = spare
    return tokenizer


def load_reward_model(path: str, tokenizer, dtype=torch.float32):
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
                         f"{model.get_input_embeddings().num_embeddings}: a mismatched tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def score(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """The reward of each whole conversation (prompt + response), scored at its last real token."""
    model.eval()
    scores = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        scores.extend(model(**batch.to(model.device)).logits[:, 0].float().tolist())
    return scores


def pair_metrics(model, tokenizer, pairs: list[dict]) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin (chosen minus rejected) over pairs."""
    if not pairs:
        return {"accuracy": None, "margin": None}
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    return {"accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(pairs),
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}


def main(config: RewardStageConfig, run: RunConfig) -> dict:
    run_dir = RunDir(run.output_root, run.name)
    model_path, preferences = inputs(config, run)
    train_pairs, eval_pairs = split_train_eval(training_pairs(preferences, config), config.eval_fraction,
                                               config.seed)
    with running_stage(run, STAGE, config, {"model": model_path, "preferences": preferences}) as (record, tracker):
        return train(config, run, run_dir, model_path, train_pairs, eval_pairs, tracker, record)


def train(config, run, run_dir, model_path, train_pairs, eval_pairs, tracker, record) -> dict:
    partial = run_dir.partial_path(STAGE)
    resume_from = last_complete_checkpoint(partial) if config.resume else None
    if not resume_from:
        shutil.rmtree(partial, ignore_errors=True)

    # 1. model, data and the hardware decisions
    tokenizer = reward_tokenizer(model_path)
    transformers.set_seed(config.seed)  # the new score head starts the same way every time
    model = load_reward_model(model_path, tokenizer)
    checkpointing = (bool(config.gradient_checkpointing) if not config.gradient_checkpointing_auto else
                     hardware.needs_gradient_checkpointing(model, 2 * config.per_device_train_batch_size *
                                                           (config.max_length or 1024), config.hardware.device))
    hardware.log_decision(STAGE, config.hardware, checkpointing)
    args = dataclasses.replace(config, output_dir=str(partial), report_to="none",
                               gradient_checkpointing=checkpointing)
    columns = ["prompt", "chosen", "rejected"] + (["margin"] if config.use_margin else [])
    train_data = datasets.Dataset.from_list([{k: p[k] for k in columns} for p in train_pairs])

    # 2. accuracy before, training, accuracy after
    before = pair_metrics(model, tokenizer, eval_pairs)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
                            callbacks=[tracking.TrackingCallback(tracker)])
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started
    after = pair_metrics(trainer.model, tokenizer, eval_pairs)
    metrics = {"train_loss": result.training_loss, "eval_accuracy_before": before["accuracy"],
               "eval_accuracy": after["accuracy"], "eval_margin_before": before["margin"],
               "eval_margin": after["margin"], "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
               "global_step": trainer.state.global_step}

    # 3. publish: a complete folder renamed into place, then the record
    staged = partial / "final"
    trainer.save_model(str(staged))
    if config.process_index != 0:
        return metrics
    tokenizer.save_pretrained(str(staged))
    final = record.publish(staged, partial, metrics, train_seconds)
    tracker.log(tracking.namespaced({"final_" + k: v for k, v in metrics.items() if v is not None}))
    tracker.log_artifact(f"{run.name}-reward", "model", final)
    print(f"[{STAGE}] done: {final} ({len(train_pairs)} pairs, train loss {metrics['train_loss']:.4f}, held-out "
          f"accuracy {fmt(before['accuracy'])} -> {fmt(after['accuracy'])})")
    return metrics


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
