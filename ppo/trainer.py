"""`rlhf ppo`: PPO on the policy, against the reward model (or a programmatic reward), KL-penalised towards the
frozen starting policy. With `algorithm` grpo, rloo or reinforce_pp the same loop runs without a critic: each update
answers batch_size / G prompts G times each, and the advantages come from the answers' scores alone (ppo/update.py,
`critic_free_experience`).

Each update, top to bottom:
  1. take the next `batch_size` prompts (reshuffled every pass over them);
  2. sample responses (ppo/rollout.py: left-padded, KV cache, temperature, cut at the stop token);
  3. score prompt + response with the reward model (pooled as it was trained: its last real token, or the mean
     over the answer), normalised by the scale the reward stage stored, minus the missing-EOS penalty;
  4-7. reference log-probs, values, per-token rewards with the KL penalty, GAE advantages (ppo/update.py); in
     half precision the sampling log-probs are first recomputed by a full forward, as the update computes them;
  8. `num_ppo_epochs` passes of shuffled minibatches updating policy and critic with one optimiser;
  9. log TRL's former PPO metrics, a sample table, health alerts; adapt the KL coefficient; checkpoint.
Before the first update, every `eval_every` updates and after the last, the policy answers the held-out eval
prompts (greedy), scored by the reward model (or reward function) and the judge: the proxy and the gold against
the KL reached, with an alert when the proxy rises while the gold falls (over-optimisation).

Under `accelerate launch` or `torchrun` each process answers its own share of every batch; metrics are gathered
over all episodes and gradients averaged by DDP, or with the models sharded by FSDP2 (ppo/sharding.py) or DeepSpeed
ZeRO-3 (ppo/zero3.py); answers are drawn from per-answer seeds and each process's loss is weighted by its share of
the tokens, and advantages are whitened over every process's tokens (TRL's PPO whitened per process), so N
processes train like one with the same batch_size.
"""
import collections
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, set_seed
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import disable_dropout_in_model

from evaluation.metrics import distinct_ngram_share
from ppo.config import PPOStageConfig
from ppo.core import AdaptiveKLController, FixedKLController, penalised_scores, repetition_penalties, this_process
from ppo.health import health_alerts, overoptimisation_alert
from ppo.rollout import generate
from ppo.sharding import (every_process_loads, fsdp_version, full_parameters, full_state_dict, is_sharded,
                          layer_classes, load_shards, save_shards, shard)
from ppo.state import LoopState, save_checkpoint
from ppo.zero3 import (Part, engines, gathered_policy, is_zero3, load_partitions, loaded_whole, save_partitions,
                       uses_deepspeed, zero_stage)
from ppo.zero3 import full_state_dict as zero3_state_dict
from ppo.update import Critic, make_experience, ppo_epochs, recomputed_logprobs, reference_logprobs
from rlhf import models
from rlhf.config import RunConfig
from rlhf.datasets import first_rows, load_rows
from rlhf.errors import ConfigError, MissingInputError, UserError
from rlhf.generation import generate_responses
from rlhf.judges import check_judge_settings, judge_sources, load_judge
from rlhf.reward_model import load_reward_model, reward_heads, reward_record, reward_tokenizer, score
from rlhf.runs import atomic_write_json, results_only
from rlhf.stage import (Inputs, Outcome, Stage, checkpoint_step, earlier_round_model, last_complete_checkpoint,
                        published_reward_model, refuse_fixed_reward_model, round_seed, run_stage, start_partial,
                        starting_model)
from rlhf.verifiable import check_references, judge_scores, probe_judge

STAGE = "ppo"
OVEROPTIMISATION = "over-optimisation"  # the alert raised at eval points, beside the per-update checks
JUDGE_SCORES = "judge_scores"  # an eval point's per-prompt judge scores (ppo/health.py)
CRITIC, CRITIC_SCALE = "critic", "critic.json"


def inputs(config: PPOStageConfig, run: RunConfig) -> dict:
    run_dir = run.directory()
    found = Inputs()
    refuse_fixed_reward_model(STAGE, config.reward_model, run.round)
    if run.round == 1:
        found.add("policy", lambda: starting_model(STAGE, config.model, run_dir))
    else:  # an online round continues the previous round's policy and critic, against the same reference
        found.add("policy", lambda: earlier_round_model(run_dir, STAGE, "PPO policy"))
        if config.uses_critic and not critic_free_before(run_dir):  # (else the critic starts from the reward model)
            found.add("critic", lambda: earlier_critic(run_dir))
        found.add("reference", lambda: starting_model(STAGE, config.model, run_dir))
    found.add("prompts", config.prompts)
    found.add("judges", judge_sources(reward_function=config.reward_function, judge=config.judge))
    if not config.reward_function:
        found.add("reward_model", lambda: published_reward_model(run_dir, config.reward_model,
                                                                 "--ppo.reward_model (or --ppo.reward_function)"))
    return found.found()


