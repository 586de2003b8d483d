"""The figures of a bench/gpu_check.sh folder as one JSON object on stdout: each part's exit code and seconds,
the rollout benchmark's `name: value` lines, each chain stage's status, timings and numeric metrics, and the
FSDP2 test's summary line. A part that left nothing behind is null.

    python bench/gpu_figures.py OUT
"""
import json
import re
import sys
from pathlib import Path


def rollout_figures(log: Path) -> dict | None:
    if not log.exists():
        return None
    return {name: float(value) for name, value in re.findall(r"(\w+): ([\d.]+)(?=\s|$)", log.read_text())}


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
    figures = {"parts": [json.loads(line) for line in parts.read_text().splitlines()] if parts.exists() else [],
               "rollout": rollout_figures(folder / "rollout.log"), "chain": chain_figures(folder / "runs"),
               "fsdp": last_line(folder / "fsdp.log"), "gpu": head(folder / "nvidia-smi.txt")}
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
