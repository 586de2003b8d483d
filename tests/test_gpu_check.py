"""bench/gpu_check.sh on a machine without a GPU stops before anything runs; bench/gpu_figures.py reads what the
check's parts leave behind (here a real rollout benchmark on the tiny model) and marks what is missing."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_check_refuses_a_machine_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr
    assert not out.exists()


def test_the_figures_gather_the_parts_and_the_rollout_lines(tmp_path, tiny_model_path):
    rollout = subprocess.run([sys.executable, "bench/rollout.py", "--model", str(tiny_model_path), "--prompts", "2",
                              "--k", "2", "--batch", "4", "--batch-ppo", "2", "--group", "2", "--tokens", "4",
                              "--rounds", "1", "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert rollout.returncode == 0, rollout.stderr[-2000:]
    # what else lands in the log (stderr too): a version number is no figure
    (tmp_path / "rollout.log").write_text(rollout.stdout + "warning: torch: 2.5.1 found\n")
    (tmp_path / "fsdp.log").write_text("9 passed in 99.0s\n")  # an earlier check's: not a part run this time
    (tmp_path / "parts.jsonl").write_text('{"part": "rollout", "exit": 0, "seconds": 3}\n'
                                          '{"part": "chain", "exit": 124, "seconds": 390}\n')
    result = subprocess.run([sys.executable, "bench/gpu_figures.py", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert [part["exit"] for part in figures["parts"]] == [0, 124]
    assert figures["rollout"]["sampling_rows"] == 4 and figures["rollout"]["ratio"] > 0
    assert "torch" not in figures["rollout"] and "ours" not in figures["rollout"]  # (each round's lines name it)
    assert figures["chain"] is None and figures["fsdp"] is None and figures["gpu"] is None