def critic_free_before(run_dir) -> bool:
    """The previous round trained without a critic (grpo, rloo, reinforce_pp), so kept none to continue (its policy
    was refused as published before PPO kept its critic, and rerunning it published none again)."""
    entry = run_dir.in_round(run_dir.round - 1).stage_entry(STAGE) or {}
    return entry.get("config", {}).get("algorithm", "ppo") != "ppo"


def earlier_critic(run_dir) -> str:
    """The previous round's critic, published beside its policy (a missing policy is reported on its own)."""
    earlier = run_dir.in_round(run_dir.round - 1)
    policy = earlier.stage_path(STAGE)
    if (policy / "config.json").exists() and not (policy / CRITIC / CRITIC_SCALE).exists():
        raise MissingInputError(f"no critic in {policy}: that PPO policy was published before PPO kept its critic; "
                                f"rerun it with `rlhf run --from {earlier.key(STAGE)} ...`")
    return str(policy / CRITIC)


class StoppedOnAlert(UserError):
    """--ppo.stop_on_alert: the run stopped at a health alert (its last checkpoint can be resumed)."""


class Scorer:
    """Scores (prompt, response) pairs: the reward model on the chat-templated conversation, normalised by its
    stored scale, or a programmatic reward function of the texts."""

    def __init__(self, config: PPOStageConfig, reward_model: str | None, device="cpu"):
        self.function = load_judge(config.reward_function) if config.reward_function else None
        self.mean, self.std = 0.0, 1.0
        if reward_model:
            self.tokenizer = reward_tokenizer(reward_model)
            self.model = load_reward_model(reward_model, self.tokenizer, dtype=config.hardware.dtype
                                           ).requires_grad_(False).to(device)
            scale = reward_record(reward_model).get("scale")
            if config.normalize_reward and scale:
                self.mean, self.std = scale["mean"], scale["std"]

    def __call__(self, prompts: list[list[dict]], responses: list[str], references: list[str] | None = None
                 ) -> torch.Tensor:
        if self.function:
            texts = [p[-1]["content"] for p in prompts]
            return torch.tensor(judge_scores(self.function, texts, responses, references), dtype=torch.float)
        conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return (torch.tensor(score(self.model, self.tokenizer, conversations)) - self.mean) / self.std


def main(config: PPOStageConfig, run: RunConfig) -> dict:
    return run_stage(PPO_STAGE, config, run)


@dataclasses.dataclass
class CheckedInputs:
    """What the stage reads from files and specs, read and checked before it writes anything. The references are
    the prompts' reference answers, when the reward function or judge checks answers against them."""
    prompts: list
    eval_prompts: list
    judge: object | None
    references: list | None = None
    eval_references: list | None = None
    accelerator: object | None = None


def checked_inputs(config: PPOStageConfig, run: RunConfig, found: dict) -> CheckedInputs:
    """The training and eval prompts, checked row by row, and the judge loaded (a reward function too, only to
    check it: the scorer loads its own)."""
    rows, eval_rows, judge, references, eval_references = files(config, run)
    if config.uses_critic:
        check_critic_vocabulary(found)
    # the launch (a distribution PPO cannot run under, a batch that does not split over the processes) is checked
    # last, with the files read: a refusal leaves the run's manifest as it was
    return CheckedInputs([row["prompt"] for row in rows], [row["prompt"] for row in eval_rows], judge, references,
                         eval_references, make_accelerator(config))


def check_critic_vocabulary(found: dict) -> None:
    """The critic starts as the reward model and reads the policy's token ids: built on another vocabulary, its
    values would be those of other words (or out of its range). (A later round's critic, the last round's, was
    checked then.)"""
    critic = found.get("reward_model") if "critic" not in found else None
    if critic and (models.load_tokenizer(critic).get_vocab()
                   != models.load_tokenizer(models.resolve(found["policy"])).get_vocab()):
        raise ConfigError(f"{critic}: its tokenizer is not the policy's ({found['policy']}), and PPO's critic, which "
                          "starts as the reward model, reads the policy's token ids; train the reward model from the "
                          "policy's model, or use a critic-free algorithm (--ppo.algorithm rloo)")


