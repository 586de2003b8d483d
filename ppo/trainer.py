"""`rlhf ppo`: PPO on the policy, against the reward model (or a programmatic reward), KL-penalised towards the
frozen starting policy.

Each update, top to bottom:
  1. take the next `batch_size` prompts (reshuffled every pass over them);
  2. sample responses (ppo/rollout.py: left-padded, KV cache, temperature, cut at the stop token);
  3. score prompt + response with the reward model at its last real token, normalised by the scale the reward
     stage stored, minus the missing-EOS penalty;
  4-7. reference log-probs, values, per-token rewards with the KL penalty, GAE advantages (ppo/update.py);
  8. `num_ppo_epochs` passes of shuffled minibatches updating policy and critic with one optimiser;
  9. log TRL's former PPO metrics, a sample table, health alerts; adapt the KL coefficient.
This first version runs in one process; the accelerate launch, LoRA, checkpoints for exact resume and the
acceptance run are still to come (issue 5).
"""
import copy
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import disable_dropout_in_model

from ppo.config import PPOStageConfig
from ppo.core import AdaptiveKLController, FixedKLController, masked_mean, penalised_scores
from ppo.rollout import generate
from ppo.update import make_experience, ppo_epochs
from rlhf import models
from rlhf.config import RunConfig
from rlhf.datasets import load_rows
from rlhf.errors import MissingInputError
from rlhf.judges import load_judge
from rlhf.reward_model import load_reward_model, reward_heads, reward_record, reward_tokenizer, score
from rlhf.runs import RunDir
from rlhf.stage import running_stage

STAGE = "ppo"


def inputs(config: PPOStageConfig, run: RunConfig) -> dict:
    run_dir = RunDir(run.output_root, run.name)
    policy = config.model or str(run_dir.stage_path("sft"))
    if not config.model and not (Path(policy) / "config.json").exists():
        raise MissingInputError(f"no SFT model at {policy}: run `rlhf sft --config ...` first, or set --ppo.model")
    found = {"policy": models.resolve(policy), "prompts": config.prompts}
    if config.reward_function:
        return found
    reward = config.reward_model or str(run_dir.stage_path("reward"))
    if not (Path(reward) / "config.json").exists():
        raise MissingInputError(f"no reward model at {reward}: run `rlhf reward --config ...` first, or set "
                                "--ppo.reward_model (or --ppo.reward_function)")
    return {**found, "reward_model": reward}


class Scorer:
    """Scores (prompt, response) pairs: the reward model on the chat-templated conversation, normalised by its
    stored scale, or a programmatic reward function of the texts."""

    def __init__(self, config: PPOStageConfig, reward_model: str | None):
        self.function = load_judge(config.reward_function) if config.reward_function else None
        self.mean, self.std = 0.0, 1.0
        if reward_model:
            self.tokenizer = reward_tokenizer(reward_model)
            self.model = load_reward_model(reward_model, self.tokenizer).requires_grad_(False)
            scale = reward_record(reward_model).get("scale")
            if config.normalize_reward and scale:
                self.mean, self.std = scale["mean"], scale["std"]

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        if self.function:
            return torch.tensor(self.function([p[-1]["content"] for p in prompts], responses), dtype=torch.float)
        conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return (torch.tensor(score(self.model, self.tokenizer, conversations)) - self.mean) / self.std


def main(config: PPOStageConfig, run: RunConfig) -> dict:
    found = inputs(config, run)
    with running_stage(run, STAGE, config, found) as (record, tracker):
        return train(config, run, found, tracker, record)


