"""`rlhf sft`: supervised fine-tuning on demonstrations with TRL's `SFTTrainer`.

    rlhf sft --config configs/default.yaml [--run.name NAME] [--sft.learning_rate 2e-5 ...] [--sft.resume true]

Reads demonstrations (`rlhf.datasets`), holds out an eval split, answers a few sample prompts, trains, answers
them again, and publishes the model, tokenizer and chat template to `runs/<name>/sft/` with `samples.json` and
`stage.json`; the run's `manifest.json` gets the stage's entry. Checkpoints live in `runs/<name>/.sft.partial/`
until the stage finishes, so `--sft.resume true` continues a killed run from its last checkpoint.
"""
import dataclasses
import time

import datasets
import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from rlhf import hardware, models, tracking
from rlhf.batching import LengthGroupedTraining
from rlhf.config import RunConfig
from rlhf.datasets import cut_long_texts, load_rows, split_train_eval
from rlhf.errors import ConfigError, DataError
from rlhf.generation import generate_responses
from rlhf.runs import atomic_write_json
from rlhf.stage import (NoCheckpointAtTheEnd, Outcome, Stage, check_language_model, checkpoint_step, run_stage,
                        started_everywhere)
from sft.config import SFTStageConfig

STAGE = "sft"


def main(config: SFTStageConfig, run: RunConfig) -> dict:
    return run_stage(SFT_STAGE, config, run)


def inputs(config: SFTStageConfig, run: RunConfig) -> dict:
    model = models.resolve(config.model)
    check_language_model(model, "sft.model")
    return {"model": model, "train_data": config.train_data}


def check(config: SFTStageConfig, run: RunConfig, found: dict) -> tuple:
    """(train data, eval data or None, sample prompts): read, checked and tokenized with the model's chat template
    (a template that cannot mark the answers stops the stage here, before it writes anything)."""
    rows, prompts = files(config, run)
    rows = cut_long_texts(rows, config.max_length, config.train_data, STAGE)
    train_rows, eval_rows = split_train_eval(rows, config.eval_fraction, config.seed)
    tokenizer = models.load_tokenizer(found["model"])
    train_data = fit_to_max_length(tokenize_rows(train_rows, tokenizer, config.assistant_only_loss),
                                   config.max_length, "training", config.train_data)
    eval_data = (fit_to_max_length(tokenize_rows(eval_rows, tokenizer, config.assistant_only_loss),
                                   config.max_length, "held-out", config.train_data) if eval_rows else None)
    return train_data, eval_data, prompts


def fit_to_max_length(data: datasets.Dataset, max_length: int | None, split: str, source) -> datasets.Dataset:
    """An example longer than `max_length` tokens is trained on its first max_length (TRL cuts it so): said, as
    its answer loses its end (and its end-of-turn token). One whose first max_length tokens hold no answer token
    has nothing to learn from and is left out (TRL left it out unsaid)."""
    if not max_length:
        return data
    long = [i for i, ids in enumerate(data["input_ids"]) if len(ids) > max_length]
    if not long:
        return data
    empty = {i for i in long if not any(data[i]["assistant_masks"][:max_length])}
    print(f"[{STAGE}] {len(long)} {split} example(s) of {source} are longer than max_length ({max_length} tokens): "
          f"trained on their first {max_length}, their answers cut"
          + (f"; {len(empty)} with no answer token among them left out" if empty else ""), flush=True)
    if len(empty) == len(data):
        raise DataError(source, None, "rows", f"no {split} example has an answer token within max_length "
                                              f"({max_length} tokens)")
    return data.select([i for i in range(len(data)) if i not in empty]) if empty else data


def files(config: SFTStageConfig, run: RunConfig) -> tuple[list[dict], list[dict]]:
    """(the demonstrations, the prompts sampled after training), read and checked row by row."""
    rows = load_rows(config.train_data, "sft")
    return rows, load_rows(config.sample_prompts, "prompt")[:config.num_samples] if config.sample_prompts else []