def files(config: PPOStageConfig, run: RunConfig) -> tuple:
    """(training prompts, eval prompts, the judge, their reference answers where a function checks against them),
    read and checked; the judge and a reward function tried on one made-up answer."""
    check_judge_settings({"ppo.reward_function": config.reward_function, "ppo.judge": config.judge})
    rows = load_rows(config.prompts, "prompt")
    eval_rows = first_rows(load_rows(config.eval_prompts, "prompt"), config.num_eval_prompts, config.eval_prompts,
                           "ppo.num_eval_prompts")
    eval_references = (check_references(eval_rows, config.eval_prompts, config.reward_function)
                       or check_references(eval_rows, config.eval_prompts, config.judge))
    judge = load_judge(config.judge) if config.judge else None
    references = check_references(rows, config.prompts, config.reward_function)
    if config.reward_function:
        probe_judge(load_judge(config.reward_function), rows[0]["prompt"][-1]["content"],
                    references[0] if references else None)
    if judge:
        probe_judge(judge, eval_rows[0]["prompt"][-1]["content"], eval_references[0] if eval_references else None)
    return rows, eval_rows, judge, references, eval_references


def unsupported_distribution(distributed_type: DistributedType, use_peft: bool = False,
                             zero_stage: int | None = None, precision: str = "no") -> str | None:
    """Why PPO cannot run under this kind of distribution (None: it can). DDP, FSDP2 (ppo/sharding.py) and
    DeepSpeed ZeRO-3 (ppo/zero3.py) run, in bf16 or fp32; LoRA runs under DDP only."""
    sharded = distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and use_peft:
        return "LoRA adapters are not sharded here: run LoRA under DDP, or full fine-tuning sharded"
    if sharded and precision == "fp16":  # (FSDP2's optimiser is not accelerate's, so its loss scaler never unscales)
        return "fp16 needs a loss scaler PPO does not drive when sharded: use bf16 or fp32 (--ppo.precision)"
    if distributed_type == DistributedType.DEEPSPEED and zero_stage != 3:
        return (f"PPO runs DeepSpeed at ZeRO stage 3 only (not {zero_stage}): stages 1 and 2 keep every parameter "
                "on every process, as DDP does")
    return None


def offload_settings() -> list[str]:
    """The accelerate config's offloading settings that are on (`accelerate launch` puts them in the environment):
    PPO's own sharding (ppo/sharding.py, ppo/zero3.py) would leave them unread."""
    settings = {"fsdp_offload_params": os.environ.get("FSDP_OFFLOAD_PARAMS", "false") == "true",
                "offload_param_device": os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") != "none",
                "offload_optimizer_device":
                    os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none"}
    return [name for name, on in settings.items() if on]


def make_accelerator(config: PPOStageConfig) -> Accelerator:
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(config.hardware.dtype, "no")
    # the other processes wait while the main one publishes and closes its trackers (an upload can take minutes):
    # 30 minutes, as the TRL stages' ddp_timeout, not NCCL's default 10
    accelerator = Accelerator(cpu=config.hardware.device == "cpu", mixed_precision=precision,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))])
    distribution = (DistributedType.FSDP if is_sharded(accelerator) else DistributedType.DEEPSPEED
                    if uses_deepspeed(accelerator) else accelerator.distributed_type)
    why = unsupported_distribution(distribution, config.use_peft, zero_stage(accelerator), precision)
    if why:
        raise ConfigError(f"ppo does not run under {distribution.value}: {why}. Launch PPO with "
                          "configs/accelerate/ddp.yaml, fsdp.yaml or zero3.yaml (or torchrun); the other stages can "
                          "use any config")
    offloaded = offload_settings() if distribution in (DistributedType.FSDP, DistributedType.DEEPSPEED) else []
    if offloaded:
        raise ConfigError(f"ppo does not offload to the CPU ({', '.join(offloaded)} in the accelerate config): it "
                          "shards its models over the processes and keeps them on the device; turn offloading off "
                          "for PPO")
    if is_sharded(accelerator) and fsdp_version(accelerator) != 2:
        raise ConfigError("ppo shards with FSDP 2 (fully_shard): set fsdp_version: 2 in the accelerate config, as "
                          "configs/accelerate/fsdp.yaml does")
    share, remainder = divmod(config.batch_size, accelerator.num_processes)
    if remainder or share % (config.num_mini_batches * config.gradient_accumulation_steps) or share % config.group_size:
        raise ConfigError(f"ppo.batch_size {config.batch_size} must split evenly over {accelerator.num_processes} "
                          f"processes, each share into num_mini_batches x gradient_accumulation_steps "
                          f"({config.num_mini_batches} x {config.gradient_accumulation_steps}) and into whole groups "
                          f"of {config.group_size} answers to one prompt")
    return accelerator