def train(config: PPOStageConfig, run: RunConfig, found: dict, tracker, record) -> dict:
    run_dir = RunDir(run.output_root, run.name)
    partial = run_dir.partial_path(STAGE)
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    # models: policy, its frozen copy as reference, a critic from the reward model (or the policy), the scorer
    policy, tokenizer = models.load_causal_lm(found["policy"])
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = found.get("reward_model")
    critic = AutoModelForSequenceClassification.from_pretrained(  # an ensemble's heads are averaged into one value
        reward_model or found["policy"], num_labels=reward_heads(reward_model) if reward_model else 1,
        dtype=torch.float32)
    for model in (policy, reference, critic):
        disable_dropout_in_model(model)
    scorer = Scorer(config, reward_model)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=config.learning_rate,
                                  eps=1e-5)
    kl_control = (AdaptiveKLController(config.kl_coef, config.target_kl, config.horizon) if config.target_kl
                  else FixedKLController(config.kl_coef))
    prompts = [row["prompt"] for row in load_rows(config.prompts, "prompt")]
    order: list[int] = []
    history, started = [], time.time()
    for update in range(1, config.num_updates + 1):
        # 1. prompts
        while len(order) < config.batch_size:
            order += torch.randperm(len(prompts), generator=generator).tolist()
        batch_prompts, order = [prompts[i] for i in order[:config.batch_size]], order[config.batch_size:]
        # 2. rollout
        clock = time.perf_counter()
        rollout = generate(policy, tokenizer, batch_prompts, config.response_length, config.temperature)
        generate_seconds = time.perf_counter() - clock
        # 3. scores
        clock = time.perf_counter()
        responses = tokenizer.batch_decode(rollout.response_ids.masked_fill(rollout.response_mask == 0,
                                                                            tokenizer.pad_token_id),
                                           skip_special_tokens=True)
        raw_scores = scorer(batch_prompts, [r.strip() for r in responses])
        scores = penalised_scores(raw_scores, rollout.ended, config.missing_eos_penalty)
        # 4-7. reference, values, rewards, advantages
        experience = make_experience(rollout, reference, critic, scores, kl_control.value, config)
        # 8. PPO epochs
        stats = ppo_epochs(policy, critic, optimizer, experience, config, generator)
        update_seconds = time.perf_counter() - clock
        # 9. metrics and the KL coefficient
        metrics = update_metrics(experience, scores, raw_scores, stats, kl_control.value, generate_seconds,
                                 update_seconds, update, config)
        kl_control.update(metrics["objective/kl"], config.batch_size)
        history.append(metrics)
        if update % config.logging_steps == 0:
            tracker.log(metrics, step=update)
            print(f"[{STAGE}] update {update}/{config.num_updates}: score {metrics['objective/scores']:.3f}, "
                  f"kl {metrics['objective/kl']:.3f}, ratio {metrics['val/ratio']:.3f}, "
                  f"generate {generate_seconds:.1f}s, update {update_seconds:.1f}s", flush=True)

    # publish the policy
    staged = partial / "final"
    policy.save_pretrained(str(staged))
    tokenizer.save_pretrained(str(staged))
    summary = {"updates": config.num_updates, "episodes": config.num_updates * config.batch_size,
               "first_score": history[0]["objective/scores"], "last_score": history[-1]["objective/scores"],
               "final_kl": history[-1]["objective/kl"]}
    record.publish(staged, partial, summary, time.time() - started)
    return {"history": history, **summary}


def update_metrics(experience, scores, raw_scores, stats: list[dict], kl_coef: float, generate_seconds: float,
                   update_seconds: float, update: int, config: PPOStageConfig) -> dict:
    """TRL's former PPO metric names, averaged over the update's minibatches, plus timings."""
    mask = experience.rollout.response_mask
    kl_per_response = experience.kl.sum(-1)
    averaged = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
    return {"objective/kl": kl_per_response.mean().item(), "objective/scores": scores.mean().item(),
            "objective/raw_scores": raw_scores.mean().item(),
            "objective/non_score_reward": (-kl_coef * kl_per_response).mean().item(),
            "objective/rlhf_reward": (scores - kl_coef * kl_per_response).mean().item(),
            "val/num_eos_tokens": int(experience.rollout.ended.sum()),
            "val/response_length": mask.sum(-1).float().mean().item(),
            "val/advantage_avg": masked_mean(experience.advantages, mask).item(),
            **averaged, "kl_coef": kl_coef, "eps": update * config.batch_size,
            "timing/generate": generate_seconds, "timing/update": update_seconds}
