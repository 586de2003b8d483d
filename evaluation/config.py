"""`eval:` section of a run config: which policies to compare with the SFT model, on which prompts, scored how."""
import os
from dataclasses import dataclass, field

from rlhf import hardware


@dataclass
class EvalStageConfig:
    policies: str = field(default="", metadata={
        "help": "Comma-separated policies to compare with the baseline: this run's stages (ppo, dpo) or NAME=FOLDER; "
                "empty: every policy stage this run has published."})
    baseline: str = field(default="", metadata={"help": "The policy compared against; empty: this run's SFT model."})
    prompts: str = field(default="data/eval_prompts.jsonl", metadata={"help": "Held-out prompts."})
    num_prompts: int = field(default=0, metadata={"help": "The first N prompts (0: all)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer, in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy answers; above 0: sampled at it."})
    reward_model: str = field(default="", metadata={
        "help": "Reward model scoring the answers (normalised by its stored scale); empty: this run's reward "
                "output; none: no reward scores."})
    judge: str = field(default="", metadata={
        "help": "Also score answers with this judge (builtin:NAME or module:function); empty: none."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for win-rate intervals."})
    confidence: float = field(default=0.95, metadata={"help": "Coverage of the win-rate intervals."})
    human: bool = field(default=False, metadata={
        "help": "Also queue blind baseline-vs-policy comparisons into the label store (`rlhf label stats --batch` "
                "reports the human win rate)."})
    db: str = field(default="", metadata={"help": "With human: the label store URL (empty: $RLHF_DB_URL, else the "
                                                   "run's own store, runs/<name>/labels.db)."})
    human_batch: str = field(default="", metadata={
        "help": "With human: the batch the comparisons go into; empty: eval-KEY, KEY standing for the models compared, "
                "the prompts and the answers (an eval of retrained policies, or of other answers, queues anew; the "
                "same eval again reads the votes; a named batch holding other answers is refused)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    score_batch_size: int = field(default=8, metadata={
        "help": "Answers per forward pass when scoring them and computing their KL, shortest first: small "
                "batches of similar length pad little (48 answers' KL here: 11 s in batches of 8, 23 s in one)."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling (temperature above 0) and the bootstrap."})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 for generation."})

    def __post_init__(self):
        self.hardware = hardware.choose(self.precision)
        if self.temperature < 0 or self.max_new_tokens < 1 or self.num_prompts < 0 or self.batch_size < 1 \
                or self.score_batch_size < 1:
            raise ValueError("temperature must be 0 or more, max_new_tokens, batch_size and score_batch_size at "
                             "least 1, num_prompts 0 or more")
        if self.bootstrap < 10 or not 0 < self.confidence < 1:
            raise ValueError("bootstrap must be at least 10 and confidence in (0, 1)")

    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", 0))