def build_models(config: PPOStageConfig, found: dict):
    """(policy, tokenizer, reference, critic). The critic starts as the reward model (or, in a later online round,
    as the previous round's critic); the critic-free algorithms have none. With LoRA the reference is None: the
    policy with its adapter off; in a later online round the reference is the SFT model, loaded on its own."""
    policy, tokenizer = models.load_causal_lm(found["policy"])
    critic = load_critic(config, found) if config.uses_critic else None
    if config.use_peft:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    if "reference" in found:
        reference = models.load_causal_lm(found["reference"])[0].eval().requires_grad_(False)
    else:
        reference = None if config.use_peft else copy.deepcopy(policy).eval().requires_grad_(False)
    for model in (policy, reference, critic and critic.classifier):
        if model is not None:
            disable_dropout_in_model(model)
    return policy, tokenizer, reference, critic


def load_critic(config: PPOStageConfig, found: dict) -> Critic:
    """The previous round's critic with the scale it was trained on; else the reward model (an ensemble's heads
    averaged) on the normalised scale, or the policy's backbone with a new head under a reward function."""
    if "critic" in found:
        classifier = AutoModelForSequenceClassification.from_pretrained(found["critic"], dtype=torch.float32)
        scale = json.loads((Path(found["critic"]) / CRITIC_SCALE).read_text())
        return Critic(classifier, scale["mean"], scale["std"])
    reward_model = found.get("reward_model")
    classifier = AutoModelForSequenceClassification.from_pretrained(
        reward_model or found["policy"], num_labels=reward_heads(reward_model) if reward_model else 1,
        dtype=torch.float32)
    if not reward_model:
        # A new head starts at zero. Drawn at random it values states about 1 apart from token to token, against
        # scores of 0 or 1, and GAE's advantages would be mostly that noise (on the arithmetic task, PPO with a
        # random head learned nothing in 16 updates, docs/benchmarks.md).
        torch.nn.init.zeros_(classifier.score.weight)
    scale = reward_record(reward_model).get("scale") if reward_model and config.normalize_reward else None
    return Critic(classifier, scale["mean"], scale["std"]) if scale else Critic(classifier)


def save_critic(critic: Critic, folder: Path, weights: dict | None = None) -> None:
    """The critic beside the policy (`critic/`), so a later online round continues both. `weights`: the critic's
    full state dict when sharded (its keys start with `classifier.`)."""
    if weights is not None:
        weights = {key.removeprefix("classifier."): value for key, value in weights.items()}
    critic.classifier.save_pretrained(str(folder), state_dict=weights)
    atomic_write_json(folder / CRITIC_SCALE, {"mean": critic.mean, "std": critic.std})


