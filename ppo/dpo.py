"""`rlhf dpo`: direct preference optimisation of the SFT model with TRL's `DPOTrainer`.

    rlhf dpo --config configs/default.yaml [--dpo.pairs on_policy] [--dpo.beta 0.1 ...] [--dpo.resume true]

Pairs come from the labellers' votes (a label export, a preference file or the label store, with ties, both-bad
rows, margins and gold weights handled as in the reward stage: rlhf/preference_pairs.py), or, with
`pairs: on_policy`, from the SFT model itself: each prompt answered twice, the reward model deciding which answer is
chosen. The reference is the starting model, frozen. The sigmoid loss is rlhf/preference_loss.py's Bradley-Terry
likelihood on DPO's implicit rewards, beta x (log pi(y|x) - log pi_ref(y|x)), so ties, margins and weights reach
it. A held-out share of the pairs measures the implicit reward's accuracy. Publishes the policy and tokenizer to
`runs/<name>/dpo/` (with `pairs.jsonl` when the pairs were sampled).
"""
import dataclasses
import json
import shutil
import time
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ppo.dpo_config import DPOStageConfig
from rlhf import hardware, models, tracking
from rlhf.batching import (LengthGroupedTraining, MultiplePadding, PromptGroupSampler, longest_sequence,
                           sequences_per_step, shared_prefix_inputs, unique_rows)
from rlhf.config import RunConfig
from rlhf.datasets import first_rows, load_rows, split_train_eval
from rlhf.errors import ConfigError, DataError
from rlhf.generation import generate_responses
from rlhf.preference_loss import preference_loss
from rlhf.preference_pairs import pair_margin, preference_source, usable_pairs
from rlhf.reward_model import load_reward_model, reward_tokenizer, score
from rlhf.runs import atomic_write_json, results_only
from rlhf.stage import (Inputs, NoCheckpointAtTheEnd, Outcome, Stage, StepTimer, checkpoint_step,
                        earlier_round_model, published_reward_model, refuse_fixed_preferences,
                        refuse_fixed_reward_model, run_stage, started_everywhere, starting_model)

STAGE = "dpo"
PAIR_COLUMNS = ("margin", "tie", "weight")


def inputs(config: DPOStageConfig, run: RunConfig) -> dict:
    """What the stage reads, as the manifest records it: the policy, and the pairs' source."""
    run_dir = run.directory()
    found = Inputs()
    refuse_fixed_preferences(STAGE, config.preferences, run.round)
    if run.round == 1:
        found.add("model", lambda: starting_model(STAGE, config.model, run_dir))
    else:  # an online round continues the previous round's DPO policy, which is also its reference (iterative DPO)
        found.add("model", lambda: earlier_round_model(run_dir, STAGE, "DPO policy"))
    if config.pairs == "labels":
        found.add("preferences", lambda: preference_source(STAGE, config.preferences, config.batch,
                                                            config.min_votes, run_dir))
        return found.found()
    refuse_fixed_reward_model(STAGE, config.reward_model, run.round)
    found.add("reward_model", lambda: published_reward_model(run_dir, config.reward_model,
                                                             "--dpo.reward_model (or use --dpo.pairs labels)"))
    found.add("prompts", config.prompts)
    return found.found()


def labelled_pairs(source: str, config: DPOStageConfig) -> list[dict]:
    """The labellers' usable pairs in TRL's conversational preference format, with tie, margin and weight."""
    rows = usable_pairs(source, config.ties, config.weight_by_gold, config.selection, config.max_length, STAGE)
    return [{"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
             "tie": row["tie"], "weight": row["weight"], "margin": pair_margin(row) if config.use_margin else 0.0}
            for row in rows]


def best_and_worst(prompts: list[dict], answers: list[str], rewards: list[float], k: int) -> list[dict]:
    """One pair per prompt from its k consecutive answers: the highest-rewarded chosen, the lowest rejected (the
    sort is stable: equal rewards keep answer order). Prompts whose extremes are the same text or score the same
    are left out."""
    pairs = []
    for i, prompt in enumerate(prompts):
        scored = sorted(zip(answers[k * i:k * (i + 1)], rewards[k * i:k * (i + 1)]), key=lambda item: -item[1])
        (chosen, chosen_score), (rejected, rejected_score) = scored[0], scored[-1]
        if chosen == rejected or chosen_score == rejected_score:
            continue
        pairs.append({"id": prompt["id"], "prompt": prompt["prompt"],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}],
                      "tie": False, "weight": 1.0, "margin": 0.0,
                      "chosen_reward": chosen_score, "rejected_reward": rejected_score})
    return pairs


