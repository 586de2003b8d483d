"""`sft:` section of a run config: TRL's `SFTConfig` plus where the model and data come from.

Every field of `trl.SFTConfig` (and so of `transformers.TrainingArguments`) is a valid key. The defaults that
differ from TRL's are set here on purpose: precision from the hardware (TRL: bf16 always), gradient
checkpointing only when memory needs it (TRL: always), loss on assistant tokens only, packing chosen by device.
"""
from dataclasses import dataclass, field

import trl

from rlhf import hardware
from rlhf.batching import LENGTH_GROUPED
from rlhf.config import TrainingStageDefaults


@dataclass
class SFTStageConfig(TrainingStageDefaults, trl.SFTConfig):
    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "Model to fine-tune: a bundled name (rlhf models list), a local folder, or a hub id."})
    train_data: str = field(default="data/sft_demonstrations.jsonl", metadata={
        "help": "Demonstrations: JSONL/JSON/Parquet/CSV, a saved HF dataset folder, or a hub id; rows in "
                "'messages' form or 'prompt'/'completion'."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of demonstrations held out for eval loss (split by a hash of id and seed)."})
    sample_prompts: str = field(default="data/eval_prompts.jsonl", metadata={
        "help": "Prompts answered before and after training to show what changed ('' for none)."})
    num_samples: int = field(default=4, metadata={"help": "How many sample prompts to answer."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length limit for sample answers."})

    # TRL fields whose defaults we change.
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "Loss on assistant tokens only (masks computed from the chat template, any template)."})
    packing: bool | None = field(default=None, metadata={
        "help": "Pack examples into rows of max_length without padding (best-fit decreasing); each example "
                "attends only to itself. Unset: on with CUDA, off on a CPU (measured faster there: one long "
                "packed row costs more attention than padding does). Unpacked CPU batches are grouped by length "
                "(train_sampling_strategy: length_grouped) unless train_sampling_strategy is set."})
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized example (or packed row)."})

    def __post_init__(self):
        # Derived right after parsing, before TrainingArguments validates them.
        hardware.configure_training_args(self)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be at least 1 (or null: no limit), got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.num_samples < 0 or self.sample_max_new_tokens < 1:
            raise ValueError(f"num_samples must be 0 (none) or more and sample_max_new_tokens at least 1, got "
                             f"{self.num_samples} and {self.sample_max_new_tokens}")
        if self.eval_fraction == 0 and self.eval_strategy != "no":
            raise ValueError(f"eval_strategy={self.eval_strategy} needs held-out data: set eval_fraction above 0")
        if self.packing is None:
            self.packing = self.hardware.device == "cuda"
        if not self.packing and self.hardware.device != "cuda" and self.train_sampling_strategy == "random":
            self.train_sampling_strategy = LENGTH_GROUPED
        super().__post_init__()
