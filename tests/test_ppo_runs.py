"""Whole `rlhf ppo` runs on the tiny model: exact resume after SIGKILL, LoRA, stopping on a health alert, and two
processes (torchrun, gloo) sharing rollouts and gradients."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main as cli
from preference_ui.loadtest import free_port
from tests.conftest import REPO, kill_when_saved
from tests.test_ppo_trainer import vowel_share


def ppo_args(tmp_path, model, name: str, *extra: str) -> list[str]:
    return ["ppo", "--config", "configs/tiny.yaml", f"--ppo.model={model}",
            "--ppo.reward_function=tests.test_ppo_trainer:vowel_share", "--ppo.response_length=8",
            "--ppo.learning_rate=1e-2", "--ppo.missing_eos_penalty=None", f"--run.output_root={tmp_path / 'runs'}",
            f"--run.name={name}", "--run.tracking=none", *extra]


def stage_entry(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "manifest.json").read_text())["stages"]["ppo"]


# GRPO: two answers to each of two prompts per update, no critic
ALGORITHMS = {"ppo": [], "grpo": ["--ppo.algorithm=grpo", "--ppo.num_generations=2"]}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_path, algorithm):
    run = ["--ppo.total_episodes=48", "--ppo.batch_size=4", "--ppo.save_steps=3", "--ppo.num_mini_batches=2",
           "--ppo.target_kl=0.5", "--ppo.horizon=20",  # the adaptive KL coefficient is part of the state too
           *ALGORITHMS[algorithm]]
    command = [sys.executable, "-m", "pipeline.cli", *ppo_args(tmp_path, tiny_model_path, "killed", *run)]
    kill_when_saved(command, tmp_path / "runs" / "killed" / ".ppo.partial" / "checkpoint-3")
    assert not (tmp_path / "runs" / "killed" / "ppo").exists()
    resumed = subprocess.run(command + ["--ppo.resume=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    # the stop-token alert fired before the kill (8 tokens are too few for the tiny model): not printed again
    assert "ALERT at update" not in resumed.stdout and "stop token in" in resumed.stdout
    assert cli(ppo_args(tmp_path, tiny_model_path, "whole", *run)) == 0

    killed, whole = stage_entry(tmp_path, "killed")["metrics"], stage_entry(tmp_path, "whole")["metrics"]
    assert killed["resumed_from_update"] >= 3 and killed["updates"] == whole["updates"] == 12
    for key in ("start_score", "end_score", "final_kl", "eval_score_before", "eval_score_after"):
        assert abs(killed[key] - whole[key]) < 1e-5, key
    resumed_weights = load_file(tmp_path / "runs" / "killed" / "ppo" / "model.safetensors")
    whole_weights = load_file(tmp_path / "runs" / "whole" / "ppo" / "model.safetensors")
    moved = 0.0
    start = load_file(tiny_model_path / "model.safetensors")
    for name, tensor in whole_weights.items():
        assert torch.allclose(resumed_weights[name], tensor, atol=1e-5), name
        moved = max(moved, (tensor - start[name]).abs().max().item())
    assert moved > 1e-3  # the runs trained: equal weights are not both the starting ones


def test_lora_trains_an_adapter_and_publishes_it_merged(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM

    assert cli(ppo_args(tmp_path, tiny_model_path, "lora", "--ppo.use_peft=true", "--ppo.lora_r=4",
                        "--ppo.total_episodes=16", "--ppo.batch_size=8")) == 0
    published = tmp_path / "runs" / "lora" / "ppo"
    assert not (published / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(published).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    assert set(merged) == set(start)  # a plain model, no LoRA modules left
    assert max((merged[k] - start[k]).abs().max().item() for k in start) > 1e-4
    assert stage_entry(tmp_path, "lora")["metrics"]["final_kl"] != 0  # KL against the adapter-disabled policy


def test_stop_on_alert_stops_with_a_checkpoint(tmp_path, tiny_model_path, capsys):
    # 8 tokens are too few for the tiny model to reach its stop token: the EOS alert fires on the first update
    code = cli(ppo_args(tmp_path, tiny_model_path, "alert", "--ppo.stop_on_alert=true", "--ppo.total_episodes=16",
                        "--ppo.batch_size=4"))
    assert code == 2
    out = capsys.readouterr()
    assert "ALERT at update 1" in out.out and "emit the stop token" in out.out + out.err
    assert stage_entry(tmp_path, "alert")["status"] == "failed"
    assert (tmp_path / "runs" / "alert" / ".ppo.partial" / "checkpoint-1" / "trainer_state.json").exists()


class RecordingBackend:
    """A tracker backend that keeps what is logged."""

    def __init__(self):
        self.logged = []

    def log(self, metrics: dict, step=None) -> None:
        self.logged.append((step, metrics))

    def ignore(self, *args) -> None:
        pass

    log_table = log_images = log_artifact = use_artifact = finish = ignore


def test_the_alert_count_is_logged_at_every_update_clean_ones_as_0(tmp_path, tiny_model_path, monkeypatch):
    from rlhf import tracking

    backend = RecordingBackend()
    monkeypatch.setattr(tracking, "start", lambda *args, **kwargs: tracking.Tracker([backend]))
    monkeypatch.setattr("ppo.trainer.health_alerts", lambda metrics, config: {})  # every update clean
    assert cli(ppo_args(tmp_path, tiny_model_path, "clean", "--ppo.total_episodes=12", "--ppo.batch_size=4")) == 0
    counts = [(step, metrics["health/alerts"]) for step, metrics in backend.logged if "health/alerts" in metrics]
    assert counts == [(1, 0), (2, 0), (3, 0)]


def recording_vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    """vowel_share, noting which prompts each process scored."""
    with open(os.path.join(os.environ["PPO_TEST_RECORD"], f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
        f.write(json.dumps(prompts) + "\n")
    return vowel_share(prompts, responses)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_processes_split_each_batch_and_share_gradients(tmp_path, tiny_model_path, algorithm):
    from rlhf.datasets import load_rows

    env = {**os.environ, "PPO_TEST_RECORD": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = ppo_args(tmp_path, tiny_model_path, "ddp", "--ppo.reward_function=tests.test_ppo_runs:recording_vowel_share",
                    "--ppo.total_episodes=24", "--ppo.batch_size=8", "--ppo.num_mini_batches=2",
                    "--ppo.gradient_accumulation_steps=2", *ALGORITHMS[algorithm])  # no_sync but at the last
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"]
    result = subprocess.run([*launch, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = stage_entry(tmp_path, "ddp")["metrics"]
    assert metrics["processes"] == 2 and metrics["episodes"] == 24
    # the trainer checked that both processes ended with the same weights; they moved from the start
    published = load_file(tmp_path / "runs" / "ddp" / "ppo" / "model.safetensors")
    start = load_file(tiny_model_path / "model.safetensors")
    assert max((published[k] - start[k]).abs().max().item() for k in start) > 1e-4

    prompts = [row["prompt"][-1]["content"] for row in load_rows("data/rl_prompts.jsonl", "prompt")]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    scored = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / f"rank-{rank}.jsonl").read_text().splitlines()]
        # training batches, not eval; the first line is the made-up answer each process scores before it starts
        scored[rank] = [batch for batch in lines[1:] if set(batch) <= set(prompts)]
    assert len(scored[0]) == len(scored[1]) == 3
    group = 2 if algorithm == "grpo" else 1
    prompts_per_update = 8 // group
    for update in range(3):  # each process answered its own half of the update's batch, in the shared order
        chosen = order[update * prompts_per_update:(update + 1) * prompts_per_update]
        batch = [prompts[i] for i in chosen for _ in range(group)]  # GRPO: each prompt's group on one process
        assert scored[0][update] == batch[:4] and scored[1][update] == batch[4:]


@pytest.mark.parametrize("algorithm", ["ppo", "reinforce_pp"])
def test_advantages_are_whitened_over_every_process_so_two_processes_train_as_one(tmp_path, tiny_model_path,
                                                                                  algorithm):
    """PPO and REINFORCE++ whiten their advantages over the whole batch's tokens (REINFORCE++'s baseline is the
    batch's mean): 2 processes under DDP end where one process with the same batch does. Before, each process
    whitened its own half."""
    extra = ["--ppo.total_episodes=16", "--ppo.batch_size=8", "--ppo.precision=fp32", "--ppo.learning_rate=1e-3",
             f"--ppo.algorithm={algorithm}", "--ppo.eval_every=0", "--ppo.save_steps=0"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, start in (("two", launch), ("one", [sys.executable])):
        result = subprocess.run([*start, "-m", "pipeline.cli", *ppo_args(tmp_path, tiny_model_path, name, *extra)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    two, one = (load_file(tmp_path / "runs" / name / "ppo" / "model.safetensors") for name in ("two", "one"))
    start = load_file(tiny_model_path / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in start) > 1e-4  # trained, not the start twice
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-5


def test_a_bad_prompts_file_or_judge_stops_ppo_with_exit_2_before_anything_is_written(tmp_path, tiny_model_path,
                                                                                       capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "Tell me about rain."}\n{"id": "b"}\n')
    for setting, message in ((f"--ppo.prompts={bad}", f"{bad}:2: prompt"),
                             (f"--ppo.eval_prompts={bad}", f"{bad}:2: prompt"),
                             ("--ppo.judge=builtin:nonesuch", "builtin:nonesuch"),
                             ("--ppo.save_steps=-1", "save_steps and sample_every must be 0 (none) or more")):
        assert cli(ppo_args(tmp_path, tiny_model_path, "bad", setting)) == 2, setting
        assert message in capsys.readouterr().err, setting
        assert not (tmp_path / "runs").exists(), setting
