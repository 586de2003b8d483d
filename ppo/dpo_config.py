"""`dpo:` section of a run config: TRL's `DPOConfig` plus where the pairs and the starting model come from.

Every field of `trl.DPOConfig` (and so of `transformers.TrainingArguments`) is a valid key: `beta`, `loss_type`,
`max_length`, `precompute_ref_log_probs`, ... Defaults that differ from TRL's are set here on purpose: precision
from the hardware (TRL: bf16 always), checkpoints kept small, sequences cut at 512 tokens, pairs of similar length
batched together.
"""
from dataclasses import dataclass, field

import trl

from rlhf import hardware
from rlhf.batching import LENGTH_GROUPED
from rlhf.config import TrainingStageDefaults
from rlhf.preference_pairs import SELECTIONS, TIE_POLICIES

PAIR_SOURCES = ("labels", "on_policy")


@dataclass
class DPOStageConfig(TrainingStageDefaults, trl.DPOConfig):
    model: str = field(default="", metadata={
        "help": "Policy to start from, also the frozen reference; empty: this run's SFT output (runs/<name>/sft)."})
    pairs: str = field(default="labels", metadata={
        "help": "labels: the labellers' votes (preferences); on_policy: fresh pairs sampled from the starting "
                "policy and ordered by the reward model (reward-model-labelled DPO)."})

    # pairs: labels
    preferences: str = field(default="", metadata={
        "help": "With pairs: labels. A label export folder, any preference file, or a label store URL (exported "
                "first into runs/<name>/exports/<hash>); empty: runs/<name>/preferences."})
    batch: str = field(default="", metadata={"help": "With a store URL: export only this batch (empty: all)."})
    min_votes: int = field(default=1, metadata={"help": "With a store URL: comparisons with fewer votes are left out."})
    ties: str = field(default="drop", metadata={
        "help": "Tied pairs: drop, or equal (implicit rewards pulled together by the tie-aware Bradley-Terry loss, "
                "as in the reward stage)."})
    tie_threshold: float = field(default=1.0, metadata={
        "help": "With ties: equal, the implicit-reward gap inside which a tie is likely (Rao-Kupper theta)."})
    selection: str = field(default="all", metadata={
        "help": "Which labelled pairs to learn from: all, or best_worst (one per prompt: with k answers per prompt "
                "all compared, the answer that won most against the one that won least)."})
    group_by_prompt: bool = field(default=True, metadata={
        "help": "With selection all: a batch holds whole prompts (their pairs one after another, prompts in random "
                "order) and runs each distinct answer once for all its pairs, as the reward stage does: k answers "
                "with all their pairs cost k sequences per prompt, not k(k - 1). Off, or with one pair per prompt: "
                "pairs of similar length share a batch."})
    share_prompt: bool = field(default=True, metadata={
        "help": "With prompt batches: each prompt runs once per batch and its answers on its cached keys and "
                "values, as in the reward stage (the same loss from fewer tokens: a prompt is often longer than its "
                "answers). Used in single-process runs without gradient checkpointing, with loss_type sigmoid."})
    use_margin: bool = field(default=False, metadata={
        "help": "Pass each pair's margin (labellers' strength: slight 0.5, clear 1.0) to the loss, which then asks "
                "for an implicit-reward gap (beta x log-ratio difference) that wide. Off by default: with beta 0.1 "
                "a margin of 1 asks for 10 nats."})
    weight_by_gold: bool = field(default=False, metadata={
        "help": "Weight labellers' votes by their gold accuracy, as in the reward stage (needs a label export)."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of prompts held out, with all their pairs, for the implicit reward's accuracy (split "
                "by a hash of the prompt and seed)."})

    # pairs: on_policy
    reward_model: str = field(default="", metadata={
        "help": "With pairs: on_policy. The reward model ordering each pair; empty: this run's reward output."})
    prompts: str = field(default="data/rl_prompts.jsonl", metadata={
        "help": "With pairs: on_policy. Prompts to answer."})
    num_prompts: int = field(default=0, metadata={"help": "With pairs: on_policy. The first N prompts (0: all)."})
    responses_per_prompt: int = field(default=2, metadata={
        "help": "With pairs: on_policy. Answers per prompt; the reward model's best is chosen, its worst rejected."})
    max_new_tokens: int = field(default=64, metadata={"help": "With pairs: on_policy. Longest sampled answer."})
    generation_batch_size: int = field(default=32, metadata={
        "help": "With pairs: on_policy. Answers generated at once."})
    temperature: float = field(default=0.7, metadata={"help": "With pairs: on_policy. Sampling temperature."})

    # TRL fields whose defaults we change.
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized prompt + answer."})
    train_sampling_strategy: str = field(default=LENGTH_GROUPED, metadata={
        "help": "length_grouped: pairs of similar length share a batch, the batches in random order (a quarter "
                "fewer padded tokens on the default run's pairs); or transformers' random, sequential, "
                "group_by_length, batch_rebalance."})

    def __post_init__(self):
        hardware.configure_training_args(self)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 (or null: no limit), got {self.max_length}")
        if self.pairs not in PAIR_SOURCES:
            raise ValueError(f"pairs must be one of {', '.join(PAIR_SOURCES)}, got '{self.pairs}'")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got '{self.ties}'")
        if self.ties == "equal" and self.tie_threshold <= 0:
            raise ValueError(f"tie_threshold must be above 0 with ties: equal, got {self.tie_threshold}")
        if self.ties == "equal" and self.selection == "best_worst":
            raise ValueError("ties: equal needs selection: all (best_worst keeps one decided pair per prompt, no tie)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.temperature <= 0 or self.max_new_tokens < 1 or self.num_prompts < 0:
            raise ValueError("temperature must be above 0, max_new_tokens at least 1, num_prompts 0 or more")
        if self.responses_per_prompt < 2 or self.generation_batch_size < 1:
            raise ValueError("responses_per_prompt must be at least 2 and generation_batch_size at least 1")
        super().__post_init__()
        if self.loss_type != ["sigmoid"] and (self.ties == "equal" or self.use_margin or self.weight_by_gold):
            raise ValueError(f"ties: equal, use_margin and weight_by_gold need loss_type sigmoid (the "
                             f"Bradley-Terry loss they extend), got {self.loss_type}")
        if self.ld_alpha is not None and self.pair_loss:
            raise ValueError("ld_alpha (length-desensitised DPO) needs a loss_type other than sigmoid: our sigmoid "
                             "loss sums each answer's log-probabilities whole")
        if self.pair_loss and (self.f_divergence_type != "reverse_kl" or self.use_weighting
                               or self.loss_weights not in (None, [1.0])):
            raise ValueError("f_divergence_type, use_weighting and loss_weights are TRL's own loss's: our sigmoid "
                             "loss (loss_type sigmoid) is plain DPO's reverse KL, one term, unweighted by length")

    @property
    def prompt_batches(self) -> bool:
        """Batches of whole prompts: only the labellers' pairs with every pair kept have several pairs a prompt."""
        return self.group_by_prompt and self.pairs == "labels" and self.selection == "all"

    @property
    def pair_loss(self) -> bool:
        """Our Bradley-Terry loss (ties, margins, weights) in place of TRL's sigmoid loss: the same loss when a
        batch has no tie, no margin and equal weights."""
        return self.loss_type == ["sigmoid"]
