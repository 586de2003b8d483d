"""`reward:` section of a run config: TRL's `RewardConfig` plus where the pairs and the starting model come from.

Every field of `trl.RewardConfig` (and so of `transformers.TrainingArguments`) is a valid key, including
`center_rewards_coefficient` (pulls the mean reward towards 0) and `max_length`. Defaults that differ from TRL's
are set here on purpose: precision from the hardware (TRL: bf16 always), checkpoints kept small.
"""
from dataclasses import dataclass, field

import trl

from rlhf import hardware
from rlhf.config import TrainingStageDefaults
from rlhf.preference_pairs import SELECTIONS, TIE_POLICIES
from rlhf.reward_model import POOLINGS


@dataclass
class RewardStageConfig(TrainingStageDefaults, trl.RewardConfig):
    model: str = field(default="", metadata={
        "help": "Model to start from; empty: this run's SFT output (runs/<name>/sft). A bundled name, a folder "
                "or a hub id also work. A one-output classification head is added on top."})
    preferences: str = field(default="", metadata={
        "help": "Preference pairs: a label export folder (rlhf label export), any preference file, or a label "
                "store URL (sqlite:///..., postgresql://...: exported first into runs/<name>/exports/<hash>); "
                "empty: runs/<name>/preferences."})
    batch: str = field(default="", metadata={"help": "With a store URL: export only this batch (empty: all)."})
    min_votes: int = field(default=1, metadata={"help": "With a store URL: comparisons with fewer votes are left out."})
    ties: str = field(default="drop", metadata={
        "help": "Tied pairs: drop, or equal (trained towards equal rewards with a tie-aware Bradley-Terry loss)."})
    tie_threshold: float = field(default=1.0, metadata={
        "help": "With ties: equal, the reward gap inside which a tie is likely (Rao-Kupper theta, above 0)."})
    selection: str = field(default="all", metadata={
        "help": "Which labelled pairs to learn from: all, or best_worst (one per prompt: with k answers per prompt "
                "all compared, the answer that won most against the one that won least)."})
    ranking_loss: str = field(default="pairs", metadata={
        "help": "Ranking items' pairs (preferences.feedback: ranking): pairs (each pair's Bradley-Terry loss, the "
                "item's pairs weighted as one observation), or plackett_luce (one Plackett-Luce likelihood of the "
                "item's order, read from its pairs' verdicts, per item; needs group_by_prompt)."})
    use_margin: bool = field(default=True, metadata={
        "help": "Pass each pair's margin (from the labellers' strength: slight 0.5, clear 1.0) to the loss."})
    weight_by_gold: bool = field(default=False, metadata={
        "help": "Weight each labeller's votes by their gold accuracy ((correct + 1) / (answered + 2)): a weighted "
                "majority decides the pair and its loss weight. Needs a label export (it holds the gold records)."})
    ensemble: int = field(default=1, metadata={
        "help": "Reward heads on one backbone, each trained on its own bootstrap resample of the pairs; their "
                "mean is the reward and their spread the uncertainty."})
    pooling: str = field(default="last_token", metadata={
        "help": "How the head reads a sequence: last_token (TRL's reward model: the head at the last token), or "
                "answer_mean (the head at every answer token, averaged). Saved with the model, so every stage "
                "scores the way it was trained. From a few hundred pairs answer_mean learned the length, keywords "
                "and readability judges 4-11 points better (docs/benchmarks.md, \"Reward pooling\")."})
    num_layers: int = field(default=0, metadata={
        "help": "Keep only the starting model's first N decoder layers under the head (0: all). A cut model trains "
                "and scores in proportion faster, and PPO's critic, which starts as the reward model, with it. On "
                "SmolLM2, 16 of 30 layers halved the stage and kept the tuned judges' accuracy but lost 15 points "
                "on the held-out sentiment judge (24 layers: 14) (docs/benchmarks.md, \"Sixth session\")."})
    probe_steps: int = field(default=0, metadata={
        "help": "Before training, fit the head alone on the frozen model's pooled features for this many full-batch "
                "steps (a linear probe; then fine-tuning starts from it: LP-FT); 0: the head starts at random, as in "
                "TRL. Through the stage on four judges' default runs: the held-out sentiment judge 0.71 against 0.56 "
                "held-out accuracy, the three tuned judges 0.69 either way (docs/benchmarks.md, \"The reward head "
                "fitted first\")."})
    probe_l2: float = field(default=0.1, metadata={
        "help": "With probe_steps: L2 penalty on the probe's weights over standardised features."})
    group_by_prompt: bool = field(default=True, metadata={
        "help": "Batch the pairs of one prompt together and run each distinct answer once for all the pairs it is "
                "in (k answers with all pairs: k sequences per prompt instead of k(k-1)). The same loss as "
                "shuffled pairs, batched differently."})
    share_prompt: bool = field(default=True, metadata={
        "help": "Run the tokens a prompt's answers share (the prompt) once per prompt in a batch and the answers "
                "on its cached keys and values: the same loss from fewer tokens. Used in single-process runs "
                "without gradient checkpointing."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of prompts held out, with all their pairs, for accuracy (split by a hash of the "
                "prompt and seed)."})
    round_init: str = field(default="sft", metadata={"later_rounds": True, "help": (
        "Online rounds 2 and later: the reward model trains on every round's votes starting from the SFT model "
        "(sft: a new head, fitted by the probe) or from the previous round's reward model (previous: no probe). "
        "bench/online_rounds.py, three rounds against one: gain ratio 1.42 from sft, 0.76 continued "
        "(docs/benchmarks.md, \"Online rounds\").")})
    # evaluation only: outside the config hash, so changing them retrains nothing (`rlhf reward eval` redoes it)
    gold: str = field(default="data/gold_comparisons.jsonl", metadata={
        "hashed": False, "help": "Comparisons with a known answer for the evaluation's gold accuracy (empty: none). "
                                 "Evaluation only."})
    calibration_bins: int = field(default=10, metadata={
        "hashed": False, "help": "Bins of the reliability plot and the ECE. Evaluation only."})

    # TRL fields whose defaults we change.
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized prompt + response."})

    def __post_init__(self):
        hardware.configure_training_args(self)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 (or null: no limit), got {self.max_length}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got '{self.selection}'")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        if self.ranking_loss not in ("pairs", "plackett_luce"):
            raise ValueError(f"ranking_loss must be pairs or plackett_luce, got '{self.ranking_loss}'")
        if self.ranking_loss == "plackett_luce" and not self.group_by_prompt:
            raise ValueError("ranking_loss plackett_luce needs group_by_prompt: a ranking's answers must share batches")
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got '{self.ties}'")
        if self.ties == "equal" and self.tie_threshold <= 0:
            raise ValueError(f"tie_threshold must be above 0 with ties: equal, got {self.tie_threshold}")
        if self.ties == "equal" and self.selection == "best_worst":
            raise ValueError("ties: equal needs selection: all (best_worst keeps one decided pair per prompt, no tie)")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be 0 (all) or more, got {self.num_layers}")
        if self.round_init not in ("sft", "previous"):
            raise ValueError(f"round_init must be sft or previous, got '{self.round_init}'")
        if self.probe_steps < 0 or self.probe_l2 < 0:
            raise ValueError(f"probe_steps and probe_l2 must be 0 or more, got {self.probe_steps} and {self.probe_l2}")
        if self.ensemble < 1 or self.calibration_bins < 1:
            raise ValueError("ensemble and calibration_bins must be at least 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.pad_token is not None:  # TRL would switch the model's pad id after our collator took the tokenizer's
            raise ValueError(f"pad_token ('{self.pad_token}'): the stage picks the pad token itself (the tokenizer's, "
                             "else a spare special token), which its batches and the model's pooling must share")
        super().__post_init__()