def train(config: SFTStageConfig, run: RunConfig, found: dict, checked: tuple, tracker, record) -> Outcome:
    train_data, eval_data, prompts = checked
    partial = run.directory().partial_path(STAGE)
    resume_from = started_everywhere(STAGE, partial, config.resume, record, config.process_index == 0)

    # 1. model and the hardware decisions
    model, tokenizer = models.load_causal_lm(found["model"])
    checkpointing = choose_checkpointing(config, model)
    hardware.log_decision(STAGE, config.hardware, checkpointing)
    args = trainer_args(config, partial, checkpointing)

    # 2. answers before training
    sample_messages = [p["prompt"] for p in prompts]
    before = generate_responses(model, tokenizer, sample_messages, config.sample_max_new_tokens)

    # 3. train, with eval loss before and after
    callbacks = [tracking.TrackingCallback(tracker), NoCheckpointAtTheEnd()]
    if run.sample_every and sample_messages:
        callbacks.append(SampleCallback(tracker, tokenizer, sample_messages, config.sample_max_new_tokens,
                                        run.sample_every))
    trainer = StageSFTTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                              processing_class=tokenizer, callbacks=callbacks)
    eval_loss_before = trainer.evaluate()["eval_loss"] if eval_data else None
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started
    eval_loss = trainer.evaluate()["eval_loss"] if eval_data else None

    # 4. answers after training
    after = generate_responses(trainer.model, tokenizer, sample_messages, config.sample_max_new_tokens)
    samples = [{"id": p["id"], "prompt": p["prompt"][-1]["content"], "before": b, "after": a}
               for p, b, a in zip(prompts, before, after)]
    tracker.log_table("samples", ["id", "prompt", "before", "after"], [list(s.values()) for s in samples],
                      step=trainer.state.global_step)

    metrics = {"train_loss": result.training_loss, "eval_loss_before": eval_loss_before, "eval_loss": eval_loss,
               "global_step": trainer.state.global_step, "train_examples": len(train_data),
               "eval_examples": len(eval_data) if eval_data else 0, "real_tokens": trainer.real_tokens,
               "resumed_from_step": checkpoint_step(resume_from),
               "real_tokens_per_s": trainer.real_tokens / max(train_seconds, 1e-9)}
    # 5. the folder to publish. Every rank saves (sharded weights are gathered collectively); only the main one
    # writes files and publishes.
    staged = partial / "final"
    trainer.save_model(str(staged))
    summary = (f"train loss {metrics['train_loss']:.4f}, eval loss {fmt(eval_loss_before)} -> {fmt(eval_loss)}, "
               f"{metrics['real_tokens_per_s']:.0f} tokens/s")
    if config.process_index != 0:
        return Outcome(metrics, None, partial, train_seconds, summary)
    tokenizer.save_pretrained(str(staged))
    atomic_write_json(staged / "samples.json", samples)
    tracker.log(tracking.namespaced({"final_" + k: v for k, v in metrics.items() if v is not None}))
    print_samples(samples)
    return Outcome(metrics, staged, partial, train_seconds, summary)


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def trainer_args(config: SFTStageConfig, output_dir, checkpointing: bool) -> SFTStageConfig:
    # Masks are already in the data (any chat template works), so TRL must not look for generation markers.
    return dataclasses.replace(config, output_dir=str(output_dir), assistant_only_loss=False,
                               gradient_checkpointing=checkpointing, report_to="none")


def choose_checkpointing(config: SFTStageConfig, model) -> bool:
    if not config.gradient_checkpointing_auto:
        return bool(config.gradient_checkpointing)
    tokens = config.per_device_train_batch_size * (config.max_length or 1024)
    return hardware.needs_gradient_checkpointing(model, tokens, config.hardware.device)


def tokenize_rows(rows: list[dict], tokenizer, assistant_only: bool) -> datasets.Dataset:
    encoded = [tokenize_conversation(tokenizer, row["messages"], assistant_only) for row in rows]
    return datasets.Dataset.from_list(encoded)


