"""The figures of a bench/gpu_check.sh folder as one JSON object on stdout: each part's exit code and seconds,
the rollout benchmark's `name: value` lines, each chain stage's status, timings and numeric metrics, and the
FSDP2 test's summary line. A part that left nothing behind is null.

    python bench/gpu_figures.py OUT
"""
import json
import re
import sys
from pathlib import Path


NAMED_NUMBER = re.compile(r"(\w+): (\d+(?:\.\d+)?)(?=\s|$)")  # `ratio: 2.242`; not a version's `2.5.1`


def rollout_figures(log: Path) -> dict | None:
    """The `name: number` pairs of the benchmark's summary lines (each round's lines repeat their names)."""
    if not log.exists():
        return None
    summary = [line for line in log.read_text().splitlines() if " round " not in line]
    return {name: float(value) for line in summary for name, value in NAMED_NUMBER.findall(line)}


def chain_figures(runs: Path) -> dict | None:
    manifests = sorted(runs.glob("*/manifest.json"))
    if not manifests:
        return None
    stages = json.loads(manifests[0].read_text())["stages"]
    return {name: {"status": stage["status"], "timings": stage.get("timings"),
                   "metrics": {key: value for key, value in (stage.get("metrics") or {}).items()
                               if isinstance(value, (int, float))}}
            for name, stage in stages.items()}


def last_line(log: Path) -> str | None:
    lines = log.read_text().strip().splitlines() if log.exists() else []
    return lines[-1] if lines else None


def head(log: Path, characters: int = 2000) -> str | None:
    return log.read_text()[:characters] if log.exists() else None


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    parts = folder / "parts.jsonl"
    ran = [json.loads(line) for line in parts.read_text().splitlines()] if parts.exists() else []
    this_time = {part["part"] for part in ran}  # (a part not run this time may have left an older log behind)
    figures = {"parts": ran,
               "rollout": rollout_figures(folder / "rollout.log") if "rollout" in this_time else None,
               "chain": chain_figures(folder / "runs") if "chain" in this_time else None,
               "fsdp": last_line(folder / "fsdp.log") if "fsdp" in this_time else None,
               "gpu": head(folder / "nvidia-smi.txt")}
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