def on_policy_pairs(config: DPOStageConfig, model_path: str, reward_path: str, prompts: list[dict]) -> list[dict]:
    """Each prompt answered `responses_per_prompt` times by the starting policy at `temperature`; the reward
    model's best-scored answer is chosen and its worst rejected. Prompts whose answers all score the same (or are
    the same text) are left out."""
    k, device = config.responses_per_prompt, PartialState().device  # this process's GPU, when there is one
    policy, tokenizer = models.load_causal_lm(model_path, config.hardware.dtype, device)
    torch.manual_seed(config.seed)
    answers = generate_responses(policy, tokenizer, [p["prompt"] for p in prompts for _ in range(k)],
                                 config.max_new_tokens, config.generation_batch_size, do_sample=True,
                                 temperature=config.temperature, progress=f"sampling {k} answers per prompt")
    del policy
    reward_tok = reward_tokenizer(reward_path)
    reward = load_reward_model(reward_path, reward_tok, dtype=config.hardware.dtype).to(device).eval()
    conversations = [p["prompt"] + [{"role": "assistant", "content": a}]
                     for p, a in zip((p for p in prompts for _ in range(k)), answers)]
    pairs = best_and_worst(prompts, answers, score(reward, reward_tok, conversations), k)
    if not pairs:
        raise DataError(config.prompts, None, "prompt", f"no on-policy pair: the reward model scored every prompt's "
                                                        f"{k} answers alike (or they were identical); raise "
                                                        "num_prompts, responses_per_prompt or temperature")
    print(f"[{STAGE}] {len(pairs)} on-policy pairs (best and worst of {k}) from {len(prompts)} prompts, ordered by "
          f"{reward_path}")
    return pairs


def sampled_pairs(config: DPOStageConfig, found: dict, partial: Path, prompts: list[dict]) -> list[dict]:
    """On-policy pairs, sampled once per run: kept in the stage's work folder, so a resumed run trains on the same
    pairs. The main process samples; the others read its file."""
    path = partial / "pairs.jsonl"
    with PartialState().main_process_first():
        if not path.exists() and PartialState().is_main_process:
            pairs = on_policy_pairs(config, found["model"], found["reward_model"], prompts)
            partial.mkdir(parents=True, exist_ok=True)
            staged = path.with_suffix(".tmp")
            staged.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
            staged.rename(path)
        return [json.loads(line) for line in path.read_text().splitlines()]


def distinct_rows(inputs: dict) -> tuple[dict, torch.Tensor]:
    """The batch's distinct sequences (tokens and masks), each once, and the position of every row among them."""
    names = ("input_ids", "attention_mask", "completion_mask")
    key = torch.cat([inputs[name] for name in names], dim=1)
    distinct, row_of = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), len(key), device=key.device).scatter_reduce(
        0, row_of, torch.arange(len(key), device=key.device), "amin")
    return {name: inputs[name][first] for name in names}, row_of


