"""Online RL throughput: our PPO stage against TRL's `RLOOTrainer` (`bench/trl_baselines.py rloo`)
with the same policy, reward model, prompts, completion length and completions per step, alternating in one call.

    python bench/ppo_vs_rloo.py [--model smollm2-135m-instruct] [--rounds 2] [--steps 6] [--batch 8]
                                [--completion-length 32] [--epochs 1]

The reward model is a fresh one-output head on the policy, saved once and given to both sides; the prompts are the
baseline's own ("Write about" + 8 of its words, its seed). TRL's RLOO takes one optimiser step per generation
(num_iterations 1), so ours runs one PPO epoch of one minibatch by default (`--epochs` for more). Each side reports
the median seconds per step with the first (warm-up) step left out; ours also splits a step into generation and
update (scoring, reference, values, advantages, optimisation). Prints `name: value` lines and last `ratio: X` =
our episodes/s over RLOO's.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_throughput import REPO, at_our_precision, yardstick_step_seconds  # noqa: E402
from trl_baselines import words  # noqa: E402


def write_inputs(a, folder: Path) -> tuple[Path, Path, Path]:
    """(reward model, training prompts, one eval prompt): the baseline's prompts and a fresh reward head."""
    from transformers import AutoModelForSequenceClassification

    from rlhf import models
    from rlhf.reward_model import reward_tokenizer

    model_dir = models.resolve(a.model)
    reward_dir = folder / "reward"
    tokenizer = reward_tokenizer(model_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    rng = random.Random(0)
    prompts = [{"prompt": [{"role": "user", "content": "Write about " + words(rng, 8)}]} for _ in range(64 * a.batch)]
    prompts_file, eval_file = folder / "prompts.jsonl", folder / "eval.jsonl"
    prompts_file.write_text("".join(json.dumps(row) + "\n" for row in prompts))
    eval_file.write_text(json.dumps(prompts[0]) + "\n")
    return reward_dir, prompts_file, eval_file


def ours(a, reward_dir: Path, prompts: Path, eval_prompts: Path, out: Path, round_index: int) -> dict:
    name = f"bench{round_index}"
    command = [sys.executable, "-m", "pipeline.cli", "ppo", f"--run.output_root={out}", f"--run.name={name}",
               "--run.tracking=none", f"--ppo.model={a.model}", f"--ppo.reward_model={reward_dir}",
               f"--ppo.prompts={prompts}", f"--ppo.eval_prompts={eval_prompts}",
               f"--ppo.total_episodes={a.steps * a.batch}", f"--ppo.batch_size={a.batch}",
               f"--ppo.response_length={a.completion_length}", f"--ppo.num_ppo_epochs={a.epochs}",
               "--ppo.num_mini_batches=1", "--ppo.temperature=0.7", "--ppo.learning_rate=1e-6",
               f"--ppo.save_steps={a.steps + 1}", "--ppo.sample_every=0", "--ppo.seed=0"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    metrics = json.loads((out / name / "manifest.json").read_text())["stages"]["ppo"]["metrics"]  # (timings)
    return {key: metrics[key] for key in ("median_step_s", "median_generate_s")}


def trl(a, model_dir: str, reward_dir: Path) -> float:
    return yardstick_step_seconds("rloo", "--model", model_dir, "--reward_model", str(reward_dir), "--steps",
                                  str(a.steps), "--batch", str(a.batch), "--generations", "2",
                                  "--completion_length", str(a.completion_length), *at_our_precision())


def main():
    p = arguments(__doc__)
    p.add_argument("--epochs", type=int, default=1, help="our num_ppo_epochs (RLOO: one pass)")
    alternate(p.parse_args(), ours, trl, "rloo")


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every online-RL comparison with TRL takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and TRL's")
    p.add_argument("--steps", type=int, default=6, help="steps (one generation and update each) per run")
    p.add_argument("--batch", type=int, default=8, help="completions per step")
    p.add_argument("--completion-length", type=int, default=32)
    return p


def alternate(a, ours, trl, yardstick: str) -> None:
    """`a.rounds` rounds of our run then TRL's on the same inputs, each printed; then the medians, and last the
    ratio of our episodes/s over TRL's."""
    sys.path.insert(0, str(REPO))
    from rlhf import models

    model_dir = models.resolve(a.model)
    ours_runs, trl_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        reward_dir, prompts, eval_prompts = write_inputs(a, Path(tmp))
        for round_index in range(a.rounds):
            ours_runs.append(ours(a, reward_dir, prompts, eval_prompts, Path(tmp) / "runs", round_index))
            trl_s.append(trl(a, model_dir, reward_dir))
            print(f"round {round_index + 1}: ours {ours_runs[-1]['median_step_s']:.3f} s/step "
                  f"(generate {ours_runs[-1]['median_generate_s']:.3f}), trl {yardstick} {trl_s[-1]:.3f} s/step",
                  flush=True)
    ours_step = statistics.median(run["median_step_s"] for run in ours_runs)
    generate_step = statistics.median(run["median_generate_s"] for run in ours_runs)
    trl_step = statistics.median(trl_s)
    print(f"ours_episodes_per_s: {a.batch / ours_step:.3f}")
    print(f"ours_generate_s_per_step: {generate_step:.3f}")
    print(f"ours_update_s_per_step: {ours_step - generate_step:.3f}")
    print(f"trl_{yardstick}_episodes_per_s: {a.batch / trl_step:.3f}")
    print(f"ratio: {trl_step / ours_step:.3f}")


if __name__ == "__main__":
    main()