def tokenize_conversation(tokenizer, messages: list[dict], assistant_only: bool = True) -> dict:
    """input_ids of the chat-formatted conversation, and a mask of the tokens that carry loss.

    The mask is found by rendering the conversation up to each assistant turn: the turn's text is what the
    template adds between "history + generation prompt" and "history + this turn". That works for any template
    whose renderings of a conversation's prefixes are prefixes of its rendering (true of common chat templates),
    without TRL's `{% generation %}` markers. The end-of-turn token is inside the span, so the model learns to stop.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not assistant_only:
        return {"input_ids": encoded["input_ids"], "assistant_masks": [1] * len(encoded["input_ids"])}
    spans = assistant_spans(tokenizer, messages, text)
    mask = [int(any(start <= begin < end for start, end in spans)) for begin, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def assistant_spans(tokenizer, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False).rstrip()
        if not (full_text.startswith(before) and full_text.startswith(through)):
            raise ConfigError("the chat template does not render conversation prefixes as prefixes of the whole "
                              "conversation, so the answers' tokens cannot be marked; set --sft.assistant_only_loss "
                              "false to train on all tokens")
        spans.append((len(before), len(through)))
    return spans


class StageSFTTrainer(LengthGroupedTraining, SFTTrainer):
    """TRL's SFTTrainer with three changes.

    It counts the tokens it trains on: transformers' own count mistakes EOS for padding when the two share an id
    (the bundled SmolLM2) and there is no attention mask (packed, padding-free batches).

    Off CUDA it computes the loss by projecting only the positions that carry a label through the LM head, in one
    matrix product. TRL projects the same positions but in tiles, recomputed in the backward pass, which saves GPU
    memory and on a CPU makes the whole training step about a third slower (measured: docs/benchmarks.md).

    Examples of similar length share a batch, the batches in random order (`train_sampling_strategy:
    length_grouped`, the default on a CPU without packing).
    """

    real_tokens = 0

    def row_lengths(self, dataset) -> list[int]:
        return [min(len(ids), self.args.max_length or len(ids)) for ids in dataset["input_ids"]]

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        self.real_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.plain_nll_on_one_cpu_process(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if model.training else "eval"
        labels = inputs["labels"][:, 1:]  # position t predicts token t + 1
        backbone = getattr(model, model.base_model_prefix)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        selected = labels != -100
        # the backbone, called past the model's forward, is outside the autocast accelerate wrapped that forward in
        # for mixed precision: it runs under its own (in fp32 it ran twice as slow as bf16 on a CPU with AMX)
        with self.accelerator.autocast():
            hidden = backbone(**model_inputs, use_cache=False).last_hidden_state[:, :-1]
            logits = model.get_output_embeddings()(hidden[selected]).float()
        targets = labels[selected]
        count = selected.sum() if num_items_in_batch is None else num_items_in_batch
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
        self.record_metrics(mode, logits.detach(), targets, inputs)
        return loss

    def plain_nll_on_one_cpu_process(self, model) -> bool:
        """Our loss covers the plain case; anything else (GPUs, several processes, where the model is wrapped,
        other loss types, label smoothing, MoE aux loss, rescaled logits) keeps TRL's."""
        text_config = model.config.get_text_config()
        scaled = any(getattr(text_config, name, None) is not None
                     for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling"))
        return (not torch.cuda.is_available() and self.accelerator.num_processes == 1 and self.args.loss_type == "nll"
                and self.label_smoother is None and self.compute_loss_func is None and not self.aux_loss_enabled
                and not scaled)

    def record_metrics(self, mode: str, logits, targets, inputs) -> None:
        """TRL's `entropy`, `mean_token_accuracy` and `num_tokens`, so dashboards read the same either way."""
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        self._metrics[mode]["entropy"].append(float(entropy.mean()) if len(targets) else 0.0)
        accuracy = (logits.argmax(-1) == targets).float().mean()
        self._metrics[mode]["mean_token_accuracy"].append(float(accuracy) if len(targets) else 0.0)
        self._metrics[mode]["num_tokens"] = [self.real_tokens]


class SampleCallback(TrainerCallback):
    """Answers the sample prompts every `every` steps and logs them as a table."""

    def __init__(self, tracker, tokenizer, prompts, max_new_tokens, every):
        self.tracker, self.tokenizer, self.prompts = tracker, tokenizer, prompts
        self.max_new_tokens, self.every = max_new_tokens, every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step % self.every == 0:
            answers = generate_responses(model, self.tokenizer, self.prompts, self.max_new_tokens)
            rows = [[p[-1]["content"], a] for p, a in zip(self.prompts, answers)]
            self.tracker.log_table("samples_during_training", ["prompt", "answer"], rows, step=state.global_step)


def print_samples(samples: list[dict]) -> None:
    for sample in samples:
        print(f"\n### {sample['id']}: {sample['prompt']}\n--- before ---\n{sample['before']}\n"
              f"--- after ---\n{sample['after']}")
    print()


SFT_STAGE = Stage("sft", "supervised fine-tuning (TRL SFTTrainer)", SFTStageConfig, inputs, check, train, trains=True,
                  files=files)