def shared_prompt_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probabilities of each answer row of a shared-prompt batch (see PairCollator): the prompts run
    once, left-padded, and each answer on a copy of its prompt's keys and values. An answer's first token is
    predicted by its prompt's last position, the others by the answer's own positions."""
    prefix, suffix_inputs = shared_prefix_inputs(model, batch, logits_to_keep=1)
    suffix = model(**suffix_inputs)
    suffix_ids, suffix_mask = batch["suffix_ids"], batch["suffix_mask"]
    logits = torch.cat([prefix.logits[batch["suffix_prefix"]], suffix.logits[:, :-1]], dim=1)
    logps = logits.float().log_softmax(-1).gather(-1, suffix_ids[..., None]).squeeze(-1)
    return (logps * suffix_mask).sum(-1)


@dataclasses.dataclass
class PairCollator(MultiplePadding, DataCollatorForPreference):
    """TRL's collator (chosen rows, then rejected rows) plus each pair's margin, tie flag and weight. With
    `share_prompt`, a batch of prompt groups (examples with a `group`) whose rows all fit in `max_length` is
    split instead: each distinct prompt once (left-padded), each distinct answer once (right-padded) with the
    prompt it continues, and the answer row of each pair's chosen and rejected answer."""

    share_prompt: bool = False

    def torch_call(self, examples):
        batch = self.shared_prompt_batch(examples) if self.shares_prompts(examples) else super().torch_call(examples)
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples])
        batch["tie"] = torch.tensor([bool(e["tie"]) for e in examples])
        batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
        return batch

    def shares_prompts(self, examples) -> bool:
        """Only prompt groups whose rows max_length does not cut."""
        longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
        return (self.share_prompt and all("group" in e for e in examples)
                and (self.max_length is None or longest <= self.max_length))

    def shared_prompt_batch(self, examples) -> dict:
        prompts, prompt_of = unique_rows([tuple(e["prompt_ids"]) for e in examples])
        answers, answer_of = unique_rows([(prompt_of[i], tuple(e[side])) for i, e in enumerate(examples)
                                          for side in ("chosen_ids", "rejected_ids")])
        return {"prefix_ids": self.padded([torch.tensor(p) for p in prompts], self.pad_token_id, "left"),
                "prefix_mask": self.padded([torch.ones(len(p), dtype=torch.long) for p in prompts], 0, "left"),
                "suffix_ids": self.padded([torch.tensor(a) for _, a in answers], self.pad_token_id, "right"),
                "suffix_mask": self.padded([torch.ones(len(a), dtype=torch.long) for _, a in answers], 0, "right"),
                "suffix_prefix": torch.tensor([prompt for prompt, _ in answers]),
                "chosen_row": torch.tensor(answer_of[0::2]), "rejected_row": torch.tensor(answer_of[1::2]),
                # reference log-probs precomputed over the dataset (`precompute_ref_log_probs`), per pair
                **{key: torch.tensor([e[key] for e in examples]) for key in ("ref_chosen_logps", "ref_rejected_logps")
                   if key in examples[0]}}


