"""Checkpoints of a PPO run that resume it exactly.

`accelerator.save_state` writes the policy, the critic, the optimiser and every process's RNG states; the
`LoopState` registered with it carries the rest: the update reached, the data position (the prompt order still
to be used and the shuffling generator), the KL controller, the metric history and the eval points so far.
A checkpoint is written under a temporary name and renamed into place, so `checkpoint-N` is always complete.
"""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

KEEP_CHECKPOINTS = 2


@dataclass
class LoopState:
    generator: torch.Generator
    kl_control: object
    update: int = 0
    order: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    seed: int = 0  # the round's seed, for the answers' sampling seeds (set at the start, not checkpointed)

    def state_dict(self) -> dict:
        return {"update": self.update, "order": list(self.order), "history": self.history,
                "eval_before": self.eval_before, "evals": self.evals, "generator": self.generator.get_state(),
                "kl_control": self.kl_control.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.update, self.order = state["update"], list(state["order"])
        self.history, self.eval_before, self.evals = state["history"], state["eval_before"], state["evals"]
        self.generator.set_state(state["generator"])
        self.kl_control.load_state_dict(state["kl_control"])


def save_checkpoint(accelerator, partial: Path, state: LoopState, shards=None) -> Path:
    """Writes checkpoint-<update> (all processes take part) and keeps the newest KEEP_CHECKPOINTS. `shards(folder)`
    writes what accelerate's state leaves out: under FSDP the models' and optimiser's shards (ppo/sharding.py),
    under ZeRO-3 the engine's partitions (ppo/zero3.py)."""
    final = partial / f"checkpoint-{state.update}"
    staging = partial / f"checkpoint-{state.update}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if shards:
        shards(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer_state.json marks a finished checkpoint, as transformers' checkpoints do (rlhf.stage)
        (staging / "trainer_state.json").write_text(json.dumps({"global_step": state.update}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        names = [p.name.split("-")[1] for p in partial.glob("checkpoint-*")]
        for old in sorted(int(n) for n in names if n.isdigit())[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(partial / f"checkpoint-{old}", ignore_errors=True)
        print(f"[ppo] checkpoint saved: {final}", flush=True)
    accelerator.wait_for_everyone()
    return final
