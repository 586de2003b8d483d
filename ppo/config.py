"""`ppo:` section of a run config. TRL no longer has a PPO config, so this one is ours; the names follow TRL's
former `PPOConfig` (and so its dashboards and papers) wherever a name existed there. Defaults are sized for the
bundled SmolLM2-135M on a CPU; every default is explained beside it.
"""
import math
import os
from dataclasses import dataclass, field

from ppo.core import GROUP_SCALES, KL_ESTIMATORS
from rlhf import hardware


ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp")


@dataclass
class PPOStageConfig:
    algorithm: str = field(default="ppo", metadata={
        "help": "ppo (clipped surrogate, a critic and GAE), or one without a critic: grpo (each answer against its "
                "prompt's group, normalised; the KL in the loss), rloo (against the mean of the group's other "
                "answers; the KL in the reward) or reinforce_pp (REINFORCE++: returns whitened over the batch; the "
                "KL in the reward). docs/ppo.md."})
    num_generations: int = field(default=4, metadata={
        "help": "grpo, rloo, reinforce_pp: answers sampled per prompt (G). batch_size counts answers, so an update "
                "takes batch_size / G prompts. ppo samples one answer per prompt."})
    scale_rewards: str = field(default="group", metadata={
        "help": "grpo: divide each group's centred scores by the group's std (group), or not (none, as Dr. GRPO "
                "argues)."})
    # where things come from
    model: str = field(default="", metadata={
        "help": "Policy to start from (also the frozen reference); empty: this run's SFT output."})
    reward_model: str = field(default="", metadata={
        "help": "Reward model folder (also the critic's starting point); empty: this run's reward output."})
    reward_function: str = field(default="", metadata={
        "help": "Train on a programmatic reward instead of the reward model: builtin:NAME (a judge) or "
                "module:function taking (prompts, responses) and returning one float per response. A verifiable "
                "reward takes (prompts, responses, references), the prompt rows' `answer` fields: "
                "builtin:final_number (with data/arithmetic_train.jsonl)."})
    prompts: str = field(default="data/rl_prompts.jsonl", metadata={"help": "Prompts to train on."})
    eval_prompts: str = field(default="data/eval_prompts.jsonl", metadata={
        "help": "Held-out prompts scored before and after training."})
    num_eval_prompts: int = field(default=0, metadata={
        "help": "Score the first N eval prompts (0: all of them)."})
    judge: str = field(default="", metadata={
        "help": "Also score eval answers with this judge (builtin:NAME or module:function); empty: none."})
    eval_every: int = field(default=0, metadata={
        "help": "Also answer the eval prompts every N updates, to follow the judge (gold) against the reward "
                "model (proxy) as KL grows; 0: only before and after training."})

    # rollout
    total_episodes: int = field(default=256, metadata={
        "help": "Answers sampled over the whole run (PPO: one a prompt; the group methods: num_generations a "
                "prompt), rounded up to whole batches."})
    batch_size: int = field(default=8, metadata={"help": "Episodes per rollout (one PPO update each)."})
    response_length: int = field(default=32, metadata={"help": "Longest response, in tokens."})
    temperature: float = field(default=0.7, metadata={
        "help": "Sampling temperature (top_k 0, top_p 1); log-probs are recomputed at the same temperature."})
    missing_eos_penalty: float | None = field(default=1.0, metadata={
        "help": "Subtracted from the score of a response that never emits the stop token (None: no penalty)."})
    distinct_floor: float | None = field(default=None, metadata={
        "help": "An answer with fewer than this share of its 4-grams distinct (distinct_4grams, as the eval reports "
                "it) loses distinct_penalty x (floor - share) / floor from its score: against answers that repeat "
                "what a weak reward model overrates (None: no penalty)."})
    distinct_penalty: float = field(default=1.0, metadata={
        "help": "The most distinct_floor takes off a score, on the scores' scale (the reward model's normalised one "
                "by default, a reward_function's own). Part of the score, as missing_eos_penalty: grpo's group "
                "normalisation scales it with the rest."})
    normalize_reward: bool = field(default=True, metadata={
        "help": "Scores as (score - mean) / std with the reward model's scale on SFT samples (its stage.json)."})

    # update
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per pass (shuffled)."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per minibatch, to bound memory."})
    forward_groups: int = field(default=2, metadata={
        "help": "Run each forward pass as N passes over rows of similar prompt length, each without the left "
                "padding its rows share: the same numbers on fewer tokens (1: one padded pass)."})
    learning_rate: float = field(default=3e-6, metadata={"help": "AdamW learning rate, policy and critic."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip, epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss against the policy loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount (1: the score counts fully at every token)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})

    # KL to the reference
    kl_coef: float = field(default=0.05, metadata={"help": "Initial (or fixed) KL penalty coefficient, beta."})
    kl_estimator: str = field(default="k1", metadata={
        "help": "k1 (-log r, unbiased) or k3 (r - 1 - log r, unbiased, never negative)."})
    target_kl: float | None = field(default=None, metadata={
        "help": "Adapt beta towards this KL (nats per response); None: beta stays fixed."})
    horizon: int = field(default=10_000, metadata={"help": "Episodes over which beta may move by 20%."})

    # models
    use_peft: bool = field(default=False, metadata={
        "help": "Train LoRA adapters; the reference is the policy with its adapter disabled."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 (log-probs stay fp32)."})

    # bookkeeping
    seed: int = field(default=0, metadata={"help": "Seeds sampling and shuffling."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N updates."})
    sample_every: int = field(default=5, metadata={"help": "A table of sample answers every N updates (0: none)."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N updates (0: none; a killed run then "
                                                          "starts again)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint."})
    kl_alert: float = field(default=10.0, metadata={"help": "Alert when the mean KL per response passes this."})
    stop_on_alert: bool = field(default=False, metadata={"help": "Stop the run at the first health alert."})

    def __post_init__(self):
        self.hardware = hardware.choose(self.precision)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got '{self.algorithm}'")
        if self.scale_rewards not in GROUP_SCALES:
            raise ValueError(f"scale_rewards must be one of {', '.join(GROUP_SCALES)}, got '{self.scale_rewards}'")
        if self.algorithm in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(f"{self.algorithm} compares answers to the same prompt: num_generations must be at "
                             f"least 2, got {self.num_generations}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}")
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                             f"({self.num_generations}): each update answers whole groups")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got '{self.kl_estimator}'")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be above 0 for sampling, got {self.temperature}")
        if self.batch_size % (self.num_mini_batches * self.gradient_accumulation_steps):
            raise ValueError(f"batch_size ({self.batch_size}) must divide into num_mini_batches x "
                             f"gradient_accumulation_steps ({self.num_mini_batches} x "
                             f"{self.gradient_accumulation_steps})")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be above 0, got {self.target_kl}")
        if self.target_kl is not None and 5 * self.horizon <= self.batch_size:
            raise ValueError(f"horizon ({self.horizon}) must be above batch_size / 5 ({self.batch_size / 5:g}): the "
                             "controller moves kl_coef by up to 20% x batch_size / horizon an update, and at 100% or "
                             "more a KL below target would remove the KL penalty or turn it into a bonus")
        if self.logging_steps < 1:
            raise ValueError(f"logging_steps must be at least 1, got {self.logging_steps}")
        if self.kl_coef < 0 or (self.target_kl is not None and self.kl_coef == 0):
            raise ValueError(f"kl_coef must be 0 or more, and above 0 with target_kl (the controller scales it: from "
                             f"0 it stays 0), got {self.kl_coef}")
        if self.whiten_rewards and self.algorithm != "ppo":
            raise ValueError(f"whiten_rewards whitens PPO's per-token rewards before GAE; {self.algorithm} has no GAE "
                             "and would ignore it")
        if self.distinct_floor is not None and not 0 < self.distinct_floor <= 1:
            raise ValueError(f"distinct_floor is a share of distinct 4-grams, above 0 and at most 1 (None: no "
                             f"penalty), got {self.distinct_floor}")
        if self.distinct_penalty < 0:
            raise ValueError(f"distinct_penalty must be 0 or more, got {self.distinct_penalty}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be 0 (before and after only) or more, got {self.eval_every}")
        if min(self.save_steps, self.sample_every) < 0:
            raise ValueError(f"save_steps and sample_every must be 0 (none) or more, got {self.save_steps} and "
                             f"{self.sample_every}")
        if self.num_eval_prompts < 0:
            raise ValueError(f"num_eval_prompts must be 0 (all) or more, got {self.num_eval_prompts}")
        if min(self.total_episodes, self.batch_size, self.num_ppo_epochs, self.response_length,
               self.forward_groups) < 1:
            raise ValueError("total_episodes, batch_size, num_ppo_epochs, response_length and forward_groups must "
                             "be at least 1")

    @property
    def process_index(self) -> int:
        """This process's rank under torchrun or accelerate launch (0 alone)."""
        return int(os.environ.get("RANK", 0))

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    @property
    def group_size(self) -> int:
        """Answers per prompt in a batch: num_generations for the critic-free methods, 1 for PPO."""
        return 1 if self.uses_critic else self.num_generations

    @property
    def num_updates(self) -> int:
        """Rounded up, as TRL does: every episode asked for is trained on (the last batch is a whole one)."""
        return max(1, math.ceil(self.total_episodes / self.batch_size))
