"""`reward:` section of a run config: TRL's `RewardConfig` plus where the pairs and the starting model come from.

Every field of `trl.RewardConfig` (and so of `transformers.TrainingArguments`) is a valid key, including
`center_rewards_coefficient` (pulls the mean reward towards 0) and `max_length`. Defaults that differ from TRL's
are set here on purpose: precision from the hardware (TRL: bf16 always), checkpoints kept small.
"""
from dataclasses import dataclass, field

import trl

from rlhf import hardware
from rlhf.config import TrainingStageDefaults

TIE_POLICIES = ("drop",)


@dataclass
class RewardStageConfig(TrainingStageDefaults, trl.RewardConfig):
    model: str = field(default="", metadata={
        "help": "Model to start from; empty: this run's SFT output (runs/<name>/sft). A bundled name, a folder "
                "or a hub id also work. A one-output classification head is added on top."})
    preferences: str = field(default="", metadata={
        "help": "Preference pairs: a label export folder (rlhf label export) or any preference file; empty: "
                "runs/<name>/preferences."})
    ties: str = field(default="drop", metadata={"help": "What to do with tied pairs: drop."})
    use_margin: bool = field(default=True, metadata={
        "help": "Pass each pair's margin (from the labellers' strength: slight 0.5, clear 1.0) to the loss."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of pairs held out for accuracy (split by a hash of id and seed)."})

    # TRL fields whose defaults we change.
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized prompt + response."})

    def __post_init__(self):
        hardware.configure_training_args(self)
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got '{self.ties}'")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        super().__post_init__()