def train(config: PPOStageConfig, run: RunConfig, found: dict, checked: CheckedInputs, tracker, record) -> Outcome:
    accelerator = checked.accelerator
    partial = run.directory().partial_path(STAGE)
    if accelerator.is_main_process:
        start_partial(STAGE, partial, config.resume, record)
    accelerator.wait_for_everyone()
    checkpoint = last_complete_checkpoint(partial) if config.resume else None
    seed = round_seed(config.seed, run.round)
    set_seed(seed + accelerator.process_index)  # answers draw from their own seeds (one_update), not from these

    sharded, zero3 = is_sharded(accelerator), is_zero3(accelerator)
    with every_process_loads(), loaded_whole(accelerator):  # the reward model too: it scores on every process
        policy, tokenizer, reference, critic = build_models(config, found)
        scorer = Scorer(config, found.get("reward_model"), accelerator.device)
    if sharded:
        policy, critic = (model and shard(model.to(accelerator.device), layer_classes(model), accelerator)
                          for model in (policy, critic))
        if reference is not None:
            reference = shard(reference.to(accelerator.device), layer_classes(reference), accelerator, frozen=True)
    elif reference is not None and not zero3:
        reference.to(accelerator.device)
    eval_prompts, judge = checked.eval_prompts, checked.judge
    # fused: one pass over memory (not over sharded parameters)
    make_optimizer = functools.partial(torch.optim.AdamW, lr=config.learning_rate, eps=1e-5,
                                       fused=not (sharded or zero3))
    if zero3:
        optimizer, reference = engines(policy, critic, reference, make_optimizer, config, accelerator)
        policy, critic = Part(optimizer, "policy"), (Part(optimizer, "critic") if critic is not None else None)
    else:
        trained = [model for model in (policy, critic) if model is not None]
        optimizer = make_optimizer([p for model in trained for p in model.parameters() if p.requires_grad])
    if not (sharded or zero3):
        *trained, optimizer = accelerator.prepare(*trained, optimizer)
        policy, critic = trained[0], (trained[1] if critic is not None else None)
    kl_control = (AdaptiveKLController(config.kl_coef, config.target_kl, config.horizon) if config.target_kl
                  else FixedKLController(config.kl_coef))
    # the shuffling generator is seeded alike everywhere: every process sees the same prompt order
    state = LoopState(torch.Generator().manual_seed(seed), kl_control, seed=seed)
    accelerator.register_for_checkpointing(state)
    if accelerator.is_main_process:
        print(f"[{STAGE}] {config.algorithm}: {config.num_updates} updates of {config.batch_size} episodes"
              f"{f' ({config.group_size} per prompt)' if config.group_size > 1 else ''} on "
              f"{accelerator.num_processes} process(es), {config.hardware.device} "
              f"({accelerator.mixed_precision} mixed precision), LoRA {'on' if config.use_peft else 'off'}", flush=True)

    if checkpoint:
        accelerator.load_state(checkpoint)
        if sharded:
            load_shards(Path(checkpoint), policy, critic, optimizer)
        if zero3:
            load_partitions(Path(checkpoint), optimizer)
    else:
        state.eval_before = evaluate(accelerator, policy, tokenizer, checked, scorer, config)
        record_eval(state, state.eval_before, 0.0 if run.round == 1 else None)
        tracker.log(logged(state.eval_before), step=0)
    started = time.time()
    # the checks whose alert was printed: those that fired before (a resumed run does not print them again)
    printed = {check for metrics in state.history for check in health_alerts(metrics, config)}
    while state.update < config.num_updates:
        state.update += 1
        metrics, samples = one_update(accelerator, state, policy, reference, critic, optimizer, tokenizer, scorer,
                                      checked, config)
        state.kl_control.update(metrics["objective/kl"], config.batch_size)
        state.history.append(metrics)
        report(tracker, state.update, metrics, samples, config, accelerator.is_main_process)
        alerts = health_alerts(metrics, config)
        if config.eval_every and state.update % config.eval_every == 0 and state.update < config.num_updates:
            result = evaluate(accelerator, policy, tokenizer, checked, scorer, config)
            tracker.log(logged(result), step=state.update)
            overoptimised = record_eval(state, result)
            if overoptimised:
                alerts[OVEROPTIMISATION] = overoptimised
        warn(tracker, state.update, alerts, printed, accelerator.is_main_process)  # logs the count, 0 included
        if alerts and config.stop_on_alert:
            save_checkpoint(accelerator, partial, state, shards(sharded, policy, critic, optimizer))
            raise StoppedOnAlert(f"ppo stopped at update {state.update} (--ppo.stop_on_alert): "
                                 f"{next(iter(alerts.values()))}; "
                                 f"the checkpoint in {partial} can be inspected or resumed with --ppo.resume")
        if config.save_steps and state.update % config.save_steps == 0 and state.update < config.num_updates:
            save_checkpoint(accelerator, partial, state, shards(sharded, policy, critic, optimizer))

    if not (sharded or zero3):  # sharded parameters are one copy by construction
        check_in_sync(accelerator, *[model for model in (policy, critic) if model is not None])
    eval_after = evaluate(accelerator, policy, tokenizer, checked, scorer, config)
    tracker.log(logged(eval_after), step=state.update)
    overoptimised = record_eval(state, eval_after)
    if overoptimised:
        warn(tracker, state.update, {OVEROPTIMISATION: overoptimised}, printed, accelerator.is_main_process)
    if accelerator.is_main_process:
        print_alert_counts(state.history, config)
    summary = summarise(state, eval_after, accelerator, config, time.time() - started, checkpoint)
    summary.update({"eval_prompts": len(eval_prompts), "overoptimisation": overoptimised})
    tracker.log({f"train/final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})  # as DPO's
    line = (f"eval score {summary['eval_score_before']:.3f} -> {summary['eval_score_after']:.3f}"
            + (f", judge {summary['eval_judge_before']:.3f} -> {summary['eval_judge_after']:.3f}" if judge else "")
            + f", final KL {summary['final_kl']:.2f} (budget {config.kl_alert:g})")
    returned = {"history": state.history, "evals": state.evals, **summary}
    # sharded (FSDP2, ZeRO-3), every process takes part in gathering the full weights; the main process writes them
    policy_weights, critic_weights = (None if model is None else full_state_dict(model) if sharded
                                      else zero3_state_dict(model, accelerator.is_main_process) if zero3 else None
                                      for model in (policy, critic))
    if not accelerator.is_main_process:
        return Outcome(summary, None, partial, time.time() - started, line, returned=returned)
    staged = partial / "final"
    save_policy(module_of(policy, accelerator), tokenizer, staged, config.use_peft, policy_weights)
    if critic is not None:
        save_critic(module_of(critic, accelerator), staged / CRITIC, critic_weights)
    # the metrics of every update, for plots (timings in the trackers: a rerun to the same weights, the same folder)
    atomic_write_json(staged / "history.json", [results_only(metrics) for metrics in state.history])
    atomic_write_json(staged / "evals.json", state.evals)  # proxy and gold at each eval point, for the report
    return Outcome(summary, staged, partial, time.time() - started, line, returned=returned)


def one_update(accelerator, state: LoopState, policy, reference, critic, optimizer, tokenizer, scorer,
               checked: CheckedInputs, config: PPOStageConfig) -> tuple[dict, list[list]]:
    prompts = checked.prompts
    # 1. prompts: the next global batch (reshuffled every pass), each prompt group_size times in a row, this
    # process's contiguous share of it (whole groups: make_accelerator checks)
    wanted = config.batch_size // config.group_size
    while len(state.order) < wanted:
        state.order += torch.randperm(len(prompts), generator=state.generator).tolist()
    chosen, state.order = state.order[:wanted], state.order[wanted:]
    batch = [index for index in chosen for _ in range(config.group_size)]
    share = config.batch_size // accelerator.num_processes
    local = batch[accelerator.process_index * share:][:share]
    local_prompts = [prompts[i] for i in local]
    local_references = [checked.references[i] for i in local] if checked.references else None
    # forwards outside the update: through the engine under ZeRO-3, else without DDP's gradient sync
    forwards = policy if isinstance(policy, Part) else accelerator.unwrap_model(policy)
    # 2. rollout; each answer drawn with its own seed (round, update, row in the global batch), so the rollouts do
    # not depend on how many processes share the batch
    clock = time.perf_counter()
    first_row = accelerator.process_index * share
    seeds = [row_seed(state.seed, state.update, first_row + row) for row in range(len(local_prompts))]
    with accelerator.autocast(), whole_policy(policy, accelerator) as model:
        rollout = generate(model, tokenizer, local_prompts, config.response_length, config.temperature, seeds)
    generate_seconds = time.perf_counter() - clock
    # 3. scores at the stop token, normalised, minus the missing-EOS and repetition penalties
    clock = time.perf_counter()
    responses = [r.strip() for r in tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]
    raw_scores = scorer(local_prompts, responses, local_references).to(accelerator.device)
    distinct = distinct_shares(rollout).to(accelerator.device)
    repetition = repetition_penalties(distinct, config.distinct_floor, config.distinct_penalty)
    scores = penalised_scores(raw_scores, rollout.ended.to(accelerator.device), config.missing_eos_penalty) - repetition
    # 4-7. (in half precision, old log-probs from a full forward), reference log-probs, values, rewards with the
    # KL penalty, advantages
    with accelerator.autocast():
        if accelerator.mixed_precision != "no":
            rollout = dataclasses.replace(rollout, logprobs=recomputed_logprobs(
                forwards, rollout, config.temperature, config.forward_groups))
        ref_logprobs = reference_logprobs(forwards, reference, rollout, config.temperature, config.forward_groups)
        experience = make_experience(rollout, ref_logprobs, critic, scores, state.kl_control.value, config,
                                     total=summed_over_processes(accelerator))
    # 8. PPO epochs
    stats = ppo_epochs(policy, critic, optimizer, experience, config, state.generator, accelerator)
    update_seconds = time.perf_counter() - clock
    metrics = update_metrics(accelerator, experience, scores, raw_scores, distinct, repetition, stats, state, config)
    metrics.update({"timing/generate": generate_seconds, "timing/update": update_seconds,
                    "eps": config.batch_size / (generate_seconds + update_seconds)})  # episodes a second, as TRL
    kl = experience.kl.sum(-1)
    samples = [[p[-1]["content"], r, round(s, 4), round(k, 4)]
               for p, r, s, k in zip(local_prompts, responses, scores.tolist(), kl.tolist())]
    return metrics, samples


def distinct_shares(rollout) -> torch.Tensor:
    """Each answer's share of distinct 4-grams, over its own tokens."""
    return torch.tensor([distinct_ngram_share(row[:int(n)].tolist())
                         for row, n in zip(rollout.response_ids, rollout.response_mask.sum(-1))])


def update_metrics(accelerator, experience, scores, raw_scores, distinct, repetition, stats: list[dict],
                   state: LoopState, config: PPOStageConfig) -> dict:
    """TRL's former PPO metric names: episode metrics over the whole batch (gathered from every process), update
    statistics averaged over minibatches and processes."""
    mask = experience.rollout.response_mask
    per_episode = accelerator.gather(torch.stack([
        scores.float(), raw_scores.float(), experience.kl.sum(-1), mask.sum(-1).float(),
        experience.rollout.ended.float().to(scores.device), masked_row_mean(experience.advantages, mask), distinct,
        repetition], 1))
    score, raw, kl, length, ended, advantage, distinct, repetition = per_episode.T
    keys = list(stats[0])
    averaged = accelerator.reduce(torch.tensor([sum(s[k] for s in stats) / len(stats) for k in keys],
                                               device=accelerator.device), "mean")
    kl_coef = state.kl_control.value
    return {"objective/kl": kl.mean().item(), "objective/scores": score.mean().item(),
            "objective/raw_scores": raw.mean().item(),
            "objective/non_score_reward": (-kl_coef * kl).mean().item(),
            "objective/rlhf_reward": (score - kl_coef * kl).mean().item(),
            "val/num_eos_tokens": int(ended.sum().item()), "val/response_length": length.mean().item(),
            "val/min_response_length": length.min().item(), "val/advantage_avg": advantage.mean().item(),
            "val/distinct_4grams": distinct.mean().item(),  # falls as the answers repeat themselves
            "objective/distinct_penalty": repetition.mean().item(),  # taken off the scores below distinct_floor
            **dict(zip(keys, averaged.tolist())), "kl_coef": kl_coef, "episodes_per_update": config.batch_size,
            "episode": state.update * config.batch_size}


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def report(tracker, update: int, metrics: dict, samples: list[list], config: PPOStageConfig, is_main: bool) -> None:
    """Metrics every logging_steps updates, a table of this process's answers every sample_every updates."""
    if update % config.logging_steps == 0:
        tracker.log(metrics, step=update)
        if is_main:
            print(f"[{STAGE}] update {update}/{config.num_updates}: score {metrics['objective/scores']:.3f}, "
                  f"kl {metrics['objective/kl']:.3f}, ratio {metrics['val/ratio']:.3f}, "
                  f"length {metrics['val/response_length']:.1f}, generate {metrics['timing/generate']:.1f}s, "
                  f"update {metrics['timing/update']:.1f}s", flush=True)
    if config.sample_every and update % config.sample_every == 0:
        tracker.log_table("samples", ["prompt", "response", "score", "kl"], samples, step=update)
        if is_main:
            prompt, response, score_, kl = samples[0]
            print(f"[{STAGE}] sample: {prompt[:60]!r} -> {response[:100]!r} (score {score_:.3f}, kl {kl:.3f})",
                  flush=True)


def warn(tracker, update: int, alerts: dict[str, str], printed: set, is_main: bool) -> None:
    """Logs the update's count of alerts. Prints each check's alert the first time it fires, and over-optimisation
    every time: an alert that holds for the whole run (a default run cuts its answers on purpose) would otherwise
    print at every update and bury the step log."""
    tracker.log({"health/alerts": len(alerts)}, step=update)
    if is_main:
        for check, alert in alerts.items():
            if check not in printed or check == OVEROPTIMISATION:
                repeats = "" if check == OVEROPTIMISATION else " (its repeats are counted at the end, not printed)"
                print(f"[{STAGE}] ALERT at update {update}: {alert}{repeats}", flush=True)
        printed.update(alerts)


def print_alert_counts(history: list[dict], config: PPOStageConfig) -> None:
    """How many updates each health check fired at (the repeats `warn` did not print)."""
    fired = collections.Counter(check for metrics in history for check in health_alerts(metrics, config))
    if fired:
        counts = ", ".join(f"{check} in {count} of {len(history)} updates" for check, count in fired.items())
        print(f"[{STAGE}] health alerts: {counts}", flush=True)


@torch.no_grad()
def evaluate(accelerator, policy, tokenizer, checked: CheckedInputs, scorer, config: PPOStageConfig) -> dict:
    """Greedy answers to the eval prompts (on the main process, its result shared with every process), scored
    like training (without missing_eos_penalty and distinct_floor, training signals) and by the judge (with the
    judge's standard error over the prompts)."""
    result = {}
    eval_prompts, judge, references = checked.eval_prompts, checked.judge, checked.eval_references
    with whole_policy(policy, accelerator) as model:  # sharded, every process gathers; the main process answers
        if accelerator.is_main_process:
            with accelerator.autocast():
                answers = generate_responses(model, tokenizer, eval_prompts, config.response_length, batch_size=32)
            result["eval/score"] = scorer(eval_prompts, answers, references).mean().item()
            if judge:
                judged = judge_scores(judge, [p[-1]["content"] for p in eval_prompts], answers, references)
                result["eval/judge"] = statistics.fmean(judged)
                result["eval/judge_sem"] = statistics.stdev(judged) / len(judged) ** 0.5 if len(judged) > 1 else 0.0
                result[JUDGE_SCORES] = judged  # each prompt's, for the over-optimisation alert's paired differences
            result["eval/response_words"] = statistics.fmean(len(a.split()) for a in answers)
    return broadcast_object_list([result])[0]


def logged(result: dict) -> dict:
    """An eval point's numbers for the trackers (each prompt's judge score stays in the run's evals.json)."""
    return {key: value for key, value in result.items() if key != JUDGE_SCORES}


def summed_over_processes(accelerator):
    """A tensor summed over every process (as it is, for one process)."""
    if accelerator.num_processes == 1:
        return this_process
    return lambda tensor: accelerator.reduce(tensor.detach(), reduction="sum")


def record_eval(state: LoopState, result: dict, kl_before: float | None = 0.0) -> str | None:
    """Adds an eval point at the KL of the latest update's rollout, sampled just before its optimiser step (so one
    step behind the policy evaluated; before training, `kl_before`: 0 in round 1, unknown in a later round, whose
    policy has moved from the reference already); the over-optimisation alert, if due."""
    kl = state.history[-1]["objective/kl"] if state.history else kl_before
    state.evals.append({"update": state.update, "kl": kl, **result})
    return overoptimisation_alert(state.evals)


@contextmanager
def whole_policy(policy, accelerator):
    """The policy module with all its weights on this process, for answering without gradients: gathered from the
    shards under FSDP2 or ZeRO-3 (every process must enter), as it is under DDP."""
    with torch.no_grad():
        if isinstance(policy, Part):
            with gathered_policy(policy) as module:
                yield module
        else:
            module = accelerator.unwrap_model(policy)
            with full_parameters(module):
                yield module


def module_of(model, accelerator):
    return model.module if isinstance(model, Part) else accelerator.unwrap_model(model)


def row_seed(seed: int, update: int, row: int) -> int:
    """The sampling seed of one answer: its round's seed, the update and its row in the global batch (within the
    generators' 64 bits)."""
    return ((seed * 1_000_003 + update) * 100_003 + row) % 2 ** 63


def shards(sharded: bool, policy, critic, optimizer):
    """What a checkpoint writes beside accelerate's state when it holds no model: under FSDP the models' and
    optimiser's shards, under ZeRO-3 the engine's partitions."""
    if isinstance(policy, Part):
        return lambda folder: save_partitions(folder, optimizer)
    return (lambda folder: save_shards(folder, policy, critic, optimizer)) if sharded else None


def check_in_sync(accelerator, *models) -> None:
    """Every process must end with the same weights (DDP averages the gradients); a difference means the
    processes trained apart, and the published model would be one process's alone."""
    if accelerator.num_processes == 1:
        return
    local = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in models]).to(accelerator.device)
    every = accelerator.gather(local[None]).view(accelerator.num_processes, -1)
    if not torch.allclose(every, every[0].expand_as(every), rtol=1e-6):
        raise RuntimeError(f"processes ended with different weights (per-process sums {every.tolist()}): "
                           "gradients were not shared")