class PairDPOTrainer(LengthGroupedTraining, DPOTrainer):
    """TRL's DPOTrainer whose sigmoid loss is the Bradley-Terry likelihood of rlhf/preference_loss.py on the
    implicit rewards beta x (log pi - log pi_ref): ties, margins and weights reach it. Without ties or margins and
    with equal weights it is TRL's loss (a test checks it). Other loss types are TRL's own. Each distinct sequence
    of a batch runs once, so pairs that share an answer (k answers to a prompt, all their pairs, batched by prompt:
    a `group` column) share its forward pass. Otherwise pairs of similar length share a batch
    (`train_sampling_strategy: length_grouped`)."""

    def __init__(self, *args, tie_threshold: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tie_threshold = tie_threshold

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + list(PAIR_COLUMNS) + ["group"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if "group" in dataset.column_names:
            return PromptGroupSampler(dataset["group"], self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _compute_loss(self, model, inputs, return_outputs):
        pair = {name: inputs.pop(name) for name in PAIR_COLUMNS if name in inputs}
        if not self.args.pair_loss or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen_logps, rejected_logps = self.answer_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        loss = preference_loss(chosen_rewards, rejected_rewards, pair.get("margin"), pair.get("tie"),
                               pair.get("weight"), self.tie_threshold)
        self.record_metrics(chosen_rewards.detach(), rejected_rewards.detach(), chosen_logps.detach(),
                            rejected_logps.detach(), pair.get("tie"))
        return loss

    def row_lengths(self, dataset) -> list[int]:
        """A pair's rows are padded to its longer answer after the prompt."""
        return [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in
                zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]

    def answer_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of each pair's chosen and rejected answer under `model`, each distinct
        sequence of the batch run once."""
        if "prefix_ids" in inputs:
            logps = shared_prompt_logps(model, inputs)
            return logps[inputs["chosen_row"]], logps[inputs["rejected_row"]]
        rows, row_of = distinct_rows(inputs)
        return self.sequence_logps(model, rows)[row_of].chunk(2)

    def compute_ref_log_probs(self, model, inputs):
        """The reference's (chosen, rejected) log-probabilities, each distinct sequence run once: TRL's helper on
        whole sequences (it halves its rows into chosen and rejected: ours are the distinct rows, rejoined), ours
        on shared-prompt batches. Also used to precompute the reference over the dataset. With ld_alpha TRL's
        helper reads each chosen row beside its rejected one: every row is kept."""
        if "prefix_ids" in inputs:
            with torch.no_grad(), self.accelerator.autocast():
                return self.answer_logps(model, inputs)
        if self.ld_alpha is not None:
            return super().compute_ref_log_probs(model, inputs)
        rows, row_of = distinct_rows(inputs)
        return torch.cat(super().compute_ref_log_probs(model, rows))[row_of].chunk(2)

    def sequence_logps(self, model, inputs) -> torch.Tensor:
        """Summed log-probabilities of each row's answer under `model` (TRL's fused LM head: no full logits)."""
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        shifted = mask[:, 1:]
        return (outputs.log_probs[:, -shifted.shape[1]:] * shifted).sum(-1)

    def record_metrics(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, tie) -> None:
        """TRL's DPO metric names; accuracy over decided pairs only (a tie has no right order): each decided pair's
        0 or 1 is kept, so that the logged mean is over the pairs, not over batches (one of ties only would count
        as 0)."""
        mode = "train" if self.model.training else "eval"
        decided = ~tie.to(chosen_rewards.device) if tie is not None else torch.ones_like(chosen_rewards).bool()
        gather = self.accelerator.gather
        right = gather((chosen_rewards > rejected_rewards).float())[gather(decided.float()).bool()]
        values = {"rewards/chosen": gather(chosen_rewards).mean(), "rewards/rejected": gather(rejected_rewards).mean(),
                  "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
                  "logps/chosen": gather(chosen_logps).mean(), "logps/rejected": gather(rejected_logps).mean()}
        for name, value in values.items():
            self._metrics[mode][name].append(value.item())
        if len(right):
            self._metrics[mode]["rewards/accuracies"].extend(right.tolist())


def main(config: DPOStageConfig, run: RunConfig) -> dict:
    return run_stage(DPO_STAGE, config, run)


def check(config: DPOStageConfig, run: RunConfig, found: dict) -> list[dict]:
    """The labelled pairs, or with on-policy pairs the prompts they are sampled on, read and checked."""
    if config.pairs == "labels":
        pairs = labelled_pairs(found["preferences"], config)
        if not config.pair_loss and any(pair["weight"] != 1.0 for pair in pairs):
            raise DataError(found["preferences"], None, "pair_weight",
                            f"the pairs weigh unequally (a ranking's pairs share one vote between them), which "
                            f"loss_type {','.join(config.loss_type)} leaves out (it is TRL's loss): use loss_type "
                            "sigmoid")
        return pairs
    return files(config, run)


def files(config: DPOStageConfig, run: RunConfig) -> list[dict]:
    """With on-policy pairs, the prompts they are sampled on (the labelled pairs come from the preferences stage,
    or an export checked by `check`)."""
    if config.pairs == "labels":
        return []
    return first_rows(load_rows(config.prompts, "prompt"), config.num_prompts, config.prompts, "dpo.num_prompts")


def held_out_by_prompt(pairs: list[dict], config: DPOStageConfig) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs), split by prompt whatever the batching: a prompt's pairs on both sides (votes
    on the same answers among them) would overstate the held-out reward accuracy."""
    return split_train_eval(pairs, config.eval_fraction, config.seed, group=lambda pair: json.dumps(pair["prompt"]))


def train(config: DPOStageConfig, run: RunConfig, found: dict, source: list[dict], tracker, record) -> Outcome:
    """`source`: the labelled pairs, or with on-policy pairs the prompts they are sampled on."""
    partial = run.directory().partial_path(STAGE)
    # a fresh start also samples fresh on-policy pairs
    resume_from = started_everywhere(STAGE, partial, config.resume, record, config.process_index == 0)

    # 1. pairs, split into train and held out
    pairs = source if config.pairs == "labels" else sampled_pairs(config, found, partial, source)
    if config.prompt_batches:  # a prompt's pairs are held out together, and batched together
        pairs = [{**pair, "group": json.dumps(pair["prompt"])} for pair in pairs]
    train_pairs, eval_pairs = held_out_by_prompt(pairs, config)
    columns = ["prompt", "chosen", "rejected", *PAIR_COLUMNS] + (["group"] if config.prompt_batches else [])
    train_data = datasets.Dataset.from_list([{k: p[k] for k in columns} for p in train_pairs])
    eval_data = datasets.Dataset.from_list([{k: p[k] for k in columns} for p in eval_pairs]) if eval_pairs else None

    # 2. model (the reference is a frozen copy made by TRL) and the hardware decisions
    model, tokenizer = models.load_causal_lm(found["model"])
    tokens_per_step = (sequences_per_step(config.per_device_train_batch_size, train_pairs, config.prompt_batches) *
                       longest_sequence(tokenizer, train_pairs, config.max_length))
    checkpointing = (bool(config.gradient_checkpointing) if not config.gradient_checkpointing_auto else
                     hardware.needs_gradient_checkpointing(model, tokens_per_step, config.hardware.device))
    hardware.log_decision(STAGE, config.hardware, checkpointing)
    args = dataclasses.replace(config, output_dir=str(partial), report_to="none", gradient_checkpointing=checkpointing)
    timer = StepTimer()
    collator = PairCollator(pad_token_id=tokenizer.pad_token_id, max_length=config.max_length,
                            truncation_mode=config.truncation_mode, pad_to_multiple_of=config.pad_to_multiple_of,
                            share_prompt=(config.share_prompt and config.prompt_batches and not checkpointing
                                          and config.world_size == 1 and config.pair_loss))  # TRL's losses: whole rows
    trainer = PairDPOTrainer(model=model, args=args, data_collator=collator, train_dataset=train_data,
                             eval_dataset=eval_data, processing_class=tokenizer,
                             callbacks=[tracking.TrackingCallback(tracker), timer, NoCheckpointAtTheEnd()],
                             tie_threshold=config.tie_threshold if config.ties == "equal" else 0.0)
    left_out = {"train": len(train_pairs) - len(trainer.train_dataset),
                "held-out": len(eval_pairs) - (len(trainer.eval_dataset) if eval_pairs else 0)}
    if not len(trainer.train_dataset):  # (an untrained policy published as done would replace a finished one)
        raise ConfigError(f"dpo: every one of the {len(train_pairs)} training pairs has a prompt of dpo.max_length "
                          f"({config.max_length} tokens) or more: nothing to train on; raise dpo.max_length")
    for kind, count in left_out.items():  # TRL drops a pair whose prompt alone fills max_length
        if count:
            print(f"[{STAGE}] {count} {kind} pairs have a prompt of max_length ({config.max_length} tokens) or "
                  "more and are left out")
    long_pairs = sum(length > (config.max_length or length) for length in trainer.row_lengths(trainer.train_dataset))
    if long_pairs:  # cut as TRL does, where the reward stage (TRL's RewardTrainer) leaves them out: said either way
        print(f"[{STAGE}] {long_pairs} of {len(trainer.train_dataset)} training pairs are longer than max_length "
              f"({config.max_length} tokens) and are cut ({config.truncation_mode})")

    # 3. train, then the held-out pairs
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - started
    metrics = {"train_loss": result.training_loss, "train_pairs": len(trainer.train_dataset),
               "long_pairs_cut": long_pairs, "long_prompts_left_out": sum(left_out.values()),
               "eval_pairs": len(eval_pairs) - left_out["held-out"],
               "global_step": trainer.state.global_step, "resumed_from_step": checkpoint_step(resume_from),
               "median_step_s": timer.median(), "pairs_source": config.pairs}
    if eval_data is not None:
        held_out = trainer.evaluate()
        metrics.update({key.replace("/", "_"): value for key, value in held_out.items()
                        if key.startswith("eval_") and isinstance(value, float)})

    # 4. the folder to publish
    staged = partial / "final"
    trainer.save_model(str(staged))
    accuracy = metrics.get("eval_rewards_accuracies")
    summary = (f"{metrics['train_pairs']} training pairs from {config.pairs}, train loss {metrics['train_loss']:.4f}, "
               f"held-out implicit-reward accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}")
    if config.process_index != 0:
        return Outcome(metrics, None, partial, train_seconds, summary)
    tokenizer.save_pretrained(str(staged))
    # logged metrics, for plots (without timings: a rerun to the same weights publishes the same folder)
    atomic_write_json(staged / "history.json", [results_only(logged) for logged in trainer.state.log_history])
    if config.pairs == "on_policy":
        shutil.copyfile(partial / "pairs.jsonl", staged / "pairs.jsonl")
    tracker.log({f"train/final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return Outcome(metrics, staged, partial, train_seconds, summary)


DPO_STAGE = Stage("dpo", "DPO on the label export or on-policy pairs (TRL DPOTrainer)", DPOStageConfig, inputs, check,
                  train, trains=True, files=files)
