"""Reward-model training throughput: our reward stage against plain TRL `RewardTrainer` (`bench/trl_baselines.py
reward`) on the same pairs, batch size and maximum length, alternating in one call.

    python bench/reward_throughput.py [--model smollm2-135m-instruct] [--rounds 2] [--steps 6] [--batch 4]
                                      [--seq 128]

The pairs are the baseline's own (its word list and seed), written to a file our stage reads. Both sides train on
the CPU at the precision our stage chooses for this machine (fp32, or bf16 on a CPU with native bf16) with the same
optimiser settings; each reports the median seconds per optimiser step with the first (warm-up) step left out.
Prints `name: value` lines, pairs/s for each, and last `ratio: X` = ours / TRL.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf import hardware
from trl_baselines import words  # bench/ is this script's folder

REPO = Path(__file__).resolve().parent.parent
YARDSTICK = REPO / "bench" / "trl_baselines.py"


def yardstick_pairs(batch: int, seq: int) -> list[dict]:
    """The pairs trl_baselines.py builds for TRL's RewardTrainer: its words, its seed, its lengths."""
    rng = random.Random(0)
    return [{"prompt": [{"role": "user", "content": words(rng, 20)}],
             "chosen": [{"role": "assistant", "content": words(rng, seq // 3)}],
             "rejected": [{"role": "assistant", "content": words(rng, seq // 3)}]}
            for _ in range(16 * batch)]


def ours(a, pairs_file: Path, out: Path, round_index: int) -> float:
    name = f"bench{round_index}"
    command = [sys.executable, "-m", "pipeline.cli", "reward", f"--run.output_root={out}", f"--run.name={name}",
               "--run.tracking=none", f"--reward.model={a.model}", f"--reward.preferences={pairs_file}",
               "--reward.eval_fraction=0", "--reward.gold=", f"--reward.max_steps={a.steps}",
               f"--reward.per_device_train_batch_size={a.batch}", f"--reward.max_length={a.seq}",
               "--reward.save_strategy=no", "--reward.logging_steps=1000", "--reward.learning_rate=1e-5",
               "--reward.disable_tqdm=true", f"--reward.share_prompt={str(a.share_prompt).lower()}"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    manifest = json.loads((out / name / "manifest.json").read_text())
    return manifest["stages"]["reward"]["metrics"]["median_step_s"]


def at_our_precision() -> list[str]:
    """The yardstick's precision flag: bf16 where our stages choose it on this machine (a CPU with native bf16, a
    GPU), so that the two sides train at one precision."""
    return ["--bf16"] if hardware.choose("auto").bf16 else []


def yardstick_step_seconds(*args: str) -> float:
    """Runs a plain TRL trainer (bench/trl_baselines.py) with `args`; its last output line is JSON with the
    median step time."""
    output = subprocess.run([sys.executable, str(YARDSTICK), *args], capture_output=True, text=True,
                            check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["median_step_s"]


def trl(a, model_dir: str) -> float:
    return yardstick_step_seconds("reward", "--model", model_dir, "--steps", str(a.steps), "--batch", str(a.batch),
                                  "--seq", str(a.seq), *at_our_precision())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and TRL's")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--share-prompt", type=lambda v: v.lower() == "true", default=True,
                   help="our stage's reward.share_prompt (true/false)")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from rlhf import models

    model_dir = models.resolve(a.model)
    ours_s, trl_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(pair) + "\n" for pair in yardstick_pairs(a.batch, a.seq)))
        for round_index in range(a.rounds):
            ours_s.append(ours(a, pairs_file, Path(tmp) / "runs", round_index))
            trl_s.append(trl(a, model_dir))
            print(f"round {round_index + 1}: ours {ours_s[-1]:.3f} s/step, trl {trl_s[-1]:.3f} s/step", flush=True)
    ours_step, trl_step = statistics.median(ours_s), statistics.median(trl_s)
    print(f"ours_pairs_per_s: {a.batch / ours_step:.3f}")
    print(f"trl_pairs_per_s: {a.batch / trl_step:.3f}")
    print(f"ratio: {trl_step / ours_step:.3f}")


if __name__ == "__main__":
    main()