def summarise(state: LoopState, eval_after: dict, accelerator, config: PPOStageConfig, seconds: float,
              checkpoint: str | None) -> dict:
    history = state.history
    timed = history[1:] or history  # the first update warms up
    window = max(1, len(history) // 10)  # training scores and KL: means over the first and last tenth of updates
    summary = {"updates": state.update, "episodes": state.update * config.batch_size,
               "processes": accelerator.num_processes,
               "start_score": statistics.fmean(m["objective/scores"] for m in history[:window]),
               "end_score": statistics.fmean(m["objective/scores"] for m in history[-window:]),
               "final_kl": statistics.fmean(m["objective/kl"] for m in history[-window:]),
               "kl_budget": config.kl_alert,
               "alerts": sum(bool(health_alerts(m, config)) for m in history),
               "median_step_s": statistics.median(m["timing/generate"] + m["timing/update"] for m in timed),
               "median_generate_s": statistics.median(m["timing/generate"] for m in timed),
               "resumed_from_update": checkpoint_step(checkpoint)}
    for key, value in logged(state.eval_before).items():
        summary[f"{key.replace('/', '_')}_before"] = value
    for key, value in logged(eval_after).items():
        summary[f"{key.replace('/', '_')}_after"] = value
    return summary


def save_policy(policy, tokenizer, folder: Path, merged_lora: bool, weights: dict | None = None) -> None:
    """The trained policy as a plain model: LoRA adapters are merged into a copy of the weights. `weights`: the
    full state dict, gathered from the shards (FSDP2, ZeRO-3)."""
    if merged_lora:
        policy = copy.deepcopy(policy).merge_and_unload()
    policy.save_pretrained(str(folder), state_dict=weights)
    tokenizer.save_pretrained(str(folder))


PPO_STAGE = Stage("ppo", "PPO against the reward model (our trainer on accelerate)", PPOStageConfig, inputs,
                  checked_inputs, train, trains=True, files=files)
