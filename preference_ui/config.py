"""`labels:` section of a run config: how candidate responses are sampled into the label store."""
from dataclasses import dataclass, field


@dataclass
class LabelsConfig:
    model: str = field(default="", metadata={
        "help": "Model that answers the prompts; empty: this run's SFT output (runs/<name>/sft)."})
    prompts: str = field(default="data/rl_prompts.jsonl", metadata={"help": "Prompts to sample responses for."})
    num_prompts: int = field(default=0, metadata={"help": "Use the first N prompts (0: all)."})
    responses_per_prompt: int = field(default=2, metadata={
        "help": "k responses per prompt; every pair of them becomes a comparison (k choose 2)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (top_k 0, top_p 1)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated for at once."})
    batch: str = field(default="", metadata={"help": "Name of the comparison batch; empty: the run name."})
    db: str = field(default="", metadata={"help": "Label store URL; empty: $RLHF_DB_URL or sqlite:///runs/labels.db."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling and the random a/b order of each pair."})

    def __post_init__(self):
        if self.responses_per_prompt < 2:
            raise ValueError(f"responses_per_prompt must be at least 2, got {self.responses_per_prompt}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be above 0 for sampling, got {self.temperature}")
