"""Critic-free RL throughput: our `rlhf ppo --ppo.algorithm grpo` against TRL's `GRPOTrainer`
(`bench/trl_baselines.py grpo`) with the same policy, reward model, prompts, answers per prompt (G), completion
length and completions per step, alternating in one call.

    python bench/grpo_vs_trl.py [--model smollm2-135m-instruct] [--rounds 2] [--steps 6] [--batch 8]
                                [--generations 4] [--completion-length 32] [--beta 0.04]

The reward model is a fresh one-output head on the policy, saved once and given to both sides; the prompts are the
baseline's own ("Write about" + 8 of its words, its seed). TRL's GRPO takes one optimiser step per generation
(num_iterations 1), so ours runs one epoch of one minibatch. Both weigh a KL term to the reference by `--beta`
(0.04, DeepSeekMath's; at TRL's default 0 TRL loads no reference, while ours still computes the KL it reports).
Each side reports the median seconds per step with the first (warm-up) step left out. Prints `name: value` lines and
last `ratio: X` = our episodes/s over TRL's.
"""
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_rloo import alternate, arguments  # noqa: E402
from reward_throughput import REPO, at_our_precision, yardstick_step_seconds  # noqa: E402


def ours(a, reward_dir: Path, prompts: Path, eval_prompts: Path, out: Path, round_index: int) -> dict:
    name = f"bench{round_index}"
    command = [sys.executable, "-m", "pipeline.cli", "ppo", f"--run.output_root={out}", f"--run.name={name}",
               "--run.tracking=none", f"--ppo.model={a.model}", f"--ppo.reward_model={reward_dir}",
               f"--ppo.prompts={prompts}", f"--ppo.eval_prompts={eval_prompts}", "--ppo.algorithm=grpo",
               f"--ppo.num_generations={a.generations}", f"--ppo.total_episodes={a.steps * a.batch}",
               f"--ppo.batch_size={a.batch}", f"--ppo.response_length={a.completion_length}",
               "--ppo.num_ppo_epochs=1", "--ppo.num_mini_batches=1", "--ppo.temperature=0.7",
               f"--ppo.kl_coef={a.beta}", "--ppo.learning_rate=1e-6", f"--ppo.save_steps={a.steps + 1}",
               "--ppo.sample_every=0", "--ppo.seed=0"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    metrics = json.loads((out / name / "manifest.json").read_text())["stages"]["ppo"]["metrics"]  # (timings)
    return {key: metrics[key] for key in ("median_step_s", "median_generate_s")}


def trl(a, model_dir: str, reward_dir: Path) -> float:
    return yardstick_step_seconds("grpo", "--model", model_dir, "--reward_model", str(reward_dir), "--steps",
                                  str(a.steps), "--batch", str(a.batch), "--generations", str(a.generations),
                                  "--completion_length", str(a.completion_length), "--beta", str(a.beta),
                                  *at_our_precision())


def main():
    p = arguments(__doc__)
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, both sides")
    alternate(p.parse_args(), ours, trl, "grpo")


if __name__ == "__main__":
    main()
